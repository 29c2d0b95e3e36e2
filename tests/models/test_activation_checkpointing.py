"""Activation checkpointing (issue 17, item 5; models/checkpointing.py): with it every family's loss and
every parameter's gradient equal those without it (float32, dropout > 0 on the same seed: the recomputation
draws the same masks), each layer's forward runs a second time in backward (so it did recompute), eval,
no-grad inference and KV-cached decoding are untouched, the state-dict keys stay, and the Trainer with
train.checkpoint_activations = true trains as without it; the RNN / CNN baselines are refused."""

from __future__ import annotations

import copy
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from support.images import tiny_vision
from support.models import build
from tformer.config import ClassifierConfig, ConfigError, LMConfig, ModelConfig
from tformer.inference.decoding import greedy_decode
from tformer.models import Classifier, LanguageModel, Seq2Seq, build_model
from tformer.models.checkpointing import set_activation_checkpointing
from tformer.models.image_cnn import ImageCNN
from tformer.models.vit import VisionTransformer
from tformer.training.trainer import Trainer

pytestmark = pytest.mark.usefixtures("one_thread")

SMALL = dict(d_model=16, n_heads=2, d_ff=32, n_layers=2, dropout=0.2, attention_dropout=0.1, max_seq_len=12)
B, T, V = 3, 7, 13


def _ids(seed: int, high: int = V) -> Tensor:
    return torch.randint(1, high, (B, T), generator=torch.Generator().manual_seed(seed))


def _translation() -> tuple[nn.Module, Callable[[nn.Module], Tensor]]:
    model = Seq2Seq(ModelConfig(src_vocab_size=V, tgt_vocab_size=V, **SMALL))
    src, tgt = _ids(1), _ids(2)
    return model, lambda m: F.cross_entropy(m(src, tgt[:, :-1]).logits.flatten(0, 1), tgt[:, 1:].flatten())


def _classification() -> tuple[nn.Module, Callable[[nn.Module], Tensor]]:
    model = Classifier(ClassifierConfig(vocab_size=V, n_classes=3, **SMALL))
    ids, labels = _ids(3), torch.tensor([0, 2, 1])
    return model, lambda m: F.cross_entropy(m(ids).logits, labels)


def _lm() -> tuple[nn.Module, Callable[[nn.Module], Tensor]]:
    model = LanguageModel(LMConfig(vocab_size=V, **SMALL))
    ids = _ids(4)
    return model, lambda m: F.cross_entropy(m(ids[:, :-1]).logits.flatten(0, 1), ids[:, 1:].flatten())


def _vision() -> tuple[nn.Module, Callable[[nn.Module], Tensor]]:
    model = VisionTransformer(tiny_vision(dropout=0.2, attention_dropout=0.1))
    images = torch.randn(B, 1, 8, 8, generator=torch.Generator().manual_seed(5))
    labels = torch.tensor([0, 2, 1])
    return model, lambda m: F.cross_entropy(m(images).logits, labels)


FAMILIES = {"translation": _translation, "classification": _classification, "lm": _lm, "vision": _vision}


def _layers(model: nn.Module) -> list[nn.Module]:
    """Every Transformer layer of the model (the stacks' `layers` lists)."""
    return [layer for name, m in model.named_modules() if name.endswith("layers") for layer in m]


def _count_forwards(model: nn.Module) -> list[int]:
    """A list, one entry per layer, counting how often each layer's forward starts from now on (a pre-hook:
    a recomputation may stop early, before a forward hook would run)."""
    counts = [0] * len(_layers(model))
    for i, layer in enumerate(_layers(model)):
        layer.register_forward_pre_hook(lambda _m, _a, i=i: counts.__setitem__(i, counts[i] + 1))
    return counts


def _pair(family: str) -> tuple[nn.Module, nn.Module, Callable[[nn.Module], Tensor]]:
    torch.manual_seed(0)
    plain, loss = FAMILIES[family]()
    checkpointed = copy.deepcopy(plain)
    assert set_activation_checkpointing(checkpointed) == (2 if family == "translation" else 1)
    return plain, checkpointed, loss


