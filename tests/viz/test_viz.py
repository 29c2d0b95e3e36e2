"""`tformer viz`: attention maps equal torch's attention weights on the same inputs, for every kind, layer
and head of each family; PNGs and the HTML page carry them faithfully; the positional-encoding and
softmax-scale pictures and the numbers behind them; the command line."""

from __future__ import annotations

import json
import re
import warnings

import matplotlib.image
import numpy as np
import pytest
import torch
from torch import nn

from support import models as viz_models
from tformer.attention.multihead import MultiHeadAttention
from tformer.cli import main
from tformer.inference.decoding import beam_search, greedy_decode
from tformer.viz.attention import attention_maps, display_token, translation_maps, write_pngs
from tformer.viz.html import DIGITS, attention_html
from tformer.viz.pictures import (
    positional_encoding_png,
    softmax_jacobian_norm,
    softmax_saturation,
)

TEXT = "le chat noir dort sur le tapis rouge"
TARGET = "the black cat sleeps on the red carpet"


def _record_inputs(model: nn.Module) -> tuple[dict[MultiHeadAttention, tuple], list]:
    """Forward pre-hooks (removed by the caller) recording what each attention module is called with."""
    seen: dict[MultiHeadAttention, tuple] = {}
    handles = []
    for module in model.modules():
        if isinstance(module, MultiHeadAttention):

            def hook(mod, args, kwargs):
                seen[mod] = (args, kwargs)

            handles.append(module.register_forward_pre_hook(hook, with_kwargs=True))
    return seen, handles


def _torch_weights(ours: MultiHeadAttention, args: tuple, kwargs: dict) -> np.ndarray:
    """The same call through torch.nn.MultiheadAttention with our weights -> (H, T, S) float64."""
    ref = nn.MultiheadAttention(ours.d_model, ours.n_heads, batch_first=True).double()
    with torch.no_grad():
        weight, bias = ours.in_projection()
        ref.in_proj_weight.copy_(weight)
        ref.in_proj_bias.copy_(bias)
        ref.out_proj.weight.copy_(ours.out_proj.weight)
        ref.out_proj.bias.copy_(ours.out_proj.bias)
    x = args[0].double()
    memory = args[1].double() if len(args) > 1 and args[1] is not None else x
    t, s = x.shape[1], memory.shape[1]
    blocked = (
        torch.triu(torch.ones(t, s, dtype=torch.bool), 1) if kwargs.get("causal") else None
    )  # torch: True = not
    mask = kwargs.get("mask")
    key_padding = None if mask is None else ~mask.reshape(mask.shape[0], -1)[:, -s:]
    _, w = ref(x, memory, memory, attn_mask=blocked, key_padding_mask=key_padding, average_attn_weights=False)
    return w[0].detach().numpy()


def _modules(maps, model):
    """(kind, layer index) -> the attention module that produced it."""
    if maps.task == "translation":
        return {
            "encoder": [layer.self_attn for layer in model.encoder.layers],
            "decoder": [layer.self_attn for layer in model.decoder.layers],
            "cross": [layer.cross_attn for layer in model.decoder.layers],
        }
    stack = model.encoder if maps.task == "classification" else model.blocks
    return {maps.kinds[0].name: [layer.self_attn for layer in stack.layers]}


def _check_against_torch(predictor, text, **kwargs):
    model = predictor.model
    seen, handles = _record_inputs(model)
    try:
        maps = attention_maps(predictor, text, **kwargs)
    finally:
        for h in handles:
            h.remove()
    modules = _modules(maps, model)
    assert [k.name for k in maps.kinds] == list(modules)
    for kind in maps.kinds:
        assert len(kind.layers) == len(modules[kind.name]) == model.config.n_layers
        for n, (weights, module) in enumerate(zip(kind.layers, modules[kind.name], strict=True)):
            assert weights.shape == (model.config.n_heads, len(kind.query_tokens), len(kind.key_tokens))
            expected = _torch_weights(module, *seen[module])
            np.testing.assert_allclose(weights, expected, atol=2e-6, err_msg=f"{kind.name} layer {n + 1}")
            np.testing.assert_allclose(weights.sum(-1), 1.0, atol=1e-5)
    return maps


