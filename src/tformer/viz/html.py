"""One self-contained HTML page of attention maps: pick the kind, layer and head; hover a cell to read it.

Everything is inline (CSS, a small script, the weights as JSON); the page needs no network and no server,
so it can be mailed or opened from disk. The heatmap is drawn on a <canvas> with the viridis colours of
the PNGs; source/target tokens label the axes. The view is in the URL hash, 1-based as on screen
(`attention.html#kind=cross&layer=2&head=3`, `head=mean`): a link opens that view, and a headless browser
can screenshot any head without clicking.

A weight that is not a finite number (a model with NaN or infinite parameters) is written as `null`: NaN is
not JSON, and a browser's JSON.parse refuses the whole page for one. The page draws such a cell in grey,
reads it out as "nan", leaves it out of the colour scale, and a head mean with one is "nan" too.
"""

from __future__ import annotations

import html
import json
import re
from pathlib import Path
from typing import Any, cast

import numpy as np

from tformer.viz.attention import AttentionMaps

DIGITS = 4  # weights are written rounded to 4 decimals: what the hover readout shows


def _colormap(name: str = "viridis", n: int = 256) -> list[list[int]]:
    from matplotlib import colormaps

    rgba = colormaps[name](np.linspace(0.0, 1.0, n))
    return [[round(255 * c) for c in row[:3]] for row in rgba]


def page_data(maps: AttentionMaps) -> dict[str, Any]:
    """What the page's script reads: the maps as nested lists (kind -> layer -> head -> T x S) and labels."""
    return {
        "task": maps.task,
        "text": maps.text,
        "info": maps.info,
        "note": maps.note,
        "colormap": _colormap(),
        "kinds": [
            {
                "name": k.name,
                "title": k.title,
                "query_axis": k.query_axis,
                "key_axis": k.key_axis,
                "query_tokens": k.query_tokens,
                "key_tokens": k.key_tokens,
                "layers": [_weights(w) for w in k.layers],
            }
            for k in maps.kinds
        ],
    }


def _weights(w: np.ndarray) -> list[Any]:
    """(H, T, S) weights -> nested lists rounded to DIGITS, None (JSON null) where not finite."""
    a = np.round(np.asarray(w, dtype=float), DIGITS)
    out = a.astype(object)  # (Python floats)
    out[~np.isfinite(a)] = None
    return cast(list[Any], out.tolist())


def _json_for_script(data: Any) -> str:
    # ASCII only, and no "<" at all, so the text can never close the <script> element it sits in; strict
    # JSON (a NaN would be an error here rather than a blank page)
    text = json.dumps(data, ensure_ascii=True, separators=(",", ":"), allow_nan=False)
    return text.replace("<", "\\u003c")


def attention_html(maps: AttentionMaps, path: str | Path) -> Path:
    """Write the page to `path` and return it."""
    return write_page(
        path,
        title=f"tformer attention: {maps.text}",
        body=BODY,
        style=STYLE,
        script=SCRIPT,
        data=page_data(maps),
    )


def write_page(path: str | Path, *, title: str, body: str, style: str, script: str, data: Any) -> Path:
    """One self-contained page: `body` (HTML), `style` and `script` inline, `data` as JSON in the
    `tformer-data` script element (read by `script`); written to `path`, returned."""
    parts = {
        "TITLE": html.escape(title),
        "STYLE": style,
        "BODY": body,
        "SCRIPT": script,
        "DATA": _json_for_script(data),
    }
    # one pass, so text from the input can never be taken for a placeholder
    page = re.sub(r"\{\{([A-Z]+)\}\}", lambda m: parts[m.group(1)], TEMPLATE)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(page, encoding="utf-8")
    return path


TEMPLATE = """<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{{TITLE}}</title>
<style>{{STYLE}}</style>
</head>
<body>
{{BODY}}<script id="tformer-data" type="application/json">{{DATA}}</script>
<script>{{SCRIPT}}</script>
</body>
</html>
"""

BODY = """<header>
  <h1>Attention <span class="muted">tformer</span></h1>
  <dl id="info"></dl>
  <p id="note" hidden></p>
</header>
<nav id="controls">
  <label>attention <select id="kind"></select></label>
  <label>layer <select id="layer"></select></label>
  <label>head
    <button id="prev" type="button" title="previous head (left arrow)">&#9664;</button>
    <select id="head"></select>
    <button id="next" type="button" title="next head (right arrow)">&#9654;</button>
  </label>
  <label>colours <select id="scale">
    <option value="fixed">0 to 1</option>
    <option value="max">0 to this map's largest weight</option>
  </select></label>
</nav>
<p id="readout">Hover a cell to read its weight.</p>
<div id="stage"><canvas id="map"></canvas><canvas id="overlay"></canvas></div>
<p class="muted" id="help">Rows are queries, columns are keys; each row sums to 1. Keys: arrows change
head and layer. The view is kept in the address (#kind=...&amp;layer=...&amp;head=...) so it can be linked.</p>
"""

