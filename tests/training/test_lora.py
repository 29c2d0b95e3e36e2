"""LoRA (issue 17, item 4) through Hugging Face peft: peft wraps tformer's own nn.Linear projections on a
plain module; rank-r adapters start equal to the base model (logits identical) and merge to the same
function (float64, 1e-6) with the base's state-dict keys; training moves only the adapters and the head;
adapter-only checkpoints record the base (path, sha256), reload through every predictor and refuse a
different base; resume is bit-exact; EMA, keep_best, average, accel, bf16 and activation checkpointing work
with it; `tformer merge` writes a checkpoint that loads with no peft installed; the config errors."""

from __future__ import annotations

import hashlib
import json
import re
import sys
from pathlib import Path

import peft
import pytest
import torch
from safetensors.torch import load_file

from support.models import ENGLISH, classifier, generator, save_classifier, translator
from tformer.cli import main
from tformer.config import ClassifierConfig, ConfigError, DataConfig, RunConfig, TrainConfig, VisionConfig
from tformer.models.vit import VisionTransformer
from tformer.pipeline import train
from tformer.tasks import open_predictor
from tformer.training import distributed, lora, run_dir
from tformer.training.checkpoint import CheckpointError
from tformer.training.trainer import Trainer

pytestmark = pytest.mark.usefixtures("one_thread")

TEXTS = [*ENGLISH, "the cat runs", "a dog sleeps in the house", "the red garden is big", "a white carpet"]


def _family_model(family: str) -> tuple[torch.nn.Module, tuple[torch.Tensor, ...]]:
    """A small random model of `family` and inputs for it."""
    g = torch.Generator().manual_seed(5)
    if family == "translation":
        model: torch.nn.Module = translator(seed=1).model
        return model, (torch.randint(4, 12, (2, 7), generator=g), torch.randint(4, 12, (2, 5), generator=g))
    if family == "classification":
        return classifier(seed=1).model, (torch.randint(4, 12, (3, 9), generator=g),)
    if family == "lm":
        return generator(seed=1).model, (torch.randint(4, 12, (2, 11), generator=g),)
    torch.manual_seed(1)
    config = VisionConfig(image_size=8, patch_size=4, channels=3, d_model=16, n_heads=2, d_ff=32, n_layers=2)
    return VisionTransformer(config), (torch.randn(3, 3, 8, 8, generator=g),)


def _adaptation(model: torch.nn.Module, family: str, rank: int = 4) -> lora.Adaptation:
    targets = lora.match_targets(model, lora.DEFAULT_TARGETS.get(family, lora.ATTENTION_FFN))
    return lora.Adaptation(rank, 8.0, 0.0, targets, lora.FULL.get(family, ()), "test", "test", "0" * 64)


FAMILIES = ["translation", "classification", "lm", "vision"]


def test_peft_wraps_tformer_linear_modules_on_a_plain_module():
    model = classifier(seed=1).model
    names = lora.match_targets(model, ("in_proj", "out_proj", "ff.linear*"))
    assert len(names) == 8 and "head" not in names  # 2 layers x (in_proj, out_proj, linear1, linear2)
    same = peft.inject_adapter_in_model(peft.LoraConfig(r=2, target_modules=list(names)), model)
    assert same is model  # in place: no PeftModel / PreTrainedModel around it
    wrapped = [n for n, m in model.named_modules() if isinstance(m, peft.tuners.lora.LoraLayer)]
    assert tuple(wrapped) == names
    trainable = sorted(n for n, p in model.named_parameters() if p.requires_grad)
    assert trainable == sorted(f"{n}.lora_{ab}.default.weight" for n in names for ab in "AB")


@pytest.mark.parametrize("family", FAMILIES)
def test_rank_r_adapters_start_equal_to_the_base_model(family):
    model, inputs = _family_model(family)
    model.eval()
    with torch.no_grad():
        before = model(*inputs).logits
        lora.inject(model, _adaptation(model, family))
        after = model(*inputs).logits
    assert torch.equal(before, after)  # B = 0: exactly the base's function
    a_weights = [p for n, p in model.named_parameters() if ".lora_A." in n]
    b_weights = [p for n, p in model.named_parameters() if ".lora_B." in n]
    assert a_weights and len(a_weights) == len(b_weights) == len(lora.adapted(model).targets)
    assert all(bool(p.abs().sum() > 0) for p in a_weights) and all(not p.any() for p in b_weights)


