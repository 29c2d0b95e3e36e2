"""Inference in bfloat16 and int8 (torchao) for the three families: outputs close to float32 within stated
tolerances, the same greedy translations / labels / generations on small trained models, masks and the KV
cache right in bfloat16, and checkpoints through the CLI with --precision."""

import json
import math
import sys

import pytest
import torch

from tformer.attention import MultiHeadAttention
from tformer.cli import main
from tformer.config import RunConfig, apply_overrides
from tformer.data.batching import pad
from tformer.inference.precision import apply_precision
from tformer.pipeline import train
from tformer.tasks import TextClassifier, TextGenerator, Translator, load_predictor

PRECISIONS = ("fp32", "bf16", "int8")
TINY = ["model.d_model=32", "model.n_heads=4", "model.d_ff=64", "model.n_layers=2", "train.log_every=1000"]
SOURCES = [f"{a} {b} {a}" for a in "abcdefgh" for b in "ijklmnop"]
TARGETS = [f"{b} {a} {b}" for a in "abcdefgh" for b in "ijklmnop"]
REVIEWS = [
    (f"{x} {y}", "pos" if x in ("great", "loved", "fine") else "neg")
    for x in ("great", "awful", "loved", "hated", "fine", "poor")
    for y in ("fun", "film", "plot", "cast")
]
TEXT = "the cat sat on the mat. a dog ran in the fog.\n" * 40

# Tolerances. bfloat16 keeps 8 significant bits: each rounding is off by at most u = 2^-8 = 3.9e-3
# (relative), and independent roundings add up like a random walk, so after the ~30-60 roundings on the
# path through these 2-layer models (projections, attention, norms, residual sums) the relative error of
# the logits is about u * sqrt(60) = 3e-2 at worst; we allow that (measured: 4e-3 to 8e-3).
BF16_REL = 3e-2
# int8: per output channel the weight step is max|w| / 127, so each weight is off by up to half a step,
# uniformly: relative to the row's rms that is (max/rms) / (127 * sqrt(12)) ~ 3.5 / 440 = 8e-3; activations
# are quantised per token the same way, so each linear layer adds ~sqrt(2) * 8e-3 = 1.1e-2. About 12
# linear layers lie in series on the decoder's path (attention in/out projections twice, feed-forward
# twice, per layer, plus the output), giving 1.1e-2 * sqrt(12) ~ 4e-2; we allow 5e-2 (measured: 7e-3 to
# 1.3e-2).
INT8_REL = 5e-2
REL = {"fp32": 0.0, "bf16": BF16_REL, "int8": INT8_REL}


def rel_error(a: torch.Tensor, b: torch.Tensor) -> float:
    """Relative Frobenius distance |a - b| / |b|, in float64."""
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm())


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """One small trained checkpoint per family (about 2 s on a quiet 2-core CPU)."""
    root = tmp_path_factory.mktemp("precision")
    (root / "pairs.tsv").write_text("".join(f"{s}\t{t}\n" for s, t in zip(SOURCES, TARGETS, strict=True)))
    (root / "reviews.jsonl").write_text(
        "".join(json.dumps({"text": t, "label": y}) + "\n" for t, y in REVIEWS)
    )
    (root / "text.txt").write_text(TEXT)
    runs = {
        "translation": [
            f"data.train=['{root}/pairs.tsv']",
            f"data.valid=['{root}/pairs.tsv']",
            "data.tokenizer=word",
            "train.epochs=40",
            "train.eval_every_epochs=40",
            "train.lr=0.003",
            "train.warmup_steps=20",
            "train.batch_tokens=400",
            "model.dropout=0.0",
        ],
        "classification": [
            f"data.train=['{root}/reviews.jsonl']",
            f"data.valid=['{root}/reviews.jsonl']",
            "data.tokenizer=word",
            "train.epochs=30",
            "train.eval_every_epochs=30",
            "train.lr=0.003",
            "train.warmup_steps=5",
            "model.dropout=0.0",
        ],
        "lm": [
            f"data.train=['{root}/text.txt']",
            "data.tokenizer=char",
            "data.valid_fraction=0.2",
            "model.max_seq_len=32",
            "train.max_steps=150",
            "train.epochs=1000",
            "train.eval_every_epochs=1000",
            "train.batch_size=8",
            "train.lr=0.01",
            "train.warmup_steps=5",
        ],
    }
    out = {}
    threads = torch.get_num_threads()
    # Models this small are all per-operation overhead: one thread avoids OpenMP synchronisation, which
    # costs more than it saves here (and a lot on a loaded machine).
    torch.set_num_threads(1)
    try:
        for task, overrides in runs.items():
            config = apply_overrides(RunConfig(task=task), [*TINY, *overrides])
            out[task] = train(config, root / task, progress=False).checkpoint
    finally:
        torch.set_num_threads(threads)
    out["root"] = root
    return out


