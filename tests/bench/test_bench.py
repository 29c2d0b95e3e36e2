"""The attention benchmark's pieces: one measurement point, the markdown table and the plot."""

from PIL import Image

from tformer.bench.attention import _point, markdown, matmul_ceiling, plot


def test_point_markdown_and_plot(tmp_path):
    point = _point("chunked", 64, True, 1, 2, 8, 1)
    assert point["seconds"] > 0 and point["peak_mib"] >= 0
    assert point["exact_flops"] == 4 * 2 * 64 * 64 * 8 * 0.5 * 3
    ceiling = matmul_ceiling(n=128, repeats=1)
    assert ceiling["float32"] > 0 and ceiling["bfloat16"] > 0
    report = {
        "shape": {"batch": 1, "heads": 2, "d_head": 8},
        "matmul_gflops": ceiling,
        "torch": "x",
        "threads": 1,
        "results": [
            {"backend": "chunked", "length": 64, "causal": True, **point, "fraction_of_fp32_ceiling": 0.1},
            {"backend": "math", "length": 128, "causal": False, "error": "out of memory"},
        ],
    }
    table = markdown(report)
    assert "| chunked | True | 64 |" in table and "failed: out of memory" in table
    plot(report, tmp_path / "a.png")
    with Image.open(tmp_path / "a.png") as im:
        assert im.size[0] > 500
