"""The literature's baselines (LSTM / GRU seq2seq with additive attention, LSTM LM, CNN classifier): they
share the Transformer's interfaces, learn tiny data, decode incrementally exactly as in one pass, and go
through the CLI, checkpoints and predictors like the Transformer."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from tformer.cli import main
from tformer.config import ClassifierConfig, ConfigError, LMConfig, ModelConfig, RunConfig, apply_overrides
from tformer.inference.decoding import beam_search, greedy_decode
from tformer.models import build_model
from tformer.models.cnn import CNNClassifier
from tformer.models.rnn import RNNClassifier, RNNLanguageModel, RNNSeq2Seq


def _seq2seq(kind: str, **kw) -> RNNSeq2Seq:
    cfg = ModelConfig(
        architecture=kind, src_vocab_size=20, tgt_vocab_size=20, d_model=32, n_layers=1, dropout=0.0, **kw
    )
    model = build_model(cfg)
    assert isinstance(model, RNNSeq2Seq)
    return model


def test_config_rejects_impossible_combinations():
    with pytest.raises(ConfigError, match="'cnn' is not available for lm"):
        LMConfig(architecture="cnn")
    with pytest.raises(ConfigError, match="not available for translation"):
        ModelConfig(architecture="cnn")
    with pytest.raises(ConfigError, match="not available for classification"):
        ClassifierConfig(architecture="rnn")
    with pytest.raises(ConfigError, match="must be even"):
        ModelConfig(architecture="gru", d_model=33, n_heads=1)
    with pytest.raises(ConfigError, match="cnn_widths"):
        ClassifierConfig(architecture="cnn", cnn_widths=(3, 0))
    cfg = apply_overrides(RunConfig(task="lm"), ["architecture=lstm", "d_model=100"])
    assert cfg.model.architecture == "lstm"  # no heads to divide d_model (n_heads = 6) for an LSTM
    with pytest.raises(ConfigError, match="divisible by n_heads"):
        apply_overrides(RunConfig(task="lm"), ["d_model=100"])


@pytest.mark.parametrize("kind", ["lstm", "gru"])
def test_seq2seq_cached_decoding_equals_teacher_forcing(kind):
    model = _seq2seq(kind).eval()
    src = torch.tensor([[5, 6, 7, 8, 2], [9, 10, 2, 0, 0]])
    tgt = torch.tensor([[1, 4, 5, 6], [1, 7, 8, 9]])
    full = model(src, tgt).logits
    memory, mask, _ = model.encode(src)
    cache = model.start_cache(memory, mask)
    steps = []
    for t in range(tgt.shape[1]):
        out = model.decode_step(tgt[:, t : t + 1], cache)
        cache = out.cache
        steps.append(out.logits)
    torch.testing.assert_close(torch.cat(steps, 1), full, rtol=1e-5, atol=1e-6)
    assert cache.length == 4
    # padding does not change a source's encoding: row 1 alone (unpadded) encodes identically
    alone, _, _ = model.encode(src[1:, :3])
    torch.testing.assert_close(memory[1, :3], alone[0], rtol=1e-5, atol=1e-6)
    assert memory[1, 3:].abs().max() == 0


def test_additive_attention_matches_float64_formula():
    model = _seq2seq("gru").double()
    att = model.attention
    q, mem = torch.randn(2, 32, dtype=torch.float64), torch.randn(2, 5, 32, dtype=torch.float64)
    mask = torch.tensor([[True] * 5, [True, True, True, False, False]])
    ctx, w = att(q, att.keys(mem), mem, mask)
    hidden = torch.tanh((q @ att.query.weight.T)[:, None, :] + mem @ att.key.weight.T + att.key.bias)
    scores = hidden @ att.v.weight[0]  # (B, S)
    scores[1, 3:] = float("-inf")
    ref_w = torch.softmax(scores, -1)
    torch.testing.assert_close(w, ref_w)
    torch.testing.assert_close(ctx, torch.einsum("bs,bsc->bc", ref_w, mem))


@pytest.mark.parametrize("kind", ["lstm", "gru"])
def test_seq2seq_overfits_copy_and_decodes_with_shared_search(kind):
    torch.manual_seed(0)
    model = _seq2seq(kind)
    g = torch.Generator().manual_seed(1)
    body = torch.randint(4, 20, (16, 5), generator=g)
    src = torch.cat([body, torch.full((16, 1), 2)], 1)
    tgt = torch.cat([torch.ones(16, 1, dtype=torch.long), body.flip(1), torch.full((16, 1), 2)], 1)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(100):
        logits = model(src, tgt[:, :-1]).logits
        loss = F.cross_entropy(logits.reshape(-1, 20), tgt[:, 1:].reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.05
    model.eval()
    greedy = greedy_decode(model, src, bos_id=1, eos_id=2, max_len=8)
    assert [h.tokens for h in greedy] == body.flip(1).tolist()
    beams = beam_search(model, src[:4], bos_id=1, eos_id=2, beam_size=3, max_len=8)
    assert [b[0].tokens for b in beams] == body[:4].flip(1).tolist()


def test_rnn_lm_cache_equals_full_pass_and_overfits():
    torch.manual_seed(0)
    cfg = LMConfig(architecture="lstm", vocab_size=12, d_model=32, n_layers=2, max_seq_len=32, n_heads=2)
    model = build_model(cfg)
    assert isinstance(model, RNNLanguageModel)
    ids = torch.randint(0, 12, (2, 9))
    full = model(ids).logits
    out = model(ids[:, :4], use_cache=True)
    parts = [out.logits]
    for t in range(4, 9):
        out = model(ids[:, t : t + 1], cache=out.cache)
        parts.append(out.logits)
    torch.testing.assert_close(torch.cat(parts, 1), full, rtol=1e-5, atol=1e-6)
    assert out.cache.length == 9
    # learn a fixed sequence by heart
    seq = torch.tensor([[3, 7, 1, 9, 4, 4, 8, 2, 5, 11, 6, 10]])
    opt = torch.optim.Adam(model.parameters(), lr=3e-2)
    for _ in range(150):
        loss = F.cross_entropy(model(seq[:, :-1]).logits[0], seq[0, 1:])
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.05
    from tformer.inference.sampling import generate

    model.eval()
    cached = generate(model, seq[:, :2], max_new_tokens=10, greedy=True)
    uncached = generate(model, seq[:, :2], max_new_tokens=10, greedy=True, use_cache=False)
    assert cached.tolist() == uncached.tolist() == seq.tolist()


@pytest.mark.parametrize("kind", ["cnn", "lstm"])
def test_cnn_and_rnn_classifiers_overfit_and_ignore_padding(kind):
    torch.manual_seed(0)
    cfg = ClassifierConfig(
        architecture=kind,
        vocab_size=30,
        d_model=16,
        cnn_filters=8,
        cnn_widths=(2, 3),
        dropout=0.0,
        n_layers=1,
    )
    model = build_model(cfg)
    assert isinstance(model, CNNClassifier if kind == "cnn" else RNNClassifier)
    ids = torch.randint(4, 30, (24, 7))
    ids[:8, 4:] = 0  # some padded rows
    y = torch.randint(0, 2, (24,))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(100):
        loss = F.cross_entropy(model(ids).logits, y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert (model(ids).logits.argmax(-1) == y).all()
    model.eval()
    # more padding on the right changes nothing; one token (shorter than any filter) still works
    padded = torch.cat([ids, torch.zeros(24, 5, dtype=torch.long)], 1)
    torch.testing.assert_close(model(padded).logits, model(ids).logits, rtol=1e-5, atol=1e-6)
    assert torch.isfinite(model(torch.tensor([[5]])).logits).all()


def test_cli_trains_lstm_translation_and_cnn_classifier(tmp_path, capsys):
    pairs = [("un deux", "one two"), ("deux trois", "two three"), ("trois un", "three one")] * 20
    (tmp_path / "train.tsv").write_text("".join(f"{s}\t{t}\n" for s, t in pairs))
    common = ["--no-progress", "tokenizer=word", "d_model=32", "n_layers=1", "dropout=0.0", "lr=0.01"]
    common += ["warmup_steps=0", "schedule=constant", "label_smoothing=0.0", "batch_tokens=200"]
    rc = main(
        [
            "train",
            "translation",
            "--train",
            str(tmp_path / "train.tsv"),
            "--valid",
            str(tmp_path / "train.tsv"),
        ]
        + ["--out", str(tmp_path / "mt"), "architecture=lstm", "epochs=15", *common]
    )
    assert rc == 0
    capsys.readouterr()
    assert main(["translate", str(tmp_path / "mt" / "checkpoint"), "--beam", "2", "deux trois"]) == 0
    assert capsys.readouterr().out.strip() == "two three"

    rows = [
        ("good fine nice", "pos"),
        ("bad awful poor", "neg"),
        ("nice good", "pos"),
        ("poor bad", "neg"),
    ] * 10
    (tmp_path / "cls.tsv").write_text("text\tlabel\n" + "".join(f"{t}\t{y}\n" for t, y in rows))
    rc = main(
        [
            "train",
            "classification",
            "--train",
            str(tmp_path / "cls.tsv"),
            "--valid",
            str(tmp_path / "cls.tsv"),
        ]
        + ["--out", str(tmp_path / "cl"), "architecture=cnn", "epochs=10", "n_heads=1", *common]
    )
    assert rc == 0
    capsys.readouterr()
    assert main(["classify", str(tmp_path / "cl" / "checkpoint"), "awful bad"]) == 0
    assert capsys.readouterr().out.split("\t")[0] == "neg"


def test_cli_trains_lstm_lm_and_generates(tmp_path, capsys):
    (tmp_path / "text.txt").write_text("abcabcabcabc\n" * 40)
    rc = main(
        ["train", "lm", "--train", str(tmp_path / "text.txt"), "--out", str(tmp_path / "lm"), "--no-progress"]
        + ["architecture=lstm", "tokenizer=char", "d_model=32", "n_layers=1", "max_seq_len=16", "epochs=8"]
        + ["valid_fraction=0.2", "lr=0.02", "warmup_steps=0", "schedule=constant", "batch_size=8"]
    )
    assert rc == 0
    capsys.readouterr()
    ckpt = str(tmp_path / "lm" / "checkpoint")
    assert main(["generate", ckpt, "--prompt", "abca", "--greedy", "--max-new-tokens", "5"]) == 0
    assert capsys.readouterr().out.strip() == "abcabcabc"
