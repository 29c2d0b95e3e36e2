"""The attention page in a real browser: headless Chromium (Debian's package) driven by Playwright.

For a chosen kind, layer and head (through the URL hash, as a link would), the canvas shows that head's
weights in the viridis colours (pixels checked against the data), many distinct colours, and no console
error; choosing another head in the page's select element changes the picture to that head; hovering a
cell reads out its weight and tokens.

Chromium is found at $TFORMER_CHROMIUM or as `chromium` (or `chromium-browser`, `google-chrome`) on PATH.
`./dev test` installs Debian's package where it is missing (decision in docs/decisions.md). Without a
browser this test fails under CI (CI set in the environment) and is skipped with the reason elsewhere.
"""

from __future__ import annotations

import io
import os
import shutil

import matplotlib.image
import numpy as np
import pytest

from support import models as viz_models
from tformer.viz.attention import attention_maps
from tformer.viz.html import attention_html, page_data

BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")


def _chromium() -> str:
    path = os.environ.get("TFORMER_CHROMIUM") or next(filter(None, map(shutil.which, BROWSERS)), None)
    if path:
        return path
    message = (
        "no Chromium found (looked for $TFORMER_CHROMIUM, " + ", ".join(BROWSERS) + "); "
        "`./dev test` installs Debian's chromium package, or run `apt-get install chromium`"
    )
    if os.environ.get("CI"):
        pytest.fail(message)
    pytest.skip(message)


@pytest.fixture(scope="module")
def browser():
    executable = _chromium()
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=executable, args=["--force-device-scale-factor=1"])
        yield b
        b.close()


def _open(browser, url, problems):
    page = browser.new_page(viewport={"width": 1100, "height": 900})
    page.on(
        "console",
        lambda m: problems.append(f"console {m.type}: {m.text}") if m.type in ("error", "warning") else None,
    )
    page.on("pageerror", lambda e: problems.append(f"page error: {e}"))
    page.goto(url)
    return page


def _cells(page) -> tuple[np.ndarray, dict, np.ndarray]:
    """Screenshot of the canvas -> (colours at the cell centres (rows, cols, 3) in 0..255, the page's view,
    the cells' region of the screenshot)."""
    v = page.evaluate("window.tformerView")
    image = matplotlib.image.imread(io.BytesIO(page.locator("#map").screenshot(type="png")), format="png")
    c = v["cell"]
    region = image[v["top"] : v["top"] + v["rows"] * c, v["left"] : v["left"] + v["cols"] * c, :3]
    middle = [int((n + 0.5) * c) for n in range(max(v["rows"], v["cols"]))]
    centres = region[middle[: v["rows"]]][:, middle[: v["cols"]]]
    return (centres * 255).round(), v, region


def _expected(data, kind: str, layer: int, head: int) -> np.ndarray:
    """The viridis colour of each weight of that head, as the page maps it (0 to 1, 256 colours)."""
    k = next(k for k in data["kinds"] if k["name"] == kind)
    w = np.array(k["layers"][layer - 1][head - 1])
    return np.array(data["colormap"])[np.round(w * 255).astype(int)]


def _distinct(region: np.ndarray) -> int:
    return len(np.unique((region * 255).round().astype(np.uint8).reshape(-1, 3), axis=0))


def test_page_renders_the_chosen_head_and_follows_the_controls(browser, tmp_path):
    maps = attention_maps(
        viz_models.translator(), "le chat noir dort sur le tapis rouge", target="the black cat sleeps"
    )
    path = attention_html(maps, tmp_path / "attention.html")
    data = page_data(maps)
    problems: list[str] = []
    page = _open(browser, path.as_uri() + "#kind=cross&layer=2&head=3", problems)
    page.wait_for_selector('body[data-view="cross/2/3"]')
    assert (
        page.input_value("#kind") == "2"
        and page.input_value("#layer") == "1"
        and page.input_value("#head") == "2"
    )

    first, view, region = _cells(page)
    assert view["rows"] == 5 and view["cols"] == 8  # 4 target tokens + EOS, 8 source words
    assert _distinct(region) >= 10  # a heatmap, not a blank or flat canvas
    np.testing.assert_allclose(first, _expected(data, "cross", 2, 3), atol=2)

    page.select_option("#head", "0")  # the user picks head 1
    page.wait_for_selector('body[data-view="cross/2/1"]')
    second, _, _ = _cells(page)
    assert np.abs(second - first).max() > 20  # another picture ...
    np.testing.assert_allclose(second, _expected(data, "cross", 2, 1), atol=2)  # ... the one of head 1
    assert page.evaluate("location.hash") == "#kind=cross&layer=2&head=1"

    page.select_option("#kind", "0")  # encoder self-attention: source words on both axes
    page.wait_for_selector('body[data-view="encoder/2/1"]')
    third, _, _ = _cells(page)
    np.testing.assert_allclose(third, _expected(data, "encoder", 2, 1), atol=2)

    v = page.evaluate("window.tformerView")
    box = page.locator("#overlay").bounding_box()
    i, j = 2, 5
    page.mouse.move(box["x"] + v["left"] + (j + 0.5) * v["cell"], box["y"] + v["top"] + (i + 0.5) * v["cell"])
    weight = data["kinds"][0]["layers"][1][0][i][j]
    readout = page.text_content("#readout")
    assert "\u201cnoir\u201d" in readout and "\u201cle\u201d" in readout and f"{weight:.4f}" in readout

    page.keyboard.press("ArrowRight")  # the next head from the keyboard
    page.wait_for_selector('body[data-view="encoder/2/2"]')
    page.close()
    assert problems == []


