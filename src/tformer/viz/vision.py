"""Where a Vision Transformer looks in one image: per layer and head, the pooled query's attention over the
patches overlaid on the image, and attention rollout (Abnar & Zuidema, 2020), as PNGs and one page.

The pooled query is the [CLS] token's row (pooling "cls"), or, under mean pooling, the mean of every
token's row: what the head reads. Only the patch columns are drawn (the [CLS] token's weight on itself is
left out, so a map need not sum to 1). Rollout follows the paper's recipe: per layer the head mean of the
weights, the residual connection counted as an identity of equal weight (0.5 A + 0.5 I), rows
renormalised, then the layers multiplied from the first up; its pooled row over the patches is what the
output token gathered from each patch through every layer.
"""

from __future__ import annotations

import base64
import io
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from tformer.data.transforms import to_unit
from tformer.models.vit import VisionOutput, VisionTransformer
from tformer.tasks.common import model_device
from tformer.tasks.vision import ImageClassifier
from tformer.viz.attention import _note, _weights_from


@dataclass
class VisionMaps:
    """One image's attention: the image as shown, the model's reading of it, and per layer the weights."""

    file: str
    image: np.ndarray  # (S, S, 3) or (S, S), floats in [0, 1]: the pixels the model saw, before normalising
    grid: int  # patches per side
    pooling: str  # "cls" or "mean"
    layers: list[np.ndarray]  # per layer (heads, T, T), T = tokens ([CLS] first where there is one)
    info: dict[str, str] = field(default_factory=dict)
    note: str = ""

    @property
    def n_heads(self) -> int:
        return int(self.layers[0].shape[0])

    def patch_maps(self) -> list[np.ndarray]:
        """Per layer (heads, grid, grid): the pooled query's weights on each patch."""
        return [pooled_row(w, self.pooling, self.grid) for w in self.layers]

    def rollout(self) -> np.ndarray:
        """(grid, grid): attention rollout's pooled row over the patches."""
        return pooled_row(rollout(self.layers)[None], self.pooling, self.grid)[0]


def rollout(layers: list[np.ndarray], residual: float = 0.5) -> np.ndarray:
    """Attention rollout (Abnar & Zuidema, 2020): per layer A = residual * I + (1 - residual) * (head mean
    of the weights), rows renormalised; the product A_L ... A_1, (T, T)."""
    if not layers:
        raise ValueError("no attention layers to roll out")
    t = layers[0].shape[-1]
    out = np.eye(t)
    for w in layers:
        a = residual * np.eye(t) + (1 - residual) * np.asarray(w, dtype=np.float64).mean(0)
        a = a / a.sum(-1, keepdims=True)
        out = a @ out
    return out


def pooled_row(weights: np.ndarray, pooling: str, grid: int) -> np.ndarray:
    """(heads, T, T) weights -> (heads, grid, grid): the [CLS] row (pooling "cls") or the mean row
    ("mean") over the patch columns (the last grid * grid tokens), as the image's grid."""
    n = grid * grid
    rows = weights[:, 0, :] if pooling == "cls" else weights.mean(1)
    return np.asarray(rows[:, -n:], dtype=np.float64).reshape(-1, grid, grid)


def vision_maps(classifier: ImageClassifier, image: str | Path) -> VisionMaps:
    """One image file through the classifier's ViT with its attention weights."""
    model = classifier.model
    if not isinstance(model, VisionTransformer):
        raise ValueError(
            f"this checkpoint's model is a {type(model).__name__} (model.architecture="
            f"{model.config.architecture!r}): it has no attention to draw; a model.architecture="
            "'transformer' checkpoint (the ViT) has"
        )
    if Path(image).is_dir():
        raise ValueError(f"{image}: a folder; give one image file to draw its attention")
    files, pixels = classifier.load_files([image])
    unit = to_unit(pixels)  # (1, C, S, S) in [0, 1]
    dtype = next(p.dtype for p in model.parameters() if p.is_floating_point())
    x = classifier.norm(unit.to(model_device(model))).to(dtype)
    out = _weights_from(VisionOutput, model, x)
    if not out.attention:
        raise ValueError("the model returned no attention weights; it has no attention layers to draw")
    probs = torch.softmax(out.logits[0].double(), dim=-1)
    best = int(probs.argmax())
    shown = unit[0].permute(1, 2, 0).double().numpy()
    c = model.config
    return VisionMaps(
        file=str(files[0]),
        image=shown[..., 0] if shown.shape[-1] == 1 else shown,
        grid=c.grid,
        pooling=c.pooling,
        layers=[w[0].detach().double().cpu().numpy() for w in out.attention],
        info={
            "image": str(files[0]),
            "prediction": f"{classifier.classes[best]} ({float(probs[best]):.3f})",
            "patches": f"{c.grid} x {c.grid} of {c.patch_size} x {c.patch_size} pixels",
            "pooling": "[CLS] token" if c.pooling == "cls" else "mean of the tokens",
        },
        note=_note(c),
    )


