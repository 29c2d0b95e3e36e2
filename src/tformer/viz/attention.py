"""Attention maps of a trained model on one input: every layer and head, for each kind of attention.

A translation model has three kinds (encoder self-, decoder self- and cross-attention), a classifier one
(encoder self-attention over BOS + the text), a language model one (causal self-attention over the text).
The weights come from the models' output objects (`need_weights=True`, computed by the `math` backend);
nothing is read from or stored on modules. `render` writes them as PNG grids and one HTML page.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import numpy as np
import torch

from tformer.config import TransformerConfig
from tformer.data.tokenizers import Tokenizer
from tformer.inference.decoding import beam_search, greedy_decode
from tformer.inference.modes import evaluating
from tformer.models import ClassifierOutput, LMOutput, Seq2SeqOutput
from tformer.models.vit import VisionOutput
from tformer.tasks import TextClassifier, TextGenerator, Translator, load_predictor
from tformer.tasks.classification import encode_texts
from tformer.tasks.common import model_device

# Backends whose attention is not the exact softmax(QK^T / sqrt(d)) over all allowed keys. For the
# approximations the maps show the exact weights of the same queries and keys (the `math` backend), not the
# approximation the model uses; `local` is exact within its window, and its maps are its own weights.
O = TypeVar("O", Seq2SeqOutput, ClassifierOutput, LMOutput, VisionOutput)

APPROXIMATE = {
    "local": "attends within a window of {window} positions; the maps are its weights (zero outside the "
    "window)",
    "performer": "approximates softmax attention with random features; the maps show the exact softmax "
    "attention of the same queries and keys",
    "linformer": "projects keys and values to a fixed length; the maps show full softmax attention of the same "
    "queries and keys",
}


@dataclass
class AttentionKind:
    """One kind of attention in a model, e.g. cross-attention: per layer an (H, T, S) array of weights."""

    name: str  # "encoder", "decoder", "cross" or "self": file names and the page's URL hash
    title: str  # what a person reads: "cross-attention"
    query_axis: str  # what the rows are
    key_axis: str  # what the columns are
    query_tokens: list[str]  # T row labels
    key_tokens: list[str]  # S column labels
    layers: list[np.ndarray]  # per layer (H, T, S), rows sum to 1 (or 0 for a query with no key)

    @property
    def n_heads(self) -> int:
        return int(self.layers[0].shape[0])


@dataclass
class AttentionMaps:
    """Everything a picture of one input needs: the kinds of attention and what the model made of it."""

    task: str  # "translation", "classification" or "lm"
    text: str  # the input
    kinds: list[AttentionKind]
    info: dict[str, str] = field(default_factory=dict)  # e.g. {"translation": ..., "target from": ...}
    note: str = ""  # a caveat a person must read (an approximate backend)

    def kind(self, name: str) -> AttentionKind:
        for k in self.kinds:
            if k.name == name:
                return k
        raise KeyError(f"no attention kind {name!r}; this model has {', '.join(k.name for k in self.kinds)}")


def display_token(token: str) -> str:
    """A token as a label: the word-start marker dropped, whitespace made visible."""
    shown = token.replace("\u2581", "")
    if not shown:
        return "\u2581"  # a lone word-start marker (BPE)
    return shown.replace("\n", "\u21b5").replace("\t", "\u21e5").replace(" ", "\u2423")


def _tokens(tok: Tokenizer, ids: Sequence[int]) -> list[str]:
    return [display_token(tok.id_to_token(int(i))) for i in ids]


def _heads(weights: list[torch.Tensor] | None, what: str) -> list[np.ndarray]:
    """Per-layer (1, H, T, S) tensors -> per-layer (H, T, S) float64 arrays."""
    if not weights:
        raise ValueError(f"the model returned no {what} weights; it has no attention layers to draw")
    return [w[0].detach().to(torch.float64).cpu().numpy() for w in weights]


def _note(config: TransformerConfig) -> str:
    template = APPROXIMATE.get(config.attention)
    if template is None:
        return ""
    return f"this model's '{config.attention}' attention " + template.format(window=config.attention_window)


@contextmanager
def _evaluating(model: torch.nn.Module) -> Iterator[None]:
    """Eval mode (no dropout) and no autograd inside; a model in eval mode is not written to, another has
    each module's own mode restored after (tformer.inference.modes)."""
    with evaluating(model), torch.no_grad():
        yield


def _weights_from(output: type[O], model: torch.nn.Module, *args: torch.Tensor) -> O:
    """One forward pass in eval mode with `need_weights=True` -> the model's `output` object; the backend's
    fallback warning is expected."""
    with _evaluating(model), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="attention backend .* cannot return weights")
        out = model(*args, need_weights=True)
    if not isinstance(out, output):
        raise TypeError(
            f"a {type(model).__name__} returned a {type(out).__name__}; expected {output.__name__}"
        )
    return out