def test_lm_page_renders_without_errors(browser, tmp_path):
    maps = attention_maps(viz_models.generator(), "the cat sat")
    path = attention_html(maps, tmp_path / "lm.html")
    problems: list[str] = []
    page = _open(browser, path.as_uri() + "#head=mean", problems)
    page.wait_for_selector('body[data-view="self/1/mean"]')
    cells, view, region = _cells(page)
    assert view["rows"] == view["cols"] == len("the cat sat")
    assert _distinct(region) >= 10
    # causal: every cell above the diagonal shows weight 0 (viridis' first colour)
    above = cells[np.triu_indices(len("the cat sat"), 1)]
    np.testing.assert_allclose(above, np.tile([68, 1, 84], (len(above), 1)), atol=2)
    page.close()
    assert problems == []


def test_vision_page_draws_the_chosen_head_and_the_rollout(browser, tmp_path):
    """The vision page (tformer.viz.vision): at full opacity each patch of the canvas is the inferno colour
    of its weight over the map's largest; the rollout view and the hover readout follow the data."""
    from PIL import Image

    from support.images import tiny_vision
    from tformer.data.transforms import Normalisation
    from tformer.models.vit import VisionTransformer
    from tformer.tasks.vision import ImageClassifier
    from tformer.viz.vision import page_data as vision_data
    from tformer.viz.vision import vision_html, vision_maps

    torch = pytest.importorskip("torch")
    torch.manual_seed(0)
    model = VisionTransformer(tiny_vision(image_size=8, patch_size=2, n_heads=2))
    image = tmp_path / "img.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (8, 8), dtype=np.uint8)).save(image)
    maps = vision_maps(ImageClassifier(model, ["a", "b", "c"], Normalisation((0.5,), (0.25,))), image)
    path = vision_html(maps, tmp_path / "attention.html")
    data = vision_data(maps)
    problems: list[str] = []
    page = _open(browser, path.as_uri() + "#view=head&layer=2&head=1", problems)
    page.wait_for_selector('body[data-view="2/1"]')
    page.evaluate(
        "() => { const a = document.getElementById('alpha'); a.value = 100; a.dispatchEvent(new Event('input')); }"
    )

    def patches() -> np.ndarray:
        shot = matplotlib.image.imread(io.BytesIO(page.locator("#map").screenshot(type="png")), format="png")
        v = page.evaluate("window.tformerView")
        cell = v["size"] / v["grid"]
        middle = [int((n + 0.5) * cell) for n in range(v["grid"])]
        return (shot[middle][:, middle, :3] * 255).round().reshape(-1, 3)

    def colours(w) -> np.ndarray:
        w = np.array(w)
        return np.array(data["colormap"])[np.round(255 * w / w.max()).astype(int)]

    np.testing.assert_allclose(patches(), colours(data["layers"][1][0]), atol=2)
    page.select_option("#view", "rollout")
    page.wait_for_selector('body[data-view="rollout"]')
    np.testing.assert_allclose(patches(), colours(data["rollout"]), atol=2)
    box = page.locator("#map").bounding_box()
    page.mouse.move(box["x"] + box["width"] * 0.9, box["y"] + box["height"] * 0.1)  # row 1, column 4
    assert f"row 1, column 4: [CLS] weight {data['rollout'][3]:.4f}" in page.text_content("#readout")
    page.close()
    assert problems == []
