"""ONNX export of a checkpoint, each graph checked with ONNX Runtime against PyTorch.

    classification   classifier.onnx   ids (B, T) int64                       -> logits (B, n_classes)
    vision           vision.onnx       images (B, channels, H, W) float32     -> logits (B, n_classes)
    lm               lm.onnx           ids (B, T) int64                       -> logits (B, T, V)
    translation      encoder.onnx      src (B, S) int64                       -> memory (B, S, C),
                                                                                 memory_mask (B, S) bool
                     decoder.onnx      memory, memory_mask, tgt (B, T) int64  -> logits (B, T, V)

B, T and S are dynamic (a vision graph's H and W are the model's image_size; its images are normalised
with config.json's "normalisation", the training split's mean and std per channel) (T, S up to the model's max_seq_len). The LM and the decoder have no KV cache: a
caller decodes by feeding the whole prefix again (BOS + the tokens so far) and reading the last position's
logits; the decoder takes the encoder's memory, computed once per source. Ids must be in the vocabulary
(PyTorch checks them on the host; a graph cannot). The output directory also gets the checkpoint's
config.json and tokenizer files, and onnx.json naming each graph's inputs and outputs.

Made with torch.onnx.export's dynamo exporter (torch.export + onnxscript), the one PyTorch maintains; the
TorchScript exporter is deprecated.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import shutil
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from tformer.models.seq2seq import Seq2Seq
from tformer.training.checkpoint import read_config

if TYPE_CHECKING:
    from torch.export import Dim


@dataclass
class ExportedGraph:
    name: str
    path: Path
    max_abs_diff: float  # ONNX Runtime vs PyTorch on a check input of another shape than the traced one


@dataclass
class _Graph:
    name: str
    module: nn.Module
    inputs: dict[str, Tensor]  # example inputs, by name, in argument order
    dynamic: dict[str, dict[int, Dim]]  # input name -> {axis: torch.export.Dim}
    outputs: list[str]
    check: dict[str, Tensor]  # inputs of other sizes (with padding) for the ONNX Runtime check


class _Logits(nn.Module):
    """A classifier or LM as ids -> logits (the graph returns tensors, not output objects)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, ids: Tensor) -> Tensor:
        return self.model(ids).logits


class _Images(_Logits):
    """A vision model as images -> logits (the argument's name is the graph input's)."""

    def forward(self, images: Tensor) -> Tensor:
        return self.model(images).logits


class _Encoder(nn.Module):
    def __init__(self, model: Seq2Seq) -> None:
        super().__init__()
        self.model = model

    def forward(self, src: Tensor) -> tuple[Tensor, Tensor]:
        memory, mask, _ = self.model.encode(src)
        return memory, mask[:, 0, 0, :]  # (B, S, C), (B, S) True = real token


class _Decoder(nn.Module):
    def __init__(self, model: Seq2Seq) -> None:
        super().__init__()
        self.model = model

    def forward(self, memory: Tensor, memory_mask: Tensor, tgt: Tensor) -> Tensor:
        return self.model.decode(tgt, memory, memory_mask[:, None, None, :]).logits