def translation_maps(
    translator: Translator,
    text: str,
    *,
    target: str | None = None,
    beam_size: int = 4,
    max_len: int | None = None,
) -> AttentionMaps:
    """Encoder self-, decoder self- and cross-attention for `text`, teacher-forced on `target` or, by
    default, on the model's own translation (beam search; `beam_size=1` is greedy).

    Decoder rows are labelled by the token each position predicts (position 0 reads BOS and predicts the
    first target token; the last predicts EOS), so a cross-attention row reads "to produce this word the
    model looked at these source words". Decoder self-attention columns are the decoder's inputs.
    """
    model, src_tok, tgt_tok = translator.model, translator.src_tok, translator.tgt_tok
    src_ids = translator.encode([text])[0]
    device = model_device(model)
    src = torch.tensor([src_ids], device=device)
    info: dict[str, str] = {}
    ends = True  # whether the last decoder position is the one that predicts EOS
    if target is None:
        t = tgt_tok
        with _evaluating(model):
            if beam_size == 1:
                hyp = greedy_decode(model, src, bos_id=t.bos_id, eos_id=t.eos_id, max_len=max_len)[0]
            else:
                hyp = beam_search(
                    model, src, bos_id=t.bos_id, eos_id=t.eos_id, beam_size=beam_size, max_len=max_len
                )[0][0]
        tgt_ids, ends = list(hyp.tokens), hyp.finished
        how = "greedy" if beam_size == 1 else f"beam {beam_size}"
        info["target"] = f"the model's own translation ({how})" + (
            "" if ends else ", cut at the length limit"
        )
    else:
        tgt_ids = tgt_tok.encode(target)
        if not tgt_ids:
            raise ValueError("--target is empty: give the target sentence to teacher-force, or leave it out")
        info["target"] = "given (teacher-forced)"
    info["translation"] = tgt_tok.decode(tgt_ids) or "(empty: the model predicts EOS first)"
    # Teacher forcing: the decoder reads BOS + outputs[:-1] and position i predicts outputs[i].
    outputs = [*tgt_ids, tgt_tok.eos_id] if ends else tgt_ids
    inputs = [tgt_tok.bos_id, *outputs[:-1]]
    limit = model.config.max_seq_len
    if len(inputs) > limit:
        raise ValueError(
            f"the target has {len(tgt_ids)} tokens; with BOS that is more than the model's max_seq_len = {limit}"
        )
    out = _weights_from(Seq2SeqOutput, model, src, torch.tensor([inputs], device=device))  # tgt (1, T)
    src_tokens = _tokens(src_tok, src_ids)
    special = {tgt_tok.bos_id: "<bos>", tgt_tok.eos_id: "<eos>"}
    inputs_shown = [special.get(i) or display_token(tgt_tok.id_to_token(i)) for i in inputs]
    predicts = [special.get(i) or display_token(tgt_tok.id_to_token(i)) for i in outputs]
    kinds = [
        AttentionKind(
            "encoder",
            "encoder self-attention",
            "source (query)",
            "source (key)",
            src_tokens,
            src_tokens,
            _heads(out.encoder_attention, "encoder self-attention"),
        ),
        AttentionKind(
            "decoder",
            "decoder self-attention (masked)",
            "target position (query), by the token it predicts",
            "target input (key)",
            predicts,
            inputs_shown,
            _heads(out.self_attention, "decoder self-attention"),
        ),
        AttentionKind(
            "cross",
            "cross-attention (decoder -> encoder)",
            "target position (query), by the token it predicts",
            "source (key)",
            predicts,
            src_tokens,
            _heads(out.cross_attention, "cross-attention"),
        ),
    ]
    return AttentionMaps("translation", text, kinds, info, _note(model.config))


def classifier_maps(classifier: TextClassifier, text: str) -> AttentionMaps:
    """Encoder self-attention over BOS + the text, as the classifier reads it (cut to max_seq_len)."""
    if not text.strip():
        raise ValueError("the input is empty: nothing to classify")
    model = classifier.model
    ids = encode_texts(classifier.tok, [text], model.config.max_seq_len, "input")[0]
    out = _weights_from(ClassifierOutput, model, torch.tensor([ids], device=model_device(model)))
    probs = torch.softmax(out.logits[0].double(), dim=-1)
    best = int(probs.argmax())
    tokens = ["<bos>", *_tokens(classifier.tok, ids[1:])]
    kind = AttentionKind(
        "encoder",
        "encoder self-attention",
        "token (query)",
        "token (key)",
        tokens,
        tokens,
        _heads(out.attention, "self-attention"),
    )
    info = {
        "prediction": f"{classifier.labels[best]} ({float(probs[best]):.3f})",
        "pooling": model.config.pooling,
    }
    return AttentionMaps("classification", text, [kind], info, _note(model.config))