def _load(checkpoints, task):
    return {p: load_predictor(checkpoints[task], precision=p) for p in PRECISIONS}


def test_translator_logits_close_and_greedy_translations_equal(checkpoints):
    models = _load(checkpoints, "translation")
    ref = models["fp32"]
    src = pad(ref.encode(SOURCES), ref.src_tok.pad_id)
    tgt = pad([[ref.tgt_tok.bos_id, *row] for row in ref.tgt_tok.encode_batch(TARGETS)], ref.tgt_tok.pad_id)
    with torch.no_grad():
        logits = {p: m.model(src, tgt).logits for p, m in models.items()}
    assert logits["bf16"].dtype == torch.bfloat16 and logits["int8"].dtype == torch.float32
    for p in ("bf16", "int8"):
        assert rel_error(logits[p], logits["fp32"]) < REL[p], p
    greedy = {p: m.translate(SOURCES, beam_size=1) for p, m in models.items()}
    assert greedy["fp32"] == TARGETS  # the model learned the task, so the comparison means something
    assert greedy["bf16"] == greedy["fp32"] and greedy["int8"] == greedy["fp32"]
    assert models["bf16"].translate(SOURCES[:8], beam_size=3) == TARGETS[:8]


def test_classifier_probabilities_close_and_labels_equal(checkpoints):
    models = _load(checkpoints, "classification")
    texts = [t for t, _ in REVIEWS]
    probs = {p: m.probabilities(texts) for p, m in models.items()}
    # probabilities in [0, 1]: the logit error (relative, above) times the largest logit bounds their change
    for p in ("bf16", "int8"):
        assert probs[p].dtype == torch.float32
        assert (probs[p] - probs["fp32"]).abs().max() < REL[p], p
    labels = {p: [label for label, _ in m.predict(texts)] for p, m in models.items()}
    assert labels["fp32"] == [y for _, y in REVIEWS]
    assert labels["bf16"] == labels["fp32"] and labels["int8"] == labels["fp32"]


def test_lm_logits_perplexity_and_greedy_generation(checkpoints):
    models = _load(checkpoints, "lm")
    ids = torch.tensor([models["fp32"].tok.encode(TEXT[:32])])
    with torch.no_grad():
        logits = {p: m.model(ids).logits for p, m in models.items()}
    for p in ("bf16", "int8"):
        assert rel_error(logits[p], logits["fp32"]) < REL[p], p
    from tformer.tasks.lm import mean_nll

    stream = torch.tensor(models["fp32"].tok.encode(TEXT[:400]))
    nll = {p: mean_nll(m.model, stream) for p, m in models.items()}
    assert nll["fp32"] < 0.5
    for p in ("bf16", "int8"):  # perplexity within the same relative tolerance
        assert abs(math.exp(nll[p]) / math.exp(nll["fp32"]) - 1) < REL[p], (p, nll)
    text = {p: m.generate("the cat", greedy=True, max_new_tokens=40) for p, m in models.items()}
    assert text["fp32"].startswith(" sat on the mat.")
    assert text["bf16"] == text["fp32"] and text["int8"] == text["fp32"]