def test_translation_maps_are_torchs_weights_for_every_kind_layer_and_head():
    tr = viz_models.translator()
    maps = _check_against_torch(tr, TEXT, target=TARGET)
    source = [display_token(tr.src_tok.id_to_token(i)) for i in tr.src_tok.encode(TEXT)]
    target = [display_token(tr.tgt_tok.id_to_token(i)) for i in tr.tgt_tok.encode(TARGET)]
    enc, dec, cross = maps.kind("encoder"), maps.kind("decoder"), maps.kind("cross")
    assert enc.query_tokens == enc.key_tokens == cross.key_tokens == source
    # position i reads BOS + target[:i] and predicts target[i] (EOS last)
    assert dec.key_tokens == ["<bos>", *target] and dec.query_tokens == cross.query_tokens == [
        *target,
        "<eos>",
    ]
    for weights in dec.layers:  # causal: nothing above the diagonal
        assert np.all(np.triu(weights, 1) == 0)
    assert maps.info["target"].startswith("given") and maps.info["translation"] == TARGET
    assert maps.note == ""


@pytest.mark.parametrize("beam", [1, 4])
@pytest.mark.parametrize("text", ["le chat noir", "la maison est grande"])
def test_default_target_is_the_models_own_translation(beam, text):
    tr = viz_models.translator()
    maps = _check_against_torch(tr, text, beam_size=beam)
    src = torch.tensor(tr.encode([text]))
    t = tr.tgt_tok
    hyp = (
        greedy_decode(tr.model, src, bos_id=t.bos_id, eos_id=t.eos_id)[0]
        if beam == 1
        else beam_search(tr.model, src, bos_id=t.bos_id, eos_id=t.eos_id, beam_size=beam)[0][0]
    )
    expected = tr.translate([text], beam_size=beam)[0]
    assert t.decode(hyp.tokens) == expected
    assert maps.info["translation"] == (expected or "(empty: the model predicts EOS first)")
    # rows: one per generated token, plus the position that predicted EOS when the hypothesis ended
    assert len(maps.kind("cross").query_tokens) == len(hyp.tokens) + hyp.finished
    assert maps.kind("cross").query_tokens[-1] == (
        "<eos>" if hyp.finished else display_token(t.id_to_token(hyp.tokens[-1]))
    )


def test_classifier_and_lm_maps_are_torchs_weights():
    clf = viz_models.classifier()
    maps = _check_against_torch(clf, "the black cat")
    (kind,) = maps.kinds
    assert kind.name == "encoder" and kind.query_tokens == ["<bos>", "the", "black", "cat"]
    label, prob = clf.predict(["the black cat"])[0]
    assert maps.info["prediction"] == f"{label} ({prob:.3f})"

    lm = viz_models.generator()
    maps = _check_against_torch(lm, "the cat")
    (kind,) = maps.kinds
    assert kind.name == "self" and kind.query_tokens == ["t", "h", "e", "\u2423", "c", "a", "t"]
    for weights in kind.layers:
        assert np.all(np.triu(weights, 1) == 0)
    with pytest.raises(ValueError, match="--target is for translation"):
        attention_maps(lm, "the cat", target="x")


def test_no_state_on_modules_and_no_fallback_warning():
    tr = viz_models.translator()
    before = {name: sorted(vars(m)) for name, m in tr.model.named_modules()}
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the backend's "using math" warning is expected and silenced inside
        translation_maps(tr, TEXT, target=TARGET)
    assert {name: sorted(vars(m)) for name, m in tr.model.named_modules()} == before
    assert not tr.model.training


def test_approximate_backend_is_named_in_a_note():
    tr = viz_models.translator(attention="local", attention_window=2)
    maps = translation_maps(tr, TEXT, target=TARGET)
    assert "'local'" in maps.note and "window of 2" in maps.note
    # the maps are the weights the model uses: positive within the window of 2, zero beyond it
    weights = maps.kind("encoder").layers[0]  # (H, T, S)
    t = np.arange(weights.shape[-1])
    inside = np.abs(t[:, None] - t[None, :]) <= 2
    assert np.all(weights[:, inside] > 0) and np.all(weights[:, ~inside] == 0)


def test_bad_inputs_are_clear_errors():
    tr = viz_models.translator()
    with pytest.raises(ValueError, match="--target is empty"):
        translation_maps(tr, TEXT, target="   ")
    with pytest.raises(ValueError, match="max_seq_len = 24"):
        translation_maps(tr, TEXT, target=" ".join(["the"] * 24))
    with pytest.raises(ValueError, match="empty"):
        attention_maps(viz_models.generator(), "")


def _distinct_colours(png) -> int:
    image = matplotlib.image.imread(png)[..., :3]
    return len(np.unique((image * 255).round().astype(np.uint8).reshape(-1, 3), axis=0))