@pytest.mark.parametrize("family", list(FAMILIES))
def test_same_loss_and_gradients_with_dropout_and_each_layer_recomputed(family):
    plain, checkpointed, loss_of = _pair(family)
    counts = {}
    losses = {}
    for name, model in (("plain", plain), ("checkpointed", checkpointed)):
        model.train()
        counts[name] = _count_forwards(model)
        torch.manual_seed(42)  # the same dropout masks, if the recomputation restores the RNG state
        loss = loss_of(model)
        after_forward = list(counts[name])
        loss.backward()
        losses[name] = loss.detach()
        assert after_forward == [1] * len(after_forward)
    assert counts["plain"] == [1] * len(counts["plain"])
    assert counts["checkpointed"] == [2] * len(counts["plain"])  # every layer ran again in backward
    torch.testing.assert_close(losses["checkpointed"], losses["plain"], rtol=1e-6, atol=0)
    grads = dict(plain.named_parameters())
    for name, p in checkpointed.named_parameters():
        assert p.grad is not None, name
        assert grads[name].grad is not None, name
        torch.testing.assert_close(p.grad, grads[name].grad, rtol=1e-6, atol=1e-9, msg=name)
    # the check has teeth: another seed draws other dropout masks and another loss
    torch.manual_seed(43)
    assert not torch.equal(loss_of(checkpointed).detach(), losses["plain"])


@pytest.mark.parametrize("family", list(FAMILIES))
def test_eval_and_no_grad_are_untouched_and_the_state_dict_keys_stay(family):
    plain, checkpointed, loss_of = _pair(family)
    assert list(checkpointed.state_dict()) == list(plain.state_dict())
    fresh, _ = FAMILIES[family]()
    fresh.load_state_dict(checkpointed.state_dict(), strict=True)
    counts = _count_forwards(checkpointed)
    plain.eval(), checkpointed.eval()
    assert torch.equal(loss_of(checkpointed), loss_of(plain))  # eval, with grad: no checkpoint
    checkpointed.train()
    with torch.no_grad():
        torch.manual_seed(1)
        want = loss_of(plain.train())
        torch.manual_seed(1)
        assert torch.equal(loss_of(checkpointed), want)  # training mode without grad: none either
    loss_of(checkpointed.eval()).backward()
    assert counts == [3] * len(counts)  # each layer ran once per call, never recomputed
    assert set_activation_checkpointing(checkpointed, False) and not any(
        getattr(m, "checkpoint_activations", False) for m in checkpointed.modules()
    )


def test_decoding_is_untouched():
    plain, checkpointed, _ = _pair("translation")
    plain.eval(), checkpointed.eval()
    src = _ids(6)
    want = greedy_decode(plain, src, bos_id=1, eos_id=2, max_len=8)
    got = greedy_decode(checkpointed, src, bos_id=1, eos_id=2, max_len=8)
    assert [h.tokens for h in got] == [h.tokens for h in want]
    # cached decoding in training mode with grad enabled: the decoder's layers run once, never recomputed
    bos = torch.ones(B, 1, dtype=torch.long)
    logits = {}
    for name, model in (("plain", plain), ("checkpointed", checkpointed)):
        model.train()
        counts = _count_forwards(model)
        torch.manual_seed(9)
        memory, mask, _ = model.encode(src)
        logits[name] = model.decode_step(bos, model.start_cache(memory, mask, capacity=4)).logits
        logits[name].sum().backward()
    assert counts == [2, 2, 1, 1]  # the encoder's layers recomputed in backward, the cached decoder's not
    assert torch.equal(logits["checkpointed"], logits["plain"])

    plain, checkpointed, _ = _pair("lm")
    ids = _ids(7)
    for name, model in (("plain", plain), ("checkpointed", checkpointed)):
        model.train()
        counts = _count_forwards(model)
        torch.manual_seed(9)
        logits[name] = model(ids, cache=model.new_cache(8)).logits  # the prompt pass of generation
        logits[name].sum().backward()
    assert counts == [1, 1]  # a cached pass is never recomputed
    assert torch.equal(logits["checkpointed"], logits["plain"])