@pytest.mark.parametrize("family", FAMILIES)
def test_merged_model_equals_the_adapted_one_with_the_base_keys(family):
    model, inputs = _family_model(family)
    base_keys = list(model.state_dict())
    model.double().eval()
    x = tuple(t.double() if t.is_floating_point() else t for t in inputs)
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        base = model(*x).logits
        lora.inject(model, _adaptation(model, family))
        model.double()
        for name, p in model.named_parameters():
            if ".lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64) * 0.3)
        adapted = model(*x).logits
        assert (adapted - base).abs().max() > 1e-3  # the adapters change the function
        lora.merge(model)
        merged = model(*x).logits
    torch.testing.assert_close(merged, adapted, atol=1e-6, rtol=0)
    assert list(model.state_dict()) == base_keys
    assert lora.adapted(model) is None and all(p.requires_grad for p in model.parameters())
    assert not any(isinstance(m, peft.tuners.lora.LoraLayer) for m in model.modules())


def test_accel_linear_layers_are_adapted_too():
    from tformer import accel
    from tformer.accel.linear import AccelLinear

    model, (ids,) = _family_model("lm")
    accel.apply(model, measure=False)
    assert isinstance(model.get_submodule("blocks.layers.0.self_attn.in_proj"), AccelLinear)
    with torch.no_grad():
        before = model.eval()(ids).logits
    lora.inject(model, _adaptation(model, "lm"))
    with torch.no_grad():
        assert torch.equal(model(ids).logits, before)
    model.train()
    model(ids).logits.sum().backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert grads and all(".lora_" in n for n in grads)


# --- through the trainer --------------------------------------------------------------------------------


def _files(tmp_path: Path, seed: int = 0) -> tuple[Path, Path]:
    """A classification checkpoint (the base) and a labelled file of its vocabulary."""
    base = save_classifier(classifier(seed=seed), tmp_path / f"base{seed}")
    rows = ["text\tlabel"] + [f"{t}\t{['neg', 'pos'][i % 2]}" for i, t in enumerate(TEXTS)]
    data = tmp_path / "data.tsv"
    data.write_text("\n".join(rows) + "\n")
    return base, data


def _sha(checkpoint: Path) -> str:
    return hashlib.sha256((checkpoint / "model.safetensors").read_bytes()).hexdigest()


def _config(base: Path, data: Path, **train_kw: object) -> RunConfig:
    kw: dict[str, object] = dict(
        init_from=str(base),
        lora_rank=4,
        lora_alpha=8.0,
        epochs=100,
        max_steps=4,
        lr=2e-2,
        warmup_steps=0,
        schedule="constant",
        log_every=1,
        save_every_steps=None,
        precision="fp32",
        seed=3,
    )
    return RunConfig(
        task="classification",
        model=ClassifierConfig(max_seq_len=16, dropout=0.0),
        train=TrainConfig(**{**kw, **train_kw}),
        data=DataConfig(train=(str(data),), valid=(str(data),)),
    )


def test_training_moves_only_the_adapters_and_the_head(tmp_path):
    base, data = _files(tmp_path)
    result = train(_config(base, data), tmp_path / "run", progress=False)
    ckpt = run_dir.latest(tmp_path / "run")
    saved = load_file(str(ckpt / "model.safetensors"))
    targets = lora.adapted(result.model).targets
    assert set(saved) == {f"{t}.lora_{ab}.default.weight" for t in targets for ab in "AB"} | {
        "head.weight",
        "head.bias",
    }
    section = json.loads((ckpt / "config.json").read_text())["lora"]
    assert section["base"] == str(base.resolve()) and section["init_from"] == str(base)
    assert section["sha256"] == _sha(base)
    trainable = sum(t.numel() for t in saved.values())
    assert section["trainable_parameters"] == trainable < section["parameters"]
    first = json.loads((tmp_path / "run" / "log.jsonl").read_text().splitlines()[0])
    assert first["type"] == "lora" and first["trainable_share"] == trainable / section["parameters"]
    base_state = load_file(str(base / "model.safetensors"))
    frozen = [(n, p) for n, p in result.model.named_parameters() if not p.requires_grad]
    assert len(frozen) == len(base_state) - 2  # every base tensor but the head's
    for name, p in frozen:
        assert torch.equal(p, base_state[name.replace(".base_layer", "")]), name
    assert all(saved[k].any() for k in saved if ".lora_B." in k)  # the adapters moved from zero