def _overlay(ax: Any, image: np.ndarray, heat: np.ndarray, vmax: float) -> Any:
    size = image.shape[0]
    ax.imshow(image, cmap="gray" if image.ndim == 2 else None, vmin=0.0, vmax=1.0, extent=(0, size, size, 0))
    im = ax.imshow(heat, cmap="inferno", alpha=0.6, vmin=0.0, vmax=vmax, extent=(0, size, size, 0))
    ax.set_xticks([])
    ax.set_yticks([])
    return im


def write_pngs(maps: VisionMaps, out_dir: str | Path) -> list[Path]:
    """`vision-layerN.png` (one panel per head and the head mean, the pooled query's weights over the image)
    and `vision-rollout.png` (the image beside its rollout)."""
    import matplotlib.pyplot as plt

    from tformer.viz.plots import save_figure

    out, paths = Path(out_dir), []
    for n, heads in enumerate(maps.patch_maps(), 1):
        panels = [*heads, heads.mean(0)]
        cols = min(len(panels), 5)
        rows = -(-len(panels) // cols)
        fig, axes = plt.subplots(rows, cols, figsize=(2.3 * cols, 2.4 * rows + 0.5), squeeze=False)
        vmax = max(float(np.nanmax(heads)), 1e-12)
        im = None
        for i, ax in enumerate(axes.flat):
            if i >= len(panels):
                ax.set_visible(False)
                continue
            im = _overlay(ax, maps.image, panels[i], vmax)
            ax.set_title("head mean" if i == len(panels) - 1 else f"head {i + 1}", fontsize=9)
        assert im is not None  # at least two panels were drawn
        fig.colorbar(im, ax=axes.ravel().tolist(), fraction=0.02, pad=0.01, label="attention weight")
        fig.suptitle(f"{_query(maps)} attention over the patches, layer {n} of {len(maps.layers)}")
        paths.append(save_figure(fig, out / f"vision-layer{n}.png", dpi=110, tight=False))
    fig, (left, right) = plt.subplots(1, 2, figsize=(6.4, 3.4))
    left.imshow(maps.image, cmap="gray" if maps.image.ndim == 2 else None, vmin=0.0, vmax=1.0)
    left.set_xticks([])
    left.set_yticks([])
    left.set_title(maps.info.get("prediction", "image"), fontsize=9)
    heat = maps.rollout()
    im = _overlay(right, maps.image, heat, max(float(heat.max()), 1e-12))
    right.set_title(f"attention rollout, {len(maps.layers)} layers", fontsize=9)
    fig.colorbar(im, ax=right, fraction=0.046, pad=0.04)
    paths.append(save_figure(fig, out / "vision-rollout.png"))
    return paths


def _query(maps: VisionMaps) -> str:
    return "[CLS]" if maps.pooling == "cls" else "mean query's"


def _png_data_uri(image: np.ndarray) -> str:
    from PIL import Image

    pixels = np.clip(np.round(image * 255), 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def page_data(maps: VisionMaps) -> dict[str, Any]:
    """What the page's script reads: per layer per head the grid of weights (rounded, non-finite as null),
    the head means, the rollout, the image and the colour map."""
    from tformer.viz.html import _colormap, _weights

    per_layer = maps.patch_maps()
    return {
        "info": maps.info,
        "note": maps.note,
        "grid": maps.grid,
        "query": _query(maps),
        "image": _png_data_uri(maps.image),
        "colormap": _colormap("inferno"),
        "layers": [_weights(h.reshape(h.shape[0], -1)) for h in per_layer],
        "means": [_weights(h.mean(0).reshape(1, -1))[0] for h in per_layer],
        "rollout": _weights(maps.rollout().reshape(1, -1))[0],
    }


def vision_html(maps: VisionMaps, path: str | Path) -> Path:
    """Write the page to `path` and return it."""
    from tformer.viz.html import STYLE, write_page

    return write_page(
        path,
        title=f"tformer attention: {maps.file}",
        body=BODY,
        style=STYLE + VISION_STYLE,
        script=SCRIPT,
        data=page_data(maps),
    )


@dataclass
class Rendered:
    maps: VisionMaps
    html: Path
    pngs: list[Path]


def render(classifier: ImageClassifier, image: str | Path, out_dir: str | Path, checkpoint: str) -> Rendered:
    """`tformer viz CHECKPOINT IMAGE` for a vision checkpoint: every layer and head, the rollout, the page."""
    maps = vision_maps(classifier, image)
    maps.info = {"checkpoint": checkpoint, **maps.info}
    out = Path(out_dir)
    pngs = write_pngs(maps, out)
    return Rendered(maps, vision_html(maps, out / "attention.html"), pngs)


VISION_STYLE = """
#stage canvas { image-rendering: pixelated; }
"""

BODY = """<header>
  <h1>Attention over the image <span class="muted">tformer</span></h1>
  <dl id="info"></dl>
  <p id="note" hidden></p>
</header>
<nav id="controls">
  <label>view <select id="view"><option value="head">one layer</option>
    <option value="rollout">attention rollout (all layers)</option></select></label>
  <label>layer <select id="layer"></select></label>
  <label>head
    <button id="prev" type="button" title="previous head (left arrow)">&#9664;</button>
    <select id="head"></select>
    <button id="next" type="button" title="next head (right arrow)">&#9654;</button>
  </label>
  <label>opacity <input id="alpha" type="range" min="0" max="100" value="60"></label>
</nav>
<p id="readout">Hover a patch to read its weight.</p>
<div id="stage"><canvas id="map"></canvas></div>
<p class="muted" id="help">The colours are the weights the pooled query gives each patch, from 0 to the
largest in the map. Keys: arrows change head and layer. The view is kept in the address
(#view=...&amp;layer=...&amp;head=...) so it can be linked.</p>
"""

SCRIPT = r"""
(function () {
  "use strict";
  const data = JSON.parse(document.getElementById("tformer-data").textContent);
  const $ = (id) => document.getElementById(id);
  const view = $("view"), layer = $("layer"), head = $("head"), alpha = $("alpha");
  const canvas = $("map"), ctx = canvas.getContext("2d"), readout = $("readout");
  const g = data.grid, nHeads = data.layers[0].length, SIZE = 448;
  for (const [k, v] of Object.entries(data.info)) {
    const dt = document.createElement("dt"); dt.textContent = k;
    const dd = document.createElement("dd"); dd.textContent = v;
    $("info").append(dt, dd);
  }
  if (data.note) { $("note").textContent = data.note; $("note").hidden = false; }
  data.layers.forEach((_, i) => layer.add(new Option(`${i + 1} of ${data.layers.length}`, String(i + 1))));
  for (let h = 1; h <= nHeads; h++) head.add(new Option(String(h), String(h)));
  head.add(new Option("mean of the heads", "mean"));
  canvas.width = canvas.height = SIZE;
  const img = new Image();
  function weights() {
    if (view.value === "rollout") return data.rollout;
    const l = Number(layer.value) - 1;
    return head.value === "mean" ? data.means[l] : data.layers[l][Number(head.value) - 1];
  }
  function colour(v, max) {
    if (v === null) return [128, 128, 128];
    const i = Math.max(0, Math.min(255, Math.round(255 * (max > 0 ? v / max : 0))));
    return data.colormap[i];
  }
  function draw() {
    layer.disabled = head.disabled = view.value === "rollout";
    ctx.imageSmoothingEnabled = false;
    ctx.globalAlpha = 1;
    ctx.drawImage(img, 0, 0, SIZE, SIZE);
    const w = weights(), max = Math.max(0, ...w.filter((v) => v !== null)), cell = SIZE / g;
    ctx.globalAlpha = Number(alpha.value) / 100;
    w.forEach((v, i) => {
      const [r, gr, b] = colour(v, max);
      ctx.fillStyle = `rgb(${r},${gr},${b})`;
      ctx.fillRect((i % g) * cell, Math.floor(i / g) * cell, cell, cell);
    });
    const h = view.value === "rollout" ? "" : `&layer=${layer.value}&head=${head.value}`;
    history.replaceState(null, "", `#view=${view.value}${h}`);
    window.tformerView = { size: SIZE, grid: g };  // for a headless browser's checks
    document.body.dataset.view = view.value === "rollout" ? "rollout" : `${layer.value}/${head.value}`;
  }
  canvas.addEventListener("mousemove", (e) => {
    const r = canvas.getBoundingClientRect();
    const col = Math.floor(((e.clientX - r.left) / r.width) * g), row = Math.floor(((e.clientY - r.top) / r.height) * g);
    if (col < 0 || row < 0 || col >= g || row >= g) return;
    const v = weights()[row * g + col];
    readout.textContent = `patch row ${row + 1}, column ${col + 1}: ${data.query} weight ${v === null ? "nan" : v.toFixed(4)}`;
  });
  function step(select, by) {
    const i = select.selectedIndex + by;
    if (i >= 0 && i < select.options.length) { select.selectedIndex = i; draw(); }
  }
  $("prev").onclick = () => step(head, -1);
  $("next").onclick = () => step(head, 1);
  document.addEventListener("keydown", (e) => {
    if (e.key === "ArrowLeft") step(head, -1);
    else if (e.key === "ArrowRight") step(head, 1);
    else if (e.key === "ArrowUp") step(layer, -1);
    else if (e.key === "ArrowDown") step(layer, 1);
  });
  for (const el of [view, layer, head, alpha]) el.addEventListener("input", draw);
  const hash = new URLSearchParams(location.hash.slice(1));
  for (const [el, key] of [[view, "view"], [layer, "layer"], [head, "head"]]) {
    const v = hash.get(key);
    if (v !== null && [...el.options].some((o) => o.value === v)) el.value = v;
  }
  img.onload = draw;
  img.src = data.image;
})();
"""