def test_bf16_kv_caches_stay_bf16_and_match_the_full_pass(checkpoints):
    gen = TextGenerator.load(checkpoints["lm"], precision="bf16")
    ids = torch.tensor([gen.tok.encode(TEXT[:20])])
    with torch.no_grad():
        full = gen.model(ids).logits
        out = gen.model(ids[:, :12], use_cache=True)
        steps = [out.logits]
        for i in range(12, 20):
            out = gen.model(ids[:, i : i + 1], cache=out.cache)
            steps.append(out.logits)
    assert out.cache is not None and all(kv.k.dtype == torch.bfloat16 for kv in out.cache.kv)
    # cached and full passes round differently in bfloat16: the same tolerance as against float32
    assert rel_error(torch.cat(steps, 1), full) < BF16_REL
    tr = Translator.load(checkpoints["translation"], precision="bf16")
    src = pad(tr.encode(SOURCES[:4]), tr.src_tok.pad_id)
    with torch.no_grad():
        memory, memory_mask, _ = tr.model.encode(src)
        cache = tr.model.start_cache(memory, memory_mask)
        step = tr.model.decode_step(torch.full((4, 1), tr.tgt_tok.bos_id), cache)
    assert step.cache is not None
    assert all(kv.k.dtype == torch.bfloat16 for kv in [*step.cache.cross_kv, *step.cache.self_kv] if kv)


@pytest.mark.parametrize("backend", ["math", "sdpa", "chunked", "local"])
def test_bf16_attention_masks(backend):
    """Padding, causal and fully masked rows in bfloat16: close to float32, zeros (not NaN) for empty rows."""
    torch.manual_seed(0)
    mha = MultiHeadAttention(32, 4, backend=backend, backend_options={"window": 4}).eval()
    x = torch.randn(3, 9, 32)
    mask = torch.ones(3, 1, 1, 9, dtype=torch.bool)
    mask[1, ..., 6:] = False
    mask[2] = False
    with torch.no_grad():
        ref = mha(x, mask=mask, causal=True).out
        out = apply_precision(mha, "bf16")(x.bfloat16(), mask=mask, causal=True).out
    assert out.dtype == torch.bfloat16 and not out.isnan().any()
    # the empty row's output is out_proj's bias alone, as in float32
    torch.testing.assert_close(out[2].float(), ref[2], atol=1e-2, rtol=0)
    assert rel_error(out, ref) < BF16_REL


def test_precision_errors(checkpoints, monkeypatch):
    with pytest.raises(ValueError, match="precision 'fp16' is not one of fp32, bf16, int8"):
        TextClassifier.load(checkpoints["classification"], precision="fp16")
    bf16 = TextClassifier.load(checkpoints["classification"], precision="bf16").model
    with pytest.raises(ValueError, match="'int8' quantises a float32 model"):
        apply_precision(bf16, "int8")
    monkeypatch.setitem(sys.modules, "torchao.quantization", None)  # as if torchao were not installed
    with pytest.raises(
        RuntimeError, match=r"needs the optional dependency torchao: pip install 'tformer\[quant\]'"
    ):
        TextClassifier.load(checkpoints["classification"], precision="int8")


@pytest.mark.parametrize("precision", ["bf16", "int8"])
def test_cli_predict_and_eval_with_precision(checkpoints, precision, capsys):
    def run(argv):
        code = main([*argv, "--precision", precision])
        out = capsys.readouterr()
        assert code == 0, out.err
        return out.out

    root = checkpoints["root"]
    out = run(["translate", str(checkpoints["translation"]), "--beam", "1", SOURCES[0], SOURCES[9]])
    assert out.splitlines() == [TARGETS[0], TARGETS[9]]
    out = run(["eval", str(checkpoints["translation"]), "--data", str(root / "pairs.tsv"), "--beam", "1"])
    assert "exact_match: 1.0000" in out
    out = run(["classify", str(checkpoints["classification"]), "great fun", "hated it"])
    assert [line.split("\t")[0] for line in out.splitlines()] == ["pos", "neg"]
    out = run(["eval", str(checkpoints["classification"]), "--data", str(root / "reviews.jsonl")])
    assert "accuracy: 1.0000" in out
    out = run(
        ["generate", str(checkpoints["lm"]), "--prompt", "the cat", "--greedy", "--max-new-tokens", "16"]
    )
    assert out.startswith("the cat sat on the mat.")
    out = run(["eval", str(checkpoints["lm"]), "--data", str(root / "text.txt")])
    assert float(out.split("perplexity:")[1].split()[0]) < 1.7