def test_pngs_one_per_kind_and_layer(tmp_path):
    maps = translation_maps(viz_models.translator(n_layers=1, n_heads=2), TEXT, target=TARGET)
    paths = write_pngs(maps, tmp_path)
    assert [p.name for p in paths] == ["encoder-layer1.png", "decoder-layer1.png", "cross-layer1.png"]
    for p in paths:
        assert _distinct_colours(p) > 50, p


def _page_data(path):
    text = path.read_text(encoding="utf-8")
    return text, json.loads(
        re.search(r'<script id="tformer-data" type="application/json">(.*?)</script>', text, re.S).group(1)
    )


def test_html_page_is_self_contained_and_carries_the_maps(tmp_path):
    tr = viz_models.translator()
    text = TEXT + " </script><img src=x onerror=alert(1)> {{SCRIPT}}"  # words the page must show, not run
    maps = translation_maps(tr, text, target=TARGET)
    page, data = _page_data(attention_html(maps, tmp_path / "a.html"))
    assert page.count("</script>") == 2 and "<img" not in page  # the input stays inside the JSON
    assert not re.search(
        r"<[a-z]+[^>]*\s(src|href)=|https?://|@import", page
    )  # nothing fetched from anywhere
    assert data["text"] == text
    assert [k["name"] for k in data["kinds"]] == ["encoder", "decoder", "cross"]
    for kind, sent in zip(maps.kinds, data["kinds"], strict=True):
        assert sent["query_tokens"] == kind.query_tokens and sent["key_tokens"] == kind.key_tokens
        np.testing.assert_allclose(np.array(sent["layers"]), np.stack(kind.layers), atol=0.5 * 10**-DIGITS)
    assert len(data["colormap"]) == 256 and data["colormap"][0] == [68, 1, 84]  # viridis, as in the PNGs


