"""ONNX export: every graph run in ONNX Runtime equals PyTorch to 1e-4 on inputs of other batch sizes and
lengths than the traced ones (dynamic axes), padding included; the exported translator decodes greedily to
the same tokens as PyTorch; bad input fails clearly."""

from __future__ import annotations

import json
import sys

import onnxruntime as ort
import pytest
import torch

from support.models import build
from tformer import cli
from tformer.inference.decoding import greedy_decode
from tformer.training import Trainer

TOL = 1e-4
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module", params=["classification", "lm", "translation"])
def exported(request, tmp_path_factory):
    family = request.param
    root = tmp_path_factory.mktemp(f"onnx-{family}")
    kw = {"lm": {"batch_size": 4}, "classification": {"batch_tokens": 24}}.get(family, {"batch_tokens": 120})
    task, model = build(family, max_steps=2, dropout=0.3, **kw)  # the graphs must be eval-mode ones
    Trainer(model, task, task.train_config, out_dir=root / "run", progress=False).fit()
    assert cli.main(["export", "onnx", str(root / "run" / "checkpoint"), str(root / "onnx")]) == 0
    return family, model.eval(), root / "onnx"


def session(path):
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def ids(b, t, vocab, *, pad_tail=0):
    x = torch.randint(4, vocab, (b, t))
    if pad_tail:
        x[0, -pad_tail:] = 0
    return x


def test_graphs_equal_pytorch(exported):
    family, model, out = exported
    c = model.config
    manifest = json.loads((out / "onnx.json").read_text())
    assert manifest["task"] == family and (out / "config.json").exists()
    torch.manual_seed(5)
    with torch.no_grad():
        if family in ("classification", "lm"):
            name = "classifier" if family == "classification" else "lm"
            s = session(out / f"{name}.onnx")
            for b, t in [(1, 3), (4, 9), (2, c.max_seq_len)]:
                x = ids(b, t, c.vocab_size, pad_tail=2 if family == "classification" else 0)
                (got,) = s.run(None, {"ids": x.numpy()})
                assert (torch.from_numpy(got) - model(x).logits).abs().max() < TOL
            return
        enc, dec = session(out / "encoder.onnx"), session(out / "decoder.onnx")
        for b, s_len, t_len in [(1, 4, 2), (3, 11, 6), (2, c.max_seq_len, c.max_seq_len)]:
            src = ids(b, s_len, c.src_vocab_size, pad_tail=3)
            tgt = ids(b, t_len, c.tgt_vocab_size)
            memory, mask = enc.run(None, {"src": src.numpy()})
            ref_memory, ref_mask, _ = model.encode(src)
            assert (torch.from_numpy(memory) - ref_memory).abs().max() < TOL
            assert torch.equal(torch.from_numpy(mask), ref_mask[:, 0, 0, :])
            (logits,) = dec.run(None, {"memory": memory, "memory_mask": mask, "tgt": tgt.numpy()})
            assert (torch.from_numpy(logits) - model(src, tgt).logits).abs().max() < TOL


@pytest.mark.parametrize("exported", ["translation"], indirect=True)
def test_translator_graphs_decode_like_pytorch(exported):
    _, model, out = exported
    enc, dec = session(out / "encoder.onnx"), session(out / "decoder.onnx")
    src = ids(3, 7, model.config.src_vocab_size, pad_tail=2)
    memory, mask = enc.run(None, {"src": src.numpy()})
    tgt = torch.full((3, 1), 1)  # BOS
    for _ in range(6):  # greedy, the whole prefix each step (the graph has no cache)
        (logits,) = dec.run(None, {"memory": memory, "memory_mask": mask, "tgt": tgt.numpy()})
        step = torch.from_numpy(logits[:, -1])
        step[:, :2] = float("-inf")  # never PAD or BOS, as tformer's decoder
        tgt = torch.cat([tgt, step.argmax(-1, keepdim=True)], 1)
    ref = greedy_decode(model, src, bos_id=1, eos_id=2, max_len=6)
    for row, hyp in zip(tgt[:, 1:].tolist(), ref, strict=True):
        n = len(hyp.tokens)
        assert row[:n] == hyp.tokens
        assert n == 6 or row[n] == 2  # stopped at EOS


def test_export_errors(tmp_path, capsys, monkeypatch):
    assert cli.main(["export", "onnx", str(tmp_path / "nothing"), str(tmp_path / "o")]) == 2
    assert "checkpoint not found" in capsys.readouterr().err
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # as if the extra were not installed
    assert cli.main(["export", "onnx", str(tmp_path), str(tmp_path / "o")]) == 2
    assert "pip install 'tformer[onnx]'" in capsys.readouterr().err