def test_an_adapter_checkpoint_predicts_as_the_trained_model_and_refuses_another_base(tmp_path, capsys):
    base, data = _files(tmp_path)
    result = train(_config(base, data), tmp_path / "run", progress=False)
    from tformer.tasks.classification import TextClassifier

    trained = TextClassifier(result.model, result.task.tok, result.task.labels)
    predictor = open_predictor(tmp_path / "run")
    assert lora.adapted(predictor.model) is None  # merged into the base: a plain model
    torch.testing.assert_close(
        predictor.probabilities(TEXTS), trained.probabilities(TEXTS), atol=1e-6, rtol=0
    )
    assert main(["classify", str(tmp_path / "run"), "the cat runs"]) == 0
    assert main(["eval", str(tmp_path / "run"), "--data", str(data)]) == 0
    old = _sha(base)
    save_classifier(classifier(seed=7), base)  # another model at the base's path
    new = _sha(base)
    with pytest.raises(
        CheckpointError, match=f"trained on {re.escape(str(base.resolve()))} with sha256 {old}.*sha256 {new}"
    ):
        open_predictor(tmp_path / "run")


def _adapters(run: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run_dir.latest(run) / "model.safetensors"))


def _records(run: Path) -> list[dict[str, object]]:
    noisy = ("time", "eval_seconds", "tokens_per_s", "peak_rss_bytes")
    lines = (run / "log.jsonl").read_text().splitlines()
    return [{k: v for k, v in json.loads(line).items() if k not in noisy} for line in lines]


def test_resume_equals_an_uninterrupted_run_bit_for_bit_and_refuses_another_base(tmp_path, capsys):
    base, data = _files(tmp_path)
    other, _ = _files(tmp_path, seed=1)
    kw = dict(lora_dropout=0.1, eval_every_epochs=2)
    train(_config(base, data, max_steps=8, **kw), tmp_path / "straight", progress=False)
    train(_config(base, data, max_steps=4, **kw), tmp_path / "halves", progress=False)
    names = rf"trained on {re.escape(str(base.resolve()))} \(sha256 {_sha(base)}\); this run's base is {re.escape(str(other.resolve()))} \(sha256 {_sha(other)}\)"
    with pytest.raises(CheckpointError, match=names):
        train(_config(other, data, max_steps=8, **kw), tmp_path / "halves", resume=True, progress=False)
    capsys.readouterr()
    train(_config(base, data, max_steps=8, **kw), tmp_path / "halves", resume=True, progress=False)
    assert "resumed at step 4" in capsys.readouterr().err
    a, b = _adapters(tmp_path / "straight"), _adapters(tmp_path / "halves")
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
    assert _records(tmp_path / "straight") == _records(tmp_path / "halves")


def test_an_adapter_checkpoint_as_init_from_gives_its_merged_model(tmp_path):
    from tformer.interop.init_from import start

    base, data = _files(tmp_path)
    train(_config(base, data), tmp_path / "run", progress=False)
    merged = open_predictor(tmp_path / "run").model.state_dict()
    begun = start(str(tmp_path / "run"), "classification")  # the next run starts from the adapted model
    assert set(begun.state) == {k for k in merged if k.startswith("encoder.")}
    assert all(torch.equal(begun.state[k], merged[k]) for k in begun.state)
    assert any(
        not torch.equal(begun.state[k], v)
        for k, v in load_file(str(base / "model.safetensors")).items()
        if k in begun.state
    )


def test_activation_checkpointing_gives_the_same_adapters(tmp_path):
    base, data = _files(tmp_path)
    for on in (False, True):
        train(_config(base, data, checkpoint_activations=on), tmp_path / f"ckpt-{on}", progress=False)
    a, b = _adapters(tmp_path / "ckpt-False"), _adapters(tmp_path / "ckpt-True")
    assert all(torch.allclose(a[k], b[k], atol=1e-6, rtol=0) for k in a)


def test_ema_keep_best_average_accel_and_bf16_keep_checkpoints_adapter_only(tmp_path):
    base, data = _files(tmp_path)
    config = _config(base, data, precision="bf16", ema=0.5, keep_best="accuracy", keep_checkpoints=3)
    train(config, tmp_path / "run", progress=False, accel=True)
    ckpt = run_dir.latest(tmp_path / "run")
    weights, ema = (load_file(str(ckpt / n)) for n in ("model.safetensors", "ema.safetensors"))
    assert set(ema) == set(weights) and any(not torch.equal(ema[k], weights[k]) for k in ema)
    assert (tmp_path / "run" / run_dir.BEST).exists()
    assert main(["average", str(tmp_path / "run"), "--last", "2", str(tmp_path / "avg")]) == 0
    assert main(["average", str(ckpt), str(tmp_path / "ema"), "--ema"]) == 0
    for out in ("avg", "ema"):
        assert set(load_file(str(tmp_path / out / "model.safetensors"))) == set(weights)
        assert open_predictor(tmp_path / out).predict(["the cat runs"])[0][0] in ("neg", "pos")


