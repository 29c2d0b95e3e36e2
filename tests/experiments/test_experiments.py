"""`tformer experiment NAME --quick`: each experiment runs and writes result.json, summary.md and its
PNGs with sane values. Only robust facts are asserted (exact float64 softmax statistics, invariances,
above-chance learning where the task is easy); timings are recorded, never asserted."""

from __future__ import annotations

import json

import pytest

from tformer.cli import main
from tformer.experiments import EXPERIMENTS, run_experiment
from tformer.experiments.report import load_result, write_report


@pytest.fixture(autouse=True)
def _generated_data(monkeypatch, tmp_path):
    """The quick runs use the generated stand-ins (fast, and the fallback path gets tested)."""
    monkeypatch.setenv("TFORMER_DATA", str(tmp_path / "no-data-here"))


def _check_files(out, result):
    data = json.loads((out / "result.json").read_text())
    assert data["name"] == result.name and data["size"] == "quick"
    assert (out / "summary.md").read_text().startswith(f"# Experiment `{result.name}`")
    for name in result.plots:
        png = (out / name).read_bytes()
        assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000
    assert result.plots
    return data["numbers"]


def test_scaling_softmax_statistics(tmp_path):
    result = run_experiment("scaling", tmp_path, "quick")
    numbers = _check_files(tmp_path, result)
    scaled, unscaled = numbers["exact"]["scaled"], numbers["exact"]["unscaled"]
    for d_k, a, b in zip(numbers["d_k"], scaled, unscaled, strict=True):
        assert a["score_std"] == pytest.approx(1.0, abs=0.1)  # scaled scores: unit variance at every d_k
        assert b["score_std"] == pytest.approx(d_k**0.5, rel=0.1)  # unscaled: sqrt(d_k)
        assert b["max_probability"] > a["max_probability"]
    # saturation: unscaled at d_k = 1024 puts almost everything on one key and starves the gradient
    assert unscaled[-1]["max_probability"] > 0.9 > 0.2 > scaled[-1]["max_probability"]
    assert unscaled[-1]["grad_norm"] < 0.5 * scaled[-1]["grad_norm"]
    for curve in numbers["training"].values():
        assert all(0 < row[2] < 10 for row in curve)  # validation losses, nats per character


def test_positions_none_is_exactly_order_blind(tmp_path):
    result = run_experiment("positions", tmp_path, "quick")
    acc = _check_files(tmp_path, result)["accuracy"]
    assert set(acc) == {"sinusoidal", "learned", "rotary", "none"}
    assert acc["none"] == [0.5] * len(acc["none"])  # permutation-invariant: a sequence and its swap alike
    assert all(0.0 <= a <= 1.0 for v in acc.values() for a in v)


def test_long_range_and_parallelism(tmp_path):
    result = run_experiment("long-range", tmp_path / "lr", "quick")
    numbers = _check_files(tmp_path / "lr", result)
    assert set(numbers["accuracy"]) == {"Transformer", "LSTM"}
    assert all(0.0 <= a <= 1.0 for v in numbers["accuracy"].values() for a in v)
    assert numbers["accuracy"]["Transformer"][0] > 3 * numbers["chance"]  # d = 2 is easy

    # through the command line, as a user runs it
    assert main(["experiment", "parallelism", "--quick", "--out", str(tmp_path / "par")]) == 0
    result = load_result(tmp_path / "par")
    numbers = _check_files(tmp_path / "par", result)
    p = numbers["parameters"]
    assert abs(p["LSTM"] - p["Transformer"]) < 0.05 * p["Transformer"]  # equal size, as the claim needs
    for values in [
        *numbers["train_seconds_per_batch"].values(),
        *numbers["decode_seconds_per_token"].values(),
    ]:
        assert len(values) == len(numbers["lengths"]) and all(v > 0 for v in values)


def test_heads_and_efficient_and_report(tmp_path):
    results = [run_experiment(name, tmp_path / name, "quick") for name in ("heads", "efficient")]
    heads = _check_files(tmp_path / "heads", results[0])
    assert list(heads["final_valid_loss"]) == ["1 head", "2 heads", "4 heads"]
    eff = _check_files(tmp_path / "efficient", results[1])
    assert set(eff["accuracy"]) == {"math", "sdpa", "chunked", "local", "performer", "linformer"}
    assert all(0.0 <= a <= 1.0 for a in eff["accuracy"].values())
    # exact backends compute the same function: from the same seed and batches, the same accuracy
    assert eff["accuracy"]["math"] == eff["accuracy"]["sdpa"] == eff["accuracy"]["chunked"]
    page = write_report(tmp_path, [load_result(tmp_path / r.name) for r in results]).read_text()
    assert page.count("data:image/png;base64,") == 2 and "<table>" in page and "ListOps" in page


def test_efficient_times_exact_backends_without_training_them_twice(tmp_path, monkeypatch):
    """The full size trains one exact backend and only times the others (they compute the same function):
    their accuracy is the trained one's, their step time is measured, and the summary says so."""
    from tformer.experiments import efficient

    quick = {**efficient.SETTINGS["quick"], "timed_only": ["math", "chunked"], "time_steps": 3}
    monkeypatch.setitem(efficient.SETTINGS, "quick", quick)
    numbers = _check_files(tmp_path, run_experiment("efficient", tmp_path, "quick"))
    assert numbers["accuracy"]["math"] == numbers["accuracy"]["chunked"] == numbers["accuracy"]["sdpa"]
    assert all(ms > 0 for ms in numbers["step_ms"].values())
    assert "timed on 3 steps" in (tmp_path / "summary.md").read_text()


@pytest.mark.slow
def test_versus_rnn_quick(tmp_path):
    result = run_experiment("versus-rnn", tmp_path, "quick")
    numbers = _check_files(tmp_path, result)
    assert set(numbers["translation"]) == {"Transformer", "LSTM"}
    assert set(numbers["classification"]) == {"Transformer", "LSTM", "CNN"}
    for r in [*numbers["translation"].values(), *numbers["classification"].values()]:
        assert r["step"] > 0 and r["time"] > 0
    assert "generated" in (tmp_path / "summary.md").read_text()


def test_cli_experiment_errors_and_listing(capsys):
    with pytest.raises(SystemExit):
        main(["experiment", "nonsense"])
    assert "invalid choice" in capsys.readouterr().err
    assert set(EXPERIMENTS) == {
        "parallelism",
        "long-range",
        "scaling",
        "heads",
        "positions",
        "efficient",
        "versus-rnn",
        "vision",
    }