def test_cli_viz_checkpoint(tmp_path, capsys):
    ckpt = viz_models.save_translator(viz_models.translator(n_layers=1), tmp_path / "ckpt")
    out = tmp_path / "viz"
    assert main(["viz", str(ckpt), "--out", str(out), "--target", TARGET, TEXT]) == 0  # text after options
    printed = capsys.readouterr().out
    assert "translation: " + TARGET in printed and "1 layer x 4 heads" in printed
    assert (out / "attention.html").is_file() and len(list(out.glob("*-layer*.png"))) == 3
    _, data = _page_data(out / "attention.html")
    assert data["info"]["checkpoint"] == str(ckpt)

    clf = viz_models.save_classifier(viz_models.classifier(), tmp_path / "clf")
    assert main(["viz", str(clf), "the black cat", "--out", str(tmp_path / "c")]) == 0
    assert sorted(p.name for p in (tmp_path / "c").glob("*.png")) == [
        "encoder-layer1.png",
        "encoder-layer2.png",
    ]


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["CKPT", TEXT, "--positions", "5"], "--positions does not apply to a checkpoint"),
        (["CKPT"], "missing the input text"),
        (["CKPT", "le", "chat"], "give one input text (quote it)"),
        (["CKPT", TEXT, "--beam", "0"], "--beam must be at least 1"),
        (["positions"], "tformer viz positions OUT.png"),
        (["softmax", "x.png", "--target", "y"], "--target does not apply to 'viz softmax'"),
        (["softmax", "x.txt"], "should end in .png"),
        (["NOWHERE", TEXT], "checkpoint not found"),
    ],
)
def test_cli_viz_errors_are_one_line(tmp_path, capsys, argv, message):
    ckpt = viz_models.save_translator(viz_models.translator(), tmp_path / "ckpt")
    argv = [str(ckpt) if a == "CKPT" else str(tmp_path / "nowhere") if a == "NOWHERE" else a for a in argv]
    assert main(["viz", *argv]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1


def test_softmax_numbers_show_saturation_without_the_scale():
    d_ks = (1, 4, 16, 64, 256, 1024)
    n = softmax_saturation(d_ks, n_keys=16, samples=400, seed=0)
    for i, d in enumerate(d_ks):
        # q . k of N(0, 1) components has standard deviation sqrt(d_k); the scale brings it back to 1
        assert n["score_std_unscaled"][i] == pytest.approx(np.sqrt(d), rel=0.1)
        assert n["score_std_scaled"][i] == pytest.approx(1.0, rel=0.1)
        if d >= 64:
            assert n["max_prob_unscaled"][i] > 0.8 > 0.3 > n["max_prob_scaled"][i]
            assert n["entropy_unscaled"][i] < 0.5 < 2.0 < n["entropy_scaled"][i]
            assert n["jacobian_norm_unscaled"][i] < n["jacobian_norm_scaled"][i]
    assert np.all(np.diff(n["max_prob_unscaled"]) > 0)  # saturates as d_k grows ...
    assert np.all(np.diff(n["jacobian_norm_unscaled"][2:]) < 0)  # and the gradient through it fades
    assert n["jacobian_norm_unscaled"][-1] < 0.25 * n["jacobian_norm_scaled"][-1]
    assert np.ptp(n["max_prob_scaled"][1:]) < 0.05  # ... while the scaled softmax stays the same
    assert n["max_prob_scaled"][0] == n["max_prob_unscaled"][0]  # sqrt(1) = 1: the same softmax


def test_softmax_jacobian_norm_matches_autograd():
    z = torch.randn(5, 7, dtype=torch.float64) * 3
    p = torch.softmax(z, -1)
    for row, prob in zip(z, p, strict=True):
        jac = torch.autograd.functional.jacobian(lambda v: torch.softmax(v, -1), row)
        assert softmax_jacobian_norm(prob.numpy()) == pytest.approx(float(jac.norm()), rel=1e-12)


def test_pictures_are_written_and_not_blank(tmp_path, capsys):
    # through the command line: the PNGs, and the numbers behind the softmax picture
    assert main(["viz", "softmax", str(tmp_path / "s.png"), "--samples", "100", "--keys", "8"]) == 0
    assert _distinct_colours(tmp_path / "s.png") > 50
    saved = json.loads((tmp_path / "s.json").read_text())
    assert saved["n_keys"] == 8 and saved["max_prob_unscaled"][-1] > saved["max_prob_scaled"][-1]
    assert main(["viz", "positions", str(tmp_path / "p.png"), "--positions", "40", "--d-model", "32"]) == 0
    assert _distinct_colours(tmp_path / "p.png") > 100 and "written:" in capsys.readouterr().out
    with pytest.raises(ValueError, match="even d_model"):
        positional_encoding_png(tmp_path / "x.png", d_model=7)
    with pytest.raises(ValueError, match="outside"):
        positional_encoding_png(tmp_path / "x.png", d_model=8, curves=[8])


def _strict_page_data(path):
    """The page's embedded data parsed as JSON proper: NaN / Infinity (Python's extensions, which a
    browser's JSON.parse rejects, leaving a blank page) are errors."""

    def refuse(constant: str) -> None:
        raise ValueError(f"not JSON: {constant}")

    text = path.read_text(encoding="utf-8")
    found = re.search(r'<script id="tformer-data" type="application/json">(.*?)</script>', text, re.S)
    return json.loads(found.group(1), parse_constant=refuse)


def test_cli_viz_of_a_model_with_nan_weights_writes_a_page_that_parses(tmp_path, capsys):
    clf = viz_models.classifier()
    with torch.no_grad():
        for p in clf.model.parameters():
            p.fill_(float("nan"))
    ckpt = viz_models.save_classifier(clf, tmp_path / "clf")
    assert main(["viz", str(ckpt), "the black cat", "--out", str(tmp_path / "viz")]) == 0
    note = "128 of 128 attention weights are not finite numbers"
    assert f"note: {note}" in capsys.readouterr().out
    data = _strict_page_data(tmp_path / "viz" / "attention.html")
    assert data["note"].startswith(note)
    (kind,) = data["kinds"]
    n = len(["<bos>", "the", "black", "cat"])
    assert np.array(kind["layers"], dtype=object).shape == (2, 4, n, n)  # layers, heads, queries, keys
    assert all(w is None for layer in kind["layers"] for head in layer for row in head for w in row)


def test_non_finite_weights_are_null_in_the_page_and_the_rest_as_before(tmp_path):
    maps = translation_maps(viz_models.translator(n_layers=1), TEXT, target=TARGET)
    weights = maps.kind("cross").layers[0]  # (H, T, S)
    weights[1, 2, 3], weights[0, 0, 0], weights[3, 1, 5] = np.nan, np.inf, -np.inf
    data = _strict_page_data(attention_html(maps, tmp_path / "a.html"))
    sent = next(k for k in data["kinds"] if k["name"] == "cross")["layers"][0]
    missing = {
        (h, i, j)
        for h, head in enumerate(sent)
        for i, row in enumerate(head)
        for j, w in enumerate(row)
        if w is None
    }
    assert missing == {(1, 2, 3), (0, 0, 0), (3, 1, 5)}
    finite = np.isfinite(weights)
    values = np.array([[[np.nan if w is None else w for w in row] for row in head] for head in sent])
    np.testing.assert_allclose(values[finite], weights[finite], atol=0.5 * 10**-DIGITS)