def lm_maps(generator: TextGenerator, text: str) -> AttentionMaps:
    """Causal self-attention over the text: row t is what token t looked at to predict token t + 1."""
    model, tok = generator.model, generator.tok
    ids = tok.encode(text)
    if not ids:
        raise ValueError("the input is empty: give the text whose attention to draw")
    if len(ids) > model.config.max_seq_len:
        raise ValueError(
            f"the input has {len(ids)} tokens, more than the model's max_seq_len = {model.config.max_seq_len}"
        )
    out = _weights_from(LMOutput, model, torch.tensor([ids], device=model_device(model)))
    tokens = _tokens(tok, ids)
    nxt = display_token(tok.id_to_token(int(out.logits[0, -1].argmax())))
    kind = AttentionKind(
        "self",
        "causal self-attention",
        "token (query)",
        "earlier token (key)",
        tokens,
        tokens,
        _heads(out.attention, "self-attention"),
    )
    return AttentionMaps("lm", text, [kind], {"most likely next token": nxt}, _note(model.config))


def attention_maps(
    predictor: Translator | TextClassifier | TextGenerator,
    text: str,
    *,
    target: str | None = None,
    beam_size: int = 4,
) -> AttentionMaps:
    """The maps for any predictor (`tformer.tasks.load_predictor`). `target` is for translation only.
    Weights that are not finite numbers (a model with NaN or infinite parameters) are counted in the note."""
    if isinstance(predictor, Translator):
        maps = translation_maps(predictor, text, target=target, beam_size=beam_size)
    elif target is not None:
        raise ValueError("--target is for translation checkpoints; this one has no decoder to teacher-force")
    elif isinstance(predictor, TextClassifier):
        maps = classifier_maps(predictor, text)
    elif isinstance(predictor, TextGenerator):
        maps = lm_maps(predictor, text)
    else:
        raise TypeError(f"cannot draw attention for a {type(predictor).__name__}")
    bad = sum(int(np.count_nonzero(~np.isfinite(w))) for k in maps.kinds for w in k.layers)
    if bad:
        total = sum(w.size for k in maps.kinds for w in k.layers)
        missing = (
            f"{bad} of {total} attention weights are not finite numbers (the model's weights or activations "
            "hold NaN or inf); the page draws them grey and reads them out as nan"
        )
        maps.note = f"{maps.note}; {missing}" if maps.note else missing
    return maps


def write_pngs(maps: AttentionMaps, out_dir: str | Path) -> list[Path]:
    """One PNG per kind and layer (`cross-layer2.png`), its heads as panels."""
    from tformer.viz.plots import attention_grid

    paths = []
    for kind in maps.kinds:
        for n, weights in enumerate(kind.layers, 1):
            paths.append(
                attention_grid(
                    weights,
                    kind.key_tokens,
                    kind.query_tokens,
                    Path(out_dir) / f"{kind.name}-layer{n}.png",
                    title=f"{kind.title}, layer {n} of {len(kind.layers)}",
                    xlabel=kind.key_axis,
                    ylabel=kind.query_axis,
                )
            )
    return paths


@dataclass
class Rendered:
    maps: AttentionMaps
    html: Path
    pngs: list[Path]


def render(
    checkpoint: str | Path,
    text: str,
    out_dir: str | Path,
    *,
    target: str | None = None,
    beam_size: int = 4,
    predictor: Translator | TextClassifier | TextGenerator | None = None,
) -> Rendered:
    """`tformer viz CHECKPOINT TEXT`: load any text checkpoint (or take its `predictor`, loaded), draw
    every layer and head, write PNGs + HTML."""
    from tformer.viz.html import attention_html

    if predictor is None:
        loaded = load_predictor(checkpoint)
        if not isinstance(loaded, (Translator, TextClassifier, TextGenerator)):
            raise TypeError(f"cannot draw text attention for a {type(loaded).__name__}")
        predictor = loaded
    maps = attention_maps(predictor, text, target=target, beam_size=beam_size)
    maps.info = {"checkpoint": str(checkpoint), **maps.info}
    out = Path(out_dir)
    pngs = write_pngs(maps, out)
    html = attention_html(maps, out / "attention.html")
    return Rendered(maps, html, pngs)