def test_need_weights_in_training_returns_the_same_weights():
    plain, checkpointed, _ = _pair("classification")
    ids = _ids(8)
    torch.manual_seed(3)
    want = plain.train()(ids, need_weights=True)
    torch.manual_seed(3)
    got = checkpointed.train()(ids, need_weights=True)
    assert got.attention is not None and want.attention is not None
    for a, b in zip(got.attention, want.attention, strict=True):
        assert torch.equal(a, b)
    got.logits.sum().backward()


def _fit(tmp_path, family, on: bool):
    task, model = build(family, checkpoint_activations=on, max_steps=4, dropout=0.1, batch_size=8)
    history = Trainer(model, task, task.train_config, out_dir=tmp_path, progress=False).fit()
    return [r["loss"] for r in history if r["type"] == "train"], model


@pytest.mark.parametrize("family", ["translation", "classification", "lm"])
def test_trainer_with_checkpoint_activations_trains_as_without(tmp_path, family):
    losses_on, on = _fit(tmp_path / "on", family, True)
    losses_off, off = _fit(tmp_path / "off", family, False)
    assert len(losses_on) == 2  # log_every = 2 of 4 steps
    flags = [m.checkpoint_activations for m in on.modules() if hasattr(m, "checkpoint_activations")]
    assert flags and all(flags)  # the trainer switched every stack on
    assert not any(getattr(m, "checkpoint_activations", False) for m in off.modules())
    torch.testing.assert_close(torch.tensor(losses_on), torch.tensor(losses_off), rtol=1e-5, atol=0)
    weights = off.state_dict()
    for name, p in on.state_dict().items():
        torch.testing.assert_close(p, weights[name], rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.parametrize(
    "make",
    [
        lambda: ImageCNN(tiny_vision(architecture="cnn")),  # batch norm: recomputing would update it twice
        lambda: build_model(ClassifierConfig(architecture="cnn", vocab_size=V, n_classes=2)),
        lambda: build_model(ModelConfig(architecture="lstm", src_vocab_size=V, tgt_vocab_size=V, d_model=16)),
    ],
)
def test_the_baselines_are_refused_at_startup(tmp_path, make):
    task, _ = build("classification", checkpoint_activations=True)
    with pytest.raises(
        ConfigError, match=r"checkpoint_activations = true, but the model \(\w+\) has no Transformer"
    ):
        Trainer(make(), task, task.train_config, out_dir=tmp_path, progress=False)


def test_checkpointing_an_accel_model_whose_shapes_are_not_tuned_yet(tmp_path, monkeypatch):
    """accel's tuner times a layer's first training product (forward and backward) inside that layer's
    forward: under a checkpoint that timing keeps its own autograd graph (accel/plan.py), and the
    gradients equal the plain model's."""
    from tformer import accel

    monkeypatch.delenv("TFORMER_ACCEL", raising=False)
    monkeypatch.setenv("TFORMER_CACHE_DIR", str(tmp_path))  # an empty cache: the tuner measures here
    monkeypatch.setattr(accel, "_tuner", None)
    torch.manual_seed(0)
    plain = LanguageModel(LMConfig(vocab_size=V, d_model=24, n_heads=2, n_layers=2, d_ff=40, max_seq_len=40))
    checkpointed = copy.deepcopy(plain)
    accel.apply(plain), accel.apply(checkpointed)
    set_activation_checkpointing(checkpointed)
    ids = torch.randint(1, V, (4, 33), generator=torch.Generator().manual_seed(0))
    for model in (checkpointed, plain):  # checkpointed first: its forward is where the tuner measures
        model.train()
        torch.manual_seed(1)
        F.cross_entropy(model(ids[:, :-1]).logits.flatten(0, 1), ids[:, 1:].flatten()).backward()
    grads = dict(plain.named_parameters())
    for name, p in checkpointed.named_parameters():
        torch.testing.assert_close(p.grad, grads[name].grad, rtol=1e-6, atol=1e-9, msg=name)