def test_merge_writes_the_base_keys_and_loads_without_peft(tmp_path, monkeypatch):
    base, data = _files(tmp_path)
    train(_config(base, data), tmp_path / "run", progress=False)
    expected = open_predictor(tmp_path / "run").probabilities(TEXTS)
    assert main(["merge", str(tmp_path / "run"), "--out", str(tmp_path / "merged")]) == 0
    assert main(["merge", str(tmp_path / "run"), "--out", str(tmp_path / "merged")]) == 2  # no --overwrite
    merged = load_file(str(tmp_path / "merged" / "model.safetensors"))
    assert sorted(merged) == sorted(load_file(str(base / "model.safetensors")))
    config = json.loads((tmp_path / "merged" / "config.json").read_text())
    assert "lora" not in config and config["merged_from"]["base"] == str(base.resolve())
    monkeypatch.setitem(sys.modules, "peft", None)  # `import peft` raises ImportError from here on
    with pytest.raises(ImportError):
        import peft as _  # noqa: F401
    got = open_predictor(tmp_path / "merged").probabilities(TEXTS)
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=0)
    with pytest.raises(ConfigError, match=r"need Hugging Face peft: pip install 'tformer\[lora\]'"):
        open_predictor(tmp_path / "run")
    with pytest.raises(CheckpointError, match="not an adapter checkpoint"):
        lora.merge_checkpoint(tmp_path / "merged", tmp_path / "again")


# --- errors ---------------------------------------------------------------------------------------------


def test_a_target_matching_nothing_names_the_pattern_and_the_layers():
    model = classifier(seed=1).model
    with pytest.raises(
        ConfigError,
        match=r"'attn\.wq' matches no linear layer of the Classifier; its linear layers are "
        r"encoder\.layers\.\*\.self_attn\.in_proj, encoder\.layers\.\*\.self_attn\.out_proj, "
        r"encoder\.layers\.\*\.ff\.linear1, encoder\.layers\.\*\.ff\.linear2, head$",
    ):
        lora.match_targets(model, ("in_proj", "attn.wq"))
    with pytest.raises(ConfigError, match=r"'output''s weight is tied \("):
        lora.match_targets(generator(seed=1).model, ("output",))
    assert lora.match_targets(model, ("encoder.layers.1.*",)) == tuple(
        f"encoder.layers.1.{n}"
        for n in ("self_attn.in_proj", "self_attn.out_proj", "ff.linear1", "ff.linear2")
    )


@pytest.mark.parametrize(
    ("config", "message"),
    [
        (
            lambda: RunConfig(
                task="classification",
                model=ClassifierConfig(architecture="cnn"),
                train=TrainConfig(lora_rank=8, init_from="x"),
            ),
            r"model.architecture = 'cnn' is a baseline",
        ),
        (lambda: TrainConfig(lora_rank=-1), r"lora_rank must be >= 0"),
        (lambda: TrainConfig(lora_rank=4, lora_dropout=1.0), r"lora_dropout must be in \[0, 1\)"),
        (lambda: TrainConfig(lora_rank=4, lora_alpha=0.0), r"lora_alpha must be > 0"),
        (lambda: TrainConfig(lora_rank=4, lora_targets=("in_proj", " ")), r"a pattern is empty"),
    ],
)
def test_lora_settings_are_checked(config, message):
    with pytest.raises(ConfigError, match=message):
        config()


def test_lora_without_init_from_is_refused_when_the_run_starts(tmp_path):
    _, data = _files(tmp_path)
    config = RunConfig(
        task="classification",
        model=ClassifierConfig(max_seq_len=16),
        train=TrainConfig(lora_rank=8, max_steps=1),  # valid as a file that leaves init_from to an override
        data=DataConfig(train=(str(data),), valid=(str(data),)),
    )
    with pytest.raises(
        ConfigError, match=r"lora_rank = 8 adapts pretrained weights: it needs train.init_from"
    ):
        train(config, tmp_path / "run", progress=False)


def test_lora_off_is_a_plain_run():
    assert not TrainConfig(lora_rank=0).lora and not TrainConfig().lora and TrainConfig(lora_rank=2).lora
    RunConfig(task="lm", train=TrainConfig(lora_rank=0))  # off: no init_from needed


def test_lora_with_fsdp_is_refused_at_startup(tmp_path, monkeypatch):
    from support.models import build

    task, model = build("classification", max_steps=2)
    lora.inject(model, _adaptation(model, "classification"))
    monkeypatch.setattr(distributed, "is_sharded", lambda m: True)
    with pytest.raises(ConfigError, match="train.lora_rank with train.parallel = 'fsdp'"):
        Trainer(model, task, task.train_config, out_dir=tmp_path, progress=False)
