"""Classifier inference latency: ONNX Runtime against PyTorch on the same exported checkpoint.

    .venv/bin/python benchmarks/onnx_latency.py [--repeats 30] [--threads 2] [--json out.json]

The model is configs/sst2.toml's classifier (2 layers, d_model 256, mean pooling), its weights after one
training step on SST-2 (latency does not depend on how well it is trained). `tformer export onnx` writes
classifier.onnx; each (batch, length) point then times `model(ids)` under torch.inference_mode and
`session.run` on the same ids, interleaved (A B A B ...), both on the same number of threads; figures are
medians of the repeats after 3 warm-up calls each.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from tformer.config import apply_overrides, load_toml
from tformer.export.onnx import export_onnx
from tformer.pipeline import train
from tformer.tasks import TextClassifier

CONFIG = Path(__file__).resolve().parent.parent / "configs" / "sst2.toml"
POINTS = [(1, 16), (1, 64), (32, 16), (32, 64)]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    from tformer.allocator import reuse_freed_memory

    reuse_freed_memory()  # as the CLI does: the library no longer sets it inside Trainer.fit
    import onnxruntime as ort

    config = apply_overrides(load_toml(CONFIG), ["train.max_steps=1", "train.epochs=1"])
    if not Path(config.data.paths("train")[0]).exists():
        print(f"skipping: SST-2 not found ({config.data.paths('train')[0]}); set TFORMER_DATA")
        return 0
    torch.set_num_threads(args.threads)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        train(config, Path(tmp) / "run", progress=False)
        export_onnx(Path(tmp) / "run" / "checkpoint", Path(tmp) / "onnx")
        model = TextClassifier.load(Path(tmp) / "run" / "checkpoint").model.eval()
        options = ort.SessionOptions()
        options.intra_op_num_threads = args.threads
        options.inter_op_num_threads = 1
        session = ort.InferenceSession(
            str(Path(tmp) / "onnx" / "classifier.onnx"), options, providers=["CPUExecutionProvider"]
        )
        g = torch.Generator().manual_seed(0)
        for b, t in POINTS:
            ids = torch.randint(4, model.config.vocab_size, (b, t), generator=g)
            feed = {"ids": ids.numpy()}

            def torch_call(ids: torch.Tensor = ids) -> None:
                with torch.inference_mode():
                    model(ids)

            def ort_call(feed: dict = feed) -> None:
                session.run(None, feed)

            for _ in range(3):
                torch_call()
                ort_call()
            times: dict[str, list[float]] = {"torch": [], "onnxruntime": []}
            for _ in range(args.repeats):
                for name, call in (("torch", torch_call), ("onnxruntime", ort_call)):
                    t0 = time.perf_counter()
                    call()
                    times[name].append(time.perf_counter() - t0)
            pt, rt = statistics.median(times["torch"]), statistics.median(times["onnxruntime"])
            rows.append({"batch": b, "length": t, "torch_ms": 1e3 * pt, "onnxruntime_ms": 1e3 * rt})
    print(
        f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, {args.threads} threads, "
        f"torch {torch.__version__}, onnxruntime {ort.__version__}"
    )
    print("| batch x length | PyTorch (ms) | ONNX Runtime (ms) | PyTorch / ONNX Runtime |")
    print("| --- | ---: | ---: | ---: |")
    for r in rows:
        print(
            f"| {r['batch']} x {r['length']} | {r['torch_ms']:.2f} | {r['onnxruntime_ms']:.2f} | "
            f"{r['torch_ms'] / r['onnxruntime_ms']:.2f}x |"
        )
    if args.json:
        Path(args.json).write_text(
            json.dumps({"threads": args.threads, "repeats": args.repeats, "rows": rows}, indent=2)
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