def _ids(b: int, t: int, vocab: int, pad_id: int, *, padded: bool, generator: torch.Generator) -> Tensor:
    """(b, t) ids of real tokens (4 .. vocab-1, after the specials); with `padded`, row 0 ends in padding."""
    ids = torch.randint(4, max(5, vocab), (b, t), generator=generator)
    if padded and t > 2:
        ids[0, -(t // 3) :] = pad_id
    return ids


def _graphs(task: str, model: nn.Module) -> list[_Graph]:
    from torch.export import Dim

    c: Any = model.config
    if task == "vision":  # the ViT or the CNN: images -> logits, any batch size
        g = torch.Generator().manual_seed(0)
        shape = (c.channels, c.image_size, c.image_size)
        ex, check = torch.randn(2, *shape, generator=g), torch.randn(3, *shape, generator=g)
        return [
            _Graph(
                "vision",
                _Images(model),
                {"images": ex},
                {"images": {0: Dim("batch")}},
                ["logits"],
                {"images": check},
            )
        ]
    n = c.max_seq_len
    if n < 3:
        raise ValueError(f"model.max_seq_len = {n}: ONNX export needs at least 3 positions")
    g = torch.Generator().manual_seed(0)
    batch, seq = Dim("batch"), Dim("seq", max=n)
    t0, t1 = min(n, 5), min(n, 7) if n > 5 else n - 1  # traced and checked lengths differ
    if task in ("classification", "lm"):
        ex = _ids(2, t0, c.vocab_size, c.pad_id, padded=False, generator=g)
        check = _ids(3, t1, c.vocab_size, c.pad_id, padded=task == "classification", generator=g)
        name = "classifier" if task == "classification" else "lm"
        return [
            _Graph(name, _Logits(model), {"ids": ex}, {"ids": {0: batch, 1: seq}}, ["logits"], {"ids": check})
        ]
    assert isinstance(model, Seq2Seq)
    src_len, tgt_len = Dim("src_len", max=n), Dim("tgt_len", max=n)
    src = _ids(2, t0, c.src_vocab_size, c.pad_id, padded=False, generator=g)
    src_check = _ids(3, t1, c.src_vocab_size, c.pad_id, padded=True, generator=g)
    with torch.no_grad():
        memory, mask = _Encoder(model)(src)
        memory_check, mask_check = _Encoder(model)(src_check)
    tgt = _ids(2, t0 - 1, c.tgt_vocab_size, c.pad_id, padded=False, generator=g)
    tgt_check = _ids(3, t1 - 2, c.tgt_vocab_size, c.pad_id, padded=False, generator=g)
    return [
        _Graph(
            "encoder",
            _Encoder(model),
            {"src": src},
            {"src": {0: batch, 1: src_len}},
            ["memory", "memory_mask"],
            {"src": src_check},
        ),
        _Graph(
            "decoder",
            _Decoder(model),
            {"memory": memory, "memory_mask": mask, "tgt": tgt},
            {
                "memory": {0: batch, 1: src_len},
                "memory_mask": {0: batch, 1: src_len},
                "tgt": {0: batch, 1: tgt_len},
            },
            ["logits"],
            {"memory": memory_check, "memory_mask": mask_check, "tgt": tgt_check},
        ),
    ]


def _axes(x: Tensor, dynamic: dict[int, Dim]) -> list[str | int]:
    """Axis names (dynamic) or sizes (fixed) of an input, for onnx.json."""
    return [dynamic[i].__name__ if i in dynamic else int(x.shape[i]) for i in range(x.dim())]


@contextlib.contextmanager
def _quiet(logger: str) -> Iterator[None]:
    """Warnings-level log lines of `logger` off for a while (the exporter lists optional ops it skips)."""
    log = logging.getLogger(logger)
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        yield
    finally:
        log.setLevel(level)


def _runtime() -> ModuleType:
    try:
        import onnxruntime
        import onnxscript  # noqa: F401  (torch.onnx's exporter needs it)
    except ImportError as exc:
        raise RuntimeError(
            f"ONNX export needs the 'onnx' extra ({exc.name} is missing): pip install 'tformer[onnx]'"
        ) from None
    return onnxruntime


def export_onnx(
    checkpoint: str | Path, out_dir: str | Path, *, opset: int | None = None, tolerance: float = 1e-4
) -> list[ExportedGraph]:
    """Export the checkpoint's graphs to `out_dir` and run each in ONNX Runtime on inputs of other sizes
    than the traced ones; raise if any output differs from PyTorch's by more than `tolerance` x max(1,
    largest |output|)."""
    from tformer.tasks import open_predictor

    ort = _runtime()
    from tformer.training import run_dir

    checkpoint, out = run_dir.resolve(checkpoint), Path(out_dir)  # a live run's link: one save's files
    task = read_config(checkpoint).get("task")
    model: nn.Module = open_predictor(checkpoint).model.eval()
    out.mkdir(parents=True, exist_ok=True)
    results: list[ExportedGraph] = []
    graphs: dict[str, dict[str, object]] = {}
    for graph in _graphs(str(task), model):
        graph.module.eval()  # the wrappers too: export traces in the wrapper's mode (dropout off)
        path = out / f"{graph.name}.onnx"
        log = io.StringIO()  # the exporter narrates each stage on stdout; keep it for errors only
        try:
            # The exporter's own warnings (axis renames, deprecations inside torch) are not the user's to act
            # on; whether the graph is right is decided by the ONNX Runtime check below.
            with (
                torch.no_grad(),
                contextlib.redirect_stdout(log),
                _quiet("torch.onnx"),
                warnings.catch_warnings(),
            ):
                warnings.simplefilter("ignore")
                torch.onnx.export(
                    graph.module,
                    tuple(graph.inputs.values()),
                    str(path),
                    input_names=list(graph.inputs),
                    output_names=graph.outputs,
                    dynamic_shapes=graph.dynamic,
                    opset_version=opset,
                    dynamo=True,
                    external_data=False,
                )
        except Exception as exc:
            attention = getattr(model.config, "attention", "?")
            raise RuntimeError(
                f"torch.onnx.export failed for the {graph.name} graph of {checkpoint} "
                f"(model.attention = {attention!r}): {str(exc).strip().splitlines()[0]}"
            ) from exc
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        got = session.run(None, {k: v.numpy() for k, v in graph.check.items()})
        with torch.no_grad():
            want = graph.module(*graph.check.values())
        want = want if isinstance(want, tuple) else (want,)
        diff = 0.0
        for name, g, w in zip(graph.outputs, got, want, strict=True):
            if tuple(g.shape) != tuple(w.shape):
                raise RuntimeError(f"{path}: output {name} has shape {g.shape}, PyTorch's {tuple(w.shape)}")
            g_t = torch.from_numpy(g)
            if not w.is_floating_point():  # the memory mask: must be equal
                if not torch.equal(g_t, w):
                    raise RuntimeError(f"{path}: ONNX Runtime's {name} differs from PyTorch's")
                continue
            d = (g_t.to(w.dtype) - w).abs().max().item() if w.numel() else 0.0
            if d > tolerance * max(1.0, w.abs().max().item() if w.numel() else 1.0):
                raise RuntimeError(f"{path}: ONNX Runtime's {name} differs from PyTorch's by {d:.3g}")
            diff = max(diff, d)
        results.append(ExportedGraph(graph.name, path, diff))
        graphs[graph.name] = {
            "file": path.name,
            "inputs": {
                k: {"dtype": str(v.dtype).removeprefix("torch."), "shape": _axes(v, graph.dynamic[k])}
                for k, v in graph.inputs.items()
            },
            "outputs": graph.outputs,
        }
    for f in checkpoint.iterdir():  # what a caller needs around the graphs: tokenizers, labels, sizes
        if f.name == "config.json" or f.name.endswith("tokenizer.json"):
            shutil.copy2(f, out / f.name)
    (out / "onnx.json").write_text(json.dumps({"task": task, "graphs": graphs}, indent=2))
    return results
