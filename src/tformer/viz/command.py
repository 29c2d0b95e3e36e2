"""`tformer viz`: which picture the arguments ask for, its options checked, the files it wrote.

    tformer viz CHECKPOINT "input" [--out DIR] [--target "..."] [--beam N]
    tformer viz VISION-CHECKPOINT IMAGE [--out DIR]
    tformer viz positions OUT.png [--positions N] [--d-model D]
    tformer viz softmax OUT.png [--keys N] [--samples N] [--seed S]

The words `positions` and `softmax` name the pictures; a checkpoint directory of that name is reached as
`./positions`. An option of another form is an error rather than silently ignored.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

PICTURES = ("positions", "softmax")
OPTIONS = {  # form -> the options it takes (argparse dest names)
    "checkpoint": ("out", "target", "beam"),
    "positions": ("positions", "d_model"),
    "softmax": ("keys", "samples", "seed"),
}


def run_viz(source: str, args: list[str], options: dict[str, Any]) -> list[str]:
    """Draw what `source` names; `args`: the input text or the output file (one). Returns lines to print
    (the files written, a few numbers)."""
    form = source if source in PICTURES else "checkpoint"
    if len(args) > 1:
        what = "input text (quote it)" if form == "checkpoint" else "output file"
        raise ValueError(f"give one {what}; got {len(args)} arguments: {' '.join(args)[:80]!r}")
    arg = args[0] if args else None
    every = {o for opts in OPTIONS.values() for o in opts}
    wrong = [o for o in sorted(every - set(OPTIONS[form])) if options.get(o) is not None]
    if wrong:
        flags = ", ".join("--" + o.replace("_", "-") for o in wrong)
        what = "a checkpoint" if form == "checkpoint" else f"'viz {form}'"
        verb = "does" if len(wrong) == 1 else "do"
        raise ValueError(f"{flags} {verb} not apply to {what}; it takes {_flags(form)}")
    if arg is None:
        need = 'the input text: tformer viz CHECKPOINT "text"' if form == "checkpoint" else "an output file"
        raise ValueError(
            f"missing {need}" + ("" if form == "checkpoint" else f": tformer viz {form} OUT.png")
        )
    given = {o: options[o] for o in OPTIONS[form] if options.get(o) is not None}
    if form == "positions":
        return _positions(Path(arg), **given)
    if form == "softmax":
        return _softmax(Path(arg), **given)
    return _checkpoint(source, arg, **given)


def _flags(form: str) -> str:
    return ", ".join("--" + o.replace("_", "-") for o in OPTIONS[form])


def _png(path: Path) -> Path:
    if path.suffix.lower() not in (".png", ".svg", ".pdf"):
        raise ValueError(f"output file {str(path)!r} should end in .png (or .svg, .pdf)")
    return path


def _checkpoint(
    checkpoint: str, text: str, *, out: str = "runs/viz", target: str | None = None, beam: int | None = None
) -> list[str]:
    from tformer.tasks import TextClassifier, TextGenerator, Translator, open_predictor
    from tformer.tasks.vision import ImageClassifier
    from tformer.viz.attention import render

    if beam is not None and beam < 1:
        raise ValueError(f"--beam must be at least 1, got {beam}")
    predictor = open_predictor(checkpoint)
    if isinstance(predictor, ImageClassifier):
        if target is not None or beam is not None:
            given = "--target" if target is not None else "--beam"
            raise ValueError(f"{given} is for translation checkpoints; this one classifies images")
        return _vision(predictor, checkpoint, text, out)
    if not isinstance(predictor, (Translator, TextClassifier, TextGenerator)):
        raise ValueError(f"{checkpoint}: cannot draw attention for a {type(predictor).__name__}")
    result = render(
        checkpoint, text, out, target=target, beam_size=4 if beam is None else beam, predictor=predictor
    )
    lines = [f"{key}: {value}" for key, value in result.maps.info.items() if key != "checkpoint"]
    if result.maps.note:
        lines.append(f"note: {result.maps.note}")
    kinds = ", ".join(
        f"{k.title} ({_count(len(k.layers), 'layer')} x {_count(k.n_heads, 'head')})"
        for k in result.maps.kinds
    )
    lines += [f"attention: {kinds}", f"page:   {result.html}", f"PNGs:   {len(result.pngs)} in {Path(out)}/"]
    return lines


def _vision(predictor: Any, checkpoint: str, image: str, out: str) -> list[str]:
    from tformer.viz.vision import render

    result = render(predictor, image, out, checkpoint)
    lines = [f"{key}: {value}" for key, value in result.maps.info.items() if key != "checkpoint"]
    if result.maps.note:
        lines.append(f"note: {result.maps.note}")
    lines += [
        f"attention: {_count(len(result.maps.layers), 'layer')} x {_count(result.maps.n_heads, 'head')}, "
        "and the rollout",
        f"page:   {result.html}",
        f"PNGs:   {len(result.pngs)} in {Path(out)}/",
    ]
    return lines


def _count(n: int, what: str) -> str:
    return f"{n} {what}" + ("" if n == 1 else "s")


def _positions(path: Path, *, positions: int = 100, d_model: int = 512) -> list[str]:
    from tformer.viz.pictures import positional_encoding_png

    return [f"written: {positional_encoding_png(_png(path), positions=positions, d_model=d_model)}"]


def _softmax(path: Path, *, keys: int = 16, samples: int = 2000, seed: int = 0) -> list[str]:
    from tformer.viz.pictures import softmax_saturation, softmax_scale_png, write_json

    _png(path)  # a bad name fails before the work
    numbers = softmax_saturation(n_keys=keys, samples=samples, seed=seed)
    png = softmax_scale_png(path, numbers)
    data = write_json(numbers, path.with_suffix(".json"))
    lines = [f"{'d_k':>6} {'max p scaled':>13} {'unscaled':>9} {'entropy scaled':>15} {'unscaled':>9}"]
    for i, d in enumerate(numbers["d_k"]):
        lines.append(
            f"{d:>6} {numbers['max_prob_scaled'][i]:>13.3f} {numbers['max_prob_unscaled'][i]:>9.3f}"
            f" {numbers['entropy_scaled'][i]:>15.3f} {numbers['entropy_unscaled'][i]:>9.3f}"
        )
    return [*lines, f"written: {png}, {data}"]
