"""A checkpoint saved by tformer <= 0.2, whose state-dict keys name the modules as they were then (a Seq2Seq's
decoder_layers.N.*, decoder_norm.*, tgt_embed.*, positions.*; the LM's stack decoder.*), loads with today's
loaders and predicts exactly what the same weights predict under today's names (issue 15, item 3).

The old checkpoints are written here: a model built today, its state dict renamed back by the table below
(written out by hand, not taken from tformer), saved through save_checkpoint as a full state dict, so tied
names are dropped as tformer 0.2 dropped them (safetensors keeps the first name of each shared tensor).
"""

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from support.jobs import run_job, weights_of
from support.models import classifier, generator, save_classifier, save_translator, translator
from tformer.tasks import TextClassifier, TextGenerator, Translator, load_predictor
from tformer.training.checkpoint import WEIGHTS, load_trainer_state, save_checkpoint, write_state
from tformer.training.checkpoint import read_config as read_checkpoint_config

# today's prefix -> tformer 0.2's, per family; the first that matches applies
OLD_PREFIXES = {
    "translation": [
        ("decoder.layers.", "decoder_layers."),
        ("decoder.norm.", "decoder_norm."),
        ("decoder.embed.", "tgt_embed."),
        ("decoder.positions.", "positions."),
    ],
    "lm": [("blocks.", "decoder.")],
    "classification": [],  # its keys never changed: the test shows they still load
}


def old_name(key: str, family: str) -> str:
    for new, old in OLD_PREFIXES[family]:
        if key.startswith(new):
            return old + key[len(new) :]
    return key


def rewrite_as_old(path: Path, model: torch.nn.Module, family: str) -> None:
    """Replace the checkpoint's weights with the same tensors under tformer 0.2's names."""
    state = {old_name(k, family): v for k, v in model.state_dict().items()}
    raw = read_checkpoint_config(path)
    raw.pop("tformer_version", None)
    tokenizers = {
        f.name: f.read_bytes()
        for f in path.iterdir()
        if f.name.endswith(".json") and f != path / "config.json"
    }

    def write_extra(d: Path) -> None:
        for name, data in tokenizers.items():
            (d / name).write_bytes(data)

    save_checkpoint(path, model=model, config=raw, write_extra=write_extra, weights=state)


def _predictions(p: Translator | TextClassifier | TextGenerator):
    """Logits on a fixed input and the predictor's own output, for exact comparison."""
    with torch.no_grad():
        if isinstance(p, Translator):
            src = torch.tensor([p.src_tok.encode("le chat noir dort")])
            tgt = torch.tensor([[p.tgt_tok.bos_id, *p.tgt_tok.encode("the black cat")]])
            return p.model(src, tgt).logits, p.translate(
                ["le chat noir dort", "la maison est grande"], beam_size=3
            )
        if isinstance(p, TextClassifier):
            ids = torch.tensor([[p.tok.bos_id, *p.tok.encode("the black cat sleeps")]])
            return p.model(ids).logits, p.predict(["the black cat sleeps", "a white dog"])
        ids = torch.tensor([p.tok.encode("the house")])
        return p.model(ids).logits, p.generate("the house", max_new_tokens=12, greedy=True)


def _today(family: str, **overrides: object):
    if family == "translation":
        t = translator(seed=5, **overrides)
        return t, lambda path: save_translator(t, path)
    if family == "classification":
        c = classifier(seed=5, **overrides)
        return c, lambda path: save_classifier(c, path)
    g = generator(seed=5)

    def save(path: Path) -> Path:
        config = {"task": "lm", "model": g.model.config.to_dict()}
        return save_checkpoint(
            path, model=g.model, config=config, write_extra=lambda d: g.tok.save(d / "tokenizer.json")
        )

    return g, save


CASES = [
    ("translation", {}),  # tied output: tformer 0.2 kept output.weight, not tgt_embed.weight
    ("translation", {"positions": "learned", "final_norm": True, "tie_output": False}),
    ("lm", {}),
    ("classification", {}),
]


@pytest.mark.parametrize(("family", "overrides"), CASES)
def test_an_old_layout_checkpoint_loads_and_predicts_the_same(tmp_path, family, overrides):
    today, save = _today(family, **overrides)
    path = save(tmp_path / "ckpt")
    want = _predictions(load_predictor(path))
    rewrite_as_old(path, today.model, family)
    saved = set(load_file(str(path / WEIGHTS)))
    if family == "translation":
        assert any(k.startswith("decoder_layers.") for k in saved)
        assert not any(k.startswith("decoder.") for k in saved)
        if "positions" in overrides:
            assert {"positions.table", "decoder_norm.weight", "tgt_embed.weight"} <= saved
    if family == "lm":
        assert "decoder.layers.0.self_attn.in_proj.weight" in saved
        assert not any(k.startswith("blocks.") for k in saved)
    old = load_predictor(path)
    logits, output = _predictions(old)
    assert torch.equal(logits, want[0])
    assert output == want[1]
    for key, value in today.model.state_dict().items():  # every tensor, tied ones too, where it belongs
        assert torch.equal(old.model.state_dict()[key], value), key
    assert type(old).load(path).model.state_dict().keys() == today.model.state_dict().keys()


def test_a_run_saved_in_the_old_layout_resumes_exactly(tmp_path):
    """The trainer's resume path: weights and the optimiser's moments (keyed by parameter name) saved under
    tformer 0.2's names, resumed, end bit for bit where an uninterrupted run ends."""
    straight = tmp_path / "straight"
    run_job(str(straight), 4)
    out = tmp_path / "run"
    run_job(str(out), 2, save_every_steps=2)
    ckpt = (out / "checkpoint").resolve()
    weights = load_file(str(ckpt / WEIGHTS))
    save_file({old_name(k, "translation"): v for k, v in weights.items()}, str(ckpt / WEIGHTS))
    state = load_trainer_state(ckpt)
    opt = state["optimizer"]
    opt["state"] = {old_name(k, "translation"): v for k, v in opt["state"].items()}
    for group in opt["param_groups"]:
        group["params"] = [old_name(n, "translation") for n in group["params"]]
    assert any(k.startswith("decoder_layers.") for k in opt["state"])
    write_state(ckpt, state)
    run_job(str(out), 4, resume=True, save_every_steps=2)
    a, b = weights_of(out), weights_of(straight)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