STYLE = """
body { font: 14px/1.4 system-ui, -apple-system, "Segoe UI", sans-serif; margin: 1.2em 2em; color: #222;
  background: #fff; }
h1 { font-size: 1.4em; margin: 0 0 .4em; }
.muted { color: #777; font-weight: normal; }
dl#info { display: grid; grid-template-columns: max-content auto; gap: .15em 1em; margin: 0 0 .6em; }
dl#info dt { color: #555; }
dl#info dd { margin: 0; font-family: ui-monospace, monospace; white-space: pre-wrap; }
#note { background: #fff4d6; border-left: 4px solid #e0a800; padding: .4em .8em; max-width: 60em; }
#controls { display: flex; flex-wrap: wrap; gap: .6em 1.4em; align-items: center; margin: .6em 0; }
#controls select, #controls button { font: inherit; padding: .15em .3em; }
#readout { font-family: ui-monospace, monospace; min-height: 1.4em; margin: .4em 0; }
#stage { position: relative; display: inline-block; }
#overlay { position: absolute; left: 0; top: 0; }
#help { max-width: 60em; }
"""

SCRIPT = r"""
"use strict";
const DATA = JSON.parse(document.getElementById("tformer-data").textContent);
const $ = (id) => document.getElementById(id);
const state = { kind: 0, layer: 0, head: 0, scale: "fixed" }; // head -1: mean of the heads
let geometry = null; // where the last map was drawn, for hover and the highlight

function kind() { return DATA.kinds[state.kind]; }
function nHeads() { return kind().layers[0].length; }

// A weight is a number, or null where the model's was not finite (NaN: not JSON); a mean with one is null.
function matrix() {
  const heads = kind().layers[state.layer];
  if (state.head >= 0) return heads[state.head];
  const t = heads[0].length, s = heads[0][0].length;
  const mean = [];
  for (let i = 0; i < t; i++) {
    const row = new Array(s).fill(0);
    for (const h of heads) for (let j = 0; j < s; j++) {
      row[j] = row[j] === null || h[i][j] === null ? null : row[j] + h[i][j] / heads.length;
    }
    mean.push(row);
  }
  return mean;
}

function option(select, value, text) {
  const o = document.createElement("option");
  o.value = String(value);
  o.textContent = text;
  select.appendChild(o);
}

function fillSelects() {
  const k = $("kind"), l = $("layer"), h = $("head");
  if (!k.options.length) DATA.kinds.forEach((x, i) => option(k, i, x.title));
  l.textContent = "";
  kind().layers.forEach((_, i) => option(l, i, String(i + 1) + " of " + kind().layers.length));
  h.textContent = "";
  for (let i = 0; i < nHeads(); i++) option(h, i, String(i + 1) + " of " + nHeads());
  option(h, -1, "mean of heads");
  k.value = String(state.kind);
  l.value = String(state.layer);
  h.value = String(state.head);
  $("scale").value = state.scale;
}

function readHash() {
  const p = new URLSearchParams(location.hash.replace(/^#/, ""));
  const k = DATA.kinds.findIndex((x) => x.name === p.get("kind"));
  if (k >= 0) state.kind = k;
  const nLayers = kind().layers.length;
  const layer = parseInt(p.get("layer"), 10);
  state.layer = Number.isInteger(layer) ? Math.min(Math.max(layer, 1), nLayers) - 1 : Math.min(state.layer, nLayers - 1);
  const head = p.get("head");
  if (head === "mean") state.head = -1;
  else if (head !== null && Number.isInteger(parseInt(head, 10))) state.head = Math.min(Math.max(parseInt(head, 10), 1), nHeads()) - 1;
  else state.head = Math.min(state.head, nHeads() - 1);
  if (p.get("scale") === "max" || p.get("scale") === "fixed") state.scale = p.get("scale");
}

function writeHash() {
  const p = new URLSearchParams({ kind: kind().name, layer: String(state.layer + 1),
    head: state.head < 0 ? "mean" : String(state.head + 1) });
  if (state.scale !== "fixed") p.set("scale", state.scale);
  history.replaceState(null, "", "#" + p.toString());
}

const MISSING = [190, 190, 190]; // grey, not a viridis colour: a weight that is not a number

function color(v, vmax) {
  if (v === null) return MISSING;
  const cmap = DATA.colormap;
  const x = vmax > 0 ? Math.min(Math.max(v / vmax, 0), 1) : 0;
  return cmap[Math.round(x * (cmap.length - 1))];
}

function largest(m) { // the largest weight, missing ones left out; 0 when all are missing
  let top = 0;
  for (const row of m) for (const v of row) if (v !== null && v > top) top = v;
  return top;
}

function clip(token) { return token.length > 18 ? token.slice(0, 17) + "\u2026" : token; }

function draw() {
  const k = kind(), m = matrix();
  const t = m.length, s = m[0].length;
  let vmax = 1;
  if (state.scale === "max") vmax = Math.max(1e-12, largest(m));
  const cell = Math.max(3, Math.min(36, Math.floor(Math.min(760 / s, 600 / t))));
  const every = Math.max(1, Math.ceil(13 / cell)); // label every n-th token when cells are small
  const canvas = $("map"), ctx = canvas.getContext("2d");
  ctx.font = "12px system-ui, sans-serif";
  const widest = (tokens) => Math.max(...tokens.map((x) => ctx.measureText(clip(x)).width));
  const left = Math.ceil(widest(k.query_tokens)) + 34, top = 34;
  const bottom = Math.ceil(widest(k.key_tokens)) + 34, barW = 14, right = 70;
  const w = left + s * cell + 24 + barW + right, h = top + t * cell + bottom;
  const dpr = window.devicePixelRatio || 1;
  for (const c of [canvas, $("overlay")]) {
    c.width = Math.round(w * dpr); c.height = Math.round(h * dpr);
    c.style.width = w + "px"; c.style.height = h + "px";
  }
  ctx.setTransform(dpr, 0, 0, dpr, 0, 0);
  ctx.fillStyle = "#fff"; ctx.fillRect(0, 0, w, h);
  // the cells: one pixel per weight, scaled up without smoothing
  const img = new ImageData(s, t);
  for (let i = 0; i < t; i++) for (let j = 0; j < s; j++) {
    const [r, g, b] = color(m[i][j], vmax), o = 4 * (i * s + j);
    img.data[o] = r; img.data[o + 1] = g; img.data[o + 2] = b; img.data[o + 3] = 255;
  }
  const off = document.createElement("canvas");
  off.width = s; off.height = t;
  off.getContext("2d").putImageData(img, 0, 0);
  ctx.imageSmoothingEnabled = false;
  ctx.drawImage(off, left, top, s * cell, t * cell);
  // title, token labels, axis names
  ctx.fillStyle = "#222"; ctx.font = "bold 13px system-ui, sans-serif"; ctx.textBaseline = "middle";
  const which = state.head < 0 ? "mean of " + nHeads() + " heads" : "head " + (state.head + 1);
  ctx.fillText(k.title + ", layer " + (state.layer + 1) + ", " + which, left, 14);
  ctx.font = "12px system-ui, sans-serif"; ctx.textAlign = "right";
  for (let i = 0; i < t; i += every) ctx.fillText(clip(k.query_tokens[i]), left - 6, top + (i + 0.5) * cell);
  for (let j = 0; j < s; j += every) {
    ctx.save(); ctx.translate(left + (j + 0.5) * cell, top + t * cell + 6); ctx.rotate(-Math.PI / 2);
    ctx.fillText(clip(k.key_tokens[j]), 0, 0); ctx.restore();
  }
  ctx.fillStyle = "#555"; ctx.textAlign = "center";
  ctx.fillText(k.key_axis, left + (s * cell) / 2, h - 12);
  ctx.save(); ctx.translate(12, top + (t * cell) / 2); ctx.rotate(-Math.PI / 2);
  ctx.fillText(k.query_axis, 0, 0); ctx.restore();
  // colour bar
  const bx = left + s * cell + 24, bh = Math.max(t * cell, 60);
  for (let y = 0; y < bh; y++) {
    const [r, g, b] = color(1 - y / (bh - 1), 1);
    ctx.fillStyle = "rgb(" + r + "," + g + "," + b + ")"; ctx.fillRect(bx, top + y, barW, 1);
  }
  ctx.fillStyle = "#222"; ctx.textAlign = "left";
  for (const f of [0, 0.5, 1]) ctx.fillText((f * vmax).toFixed(vmax < 0.1 ? 3 : 2), bx + barW + 5, top + (1 - f) * (bh - 1));
  geometry = { left, top, cell, t, s, m };
  highlight(null);
  // what is on screen, for links and for tests: kind, 1-based layer and head, and where the cells are
  const view = { kind: kind().name, layer: state.layer + 1, head: state.head < 0 ? "mean" : state.head + 1,
    left, top, cell, rows: t, cols: s, vmax };
  window.tformerView = view;
  document.body.dataset.view = view.kind + "/" + view.layer + "/" + view.head;
}

function highlight(at) {
  const o = $("overlay"), ctx = o.getContext("2d"), g = geometry;
  const dpr = window.devicePixelRatio || 1;
  ctx.setTransform(dpr, 0, 0, dpr, 0, 0);
  ctx.clearRect(0, 0, o.width, o.height);
  const k = kind();
  if (!at) { $("readout").textContent = "Hover a cell to read its weight."; return; }
  ctx.strokeStyle = "rgba(255,255,255,.9)"; ctx.lineWidth = 1;
  ctx.strokeRect(g.left + 0.5, g.top + at.i * g.cell + 0.5, g.s * g.cell - 1, g.cell - 1);
  ctx.strokeStyle = "#e8175d"; ctx.lineWidth = 2;
  ctx.strokeRect(g.left + at.j * g.cell + 1, g.top + at.i * g.cell + 1, g.cell - 2, g.cell - 2);
  const which = state.head < 0 ? "mean of heads" : "head " + (state.head + 1);
  $("readout").textContent = k.query_axis.split(" (")[0] + " " + (at.i + 1) + " \u201c" + k.query_tokens[at.i] +
    "\u201d \u2192 " + k.key_axis.split(" (")[0] + " " + (at.j + 1) + " \u201c" + k.key_tokens[at.j] + "\u201d: " +
    (g.m[at.i][at.j] === null ? "nan" : g.m[at.i][at.j].toFixed(4)) + "  (" + which + ")";
}

function cellAt(event) {
  const g = geometry, r = $("overlay").getBoundingClientRect();
  const j = Math.floor((event.clientX - r.left - g.left) / g.cell), i = Math.floor((event.clientY - r.top - g.top) / g.cell);
  return i >= 0 && i < g.t && j >= 0 && j < g.s ? { i, j } : null;
}

function update(change) {
  Object.assign(state, change);
  const n = kind().layers.length;
  state.layer = Math.min(state.layer, n - 1);
  if (state.head >= nHeads()) state.head = nHeads() - 1;
  fillSelects(); writeHash(); draw();
}

function showInfo() {
  const dl = $("info");
  const rows = [["input", DATA.text], ["task", DATA.task], ...Object.entries(DATA.info)];
  for (const [key, value] of rows) {
    const dt = document.createElement("dt"), dd = document.createElement("dd");
    dt.textContent = key; dd.textContent = value; dl.append(dt, dd);
  }
  if (DATA.note) { $("note").textContent = "Note: " + DATA.note + "."; $("note").hidden = false; }
}

function step(head) {
  const n = nHeads() + 1; // the heads, then the mean
  const pos = state.head < 0 ? n - 1 : state.head;
  const next = (pos + head + n) % n;
  update({ head: next === n - 1 ? -1 : next });
}

showInfo();
readHash();
fillSelects();
writeHash();
draw();
$("kind").addEventListener("change", (e) => update({ kind: +e.target.value }));
$("layer").addEventListener("change", (e) => update({ layer: +e.target.value }));
$("head").addEventListener("change", (e) => update({ head: +e.target.value }));
$("scale").addEventListener("change", (e) => update({ scale: e.target.value }));
$("prev").addEventListener("click", () => step(-1));
$("next").addEventListener("click", () => step(1));
$("overlay").addEventListener("mousemove", (e) => highlight(cellAt(e)));
$("overlay").addEventListener("mouseleave", () => highlight(null));
window.addEventListener("hashchange", () => { readHash(); fillSelects(); draw(); });
document.addEventListener("keydown", (e) => {
  if (e.target instanceof HTMLSelectElement) return;
  if (e.key === "ArrowRight") step(1);
  else if (e.key === "ArrowLeft") step(-1);
  else if (e.key === "ArrowUp") update({ layer: Math.max(state.layer - 1, 0) });
  else if (e.key === "ArrowDown") update({ layer: Math.min(state.layer + 1, kind().layers.length - 1) });
});
"""
