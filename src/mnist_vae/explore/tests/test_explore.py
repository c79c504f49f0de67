"""Tests of `mnist-vae explore`: the page it writes, opened from disk in a real Chromium through Playwright.

The page's JavaScript is held to PyTorch: its decoded pixels, its preparation of a drawing
(against data.prepare_digit) and its encoder means. The models are tiny, with seeded random
weights, so that the whole module takes seconds; one browser serves every test.
Locally the browser tests skip when Chromium or Playwright is missing; with CI=true they fail.
"""

import base64
import gzip
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from mnist_vae import checkpoint, cli, data, images
from mnist_vae.config import Config
from mnist_vae.errors import UserError
from mnist_vae.explore import ExploreError, export_network, page_data, render_page
from mnist_vae.model import VAE, build

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run"]
ROOT = Path(__file__).resolve().parents[4]
SCREENSHOTS = ROOT / "docs" / "explore"
PIXEL_TOLERANCE = 1e-4


# ---------------------------------------------------------------- runs made for the tests

def write_idx(path, array):
    array = np.ascontiguousarray(array, dtype=np.uint8)
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(int(n).to_bytes(4, "big") for n in array.shape)
    path.write_bytes(gzip.compress(header + array.tobytes()))


@pytest.fixture(scope="module")
def dataset_dir(tmp_path_factory):
    """A small dataset in IDX files: blobs of random size and place, labels 0..9."""
    folder = tmp_path_factory.mktemp("data")
    rng = np.random.default_rng(0)
    for split, n in (("train", 20), ("t10k", 200)):
        ys, xs = np.indices((28, 28))
        centres = rng.uniform(8, 20, (n, 2, 1, 1))
        radius = rng.uniform(3, 8, (n, 1, 1))
        images = (np.hypot(ys - centres[:, 0], xs - centres[:, 1]) < radius) * 255
        write_idx(folder / f"{split}-images-idx3-ubyte.gz", images)
        write_idx(folder / f"{split}-labels-idx1-ubyte.gz", np.arange(n) % 10)
    return folder


def make_run(folder, data_dir, seed=0, **settings):
    """A run folder with a checkpoint of a VAE with seeded random weights (no training)."""
    config = Config(output=str(folder), data_dir=str(data_dir), n_hidden=settings.pop("n_hidden", 24), **settings)
    torch.manual_seed(seed)
    model = build(config)  # the old program's VAE, or the conditional one when the config says so
    # Larger weights than the default initialisation, so the decoded images vary over the map.
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.mul_(2.0)
    optimizer = torch.optim.Adam(model.parameters())
    folder.mkdir(parents=True, exist_ok=True)
    elbo = "neg_elbo_given_y" if config.conditional else "neg_elbo"
    history = [{"epoch": 1, f"train_{elbo}": 550.0, "train_recon": 545.0, "train_kl": 5.0, f"test_{elbo}": 543.21,
                "test_recon": 540.0, "test_kl": 3.21}]
    # Everything a checkpoint of training holds, so that it loads as one (checkpoint.check_contents).
    extra = {"rng.torch": torch.get_rng_state(), "rng.data_epoch_start": torch.Generator().get_state(),
             "progress.step_terms": torch.zeros((1, 4))}
    checkpoint.save(folder, model, optimizer, {"config": config.to_dict(), "model": model.name, "epoch": 1,
                                                 "step": 0, "history": history, "seconds_in_epoch": 0.0,
                                                 "data_source": "test"}, extra)
    return folder


def load_model(run_dir):
    config, _, tensors = checkpoint.load(run_dir)
    return checkpoint.build_model(config, tensors).eval()


def torch_decode(model, z):
    with torch.no_grad():
        return model.mean_image(model.decode(torch.tensor(np.asarray(z), dtype=torch.float32)[None]))[0].numpy()


def write_page(run_dir):
    out = Path(run_dir) / "explore.html"
    assert cli.main(["explore", str(run_dir)], prog="mnist-vae") == 0
    return out


@pytest.fixture(scope="module")
def run_z2(tmp_path_factory, dataset_dir):
    return make_run(tmp_path_factory.mktemp("z2") / "run", dataset_dir, dim_z=2)


@pytest.fixture(scope="module")
def run_z5(tmp_path_factory, dataset_dir):
    """dim_z 5, continuous Bernoulli, denoising: the other branches of the page."""
    return make_run(tmp_path_factory.mktemp("z5") / "run", dataset_dir, seed=1, dim_z=5,
                    likelihood="continuous_bernoulli", add_noise=True)


# ---------------------------------------------------------------- the browser

def missing_browser(reason):
    """Skip locally; in CI a missing browser is a failure, so the browser tests cannot silently vanish."""
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"{reason} (CI=true: the browser tests must run)", pytrace=False)
    pytest.skip(reason)


@pytest.fixture(scope="module")
def browser():
    """One headless Chromium with a fresh profile for the module's tests."""
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        missing_browser("Playwright is not installed: pip install 'mnist-vae[browser]'")
    if not CHROMIUM.exists():
        missing_browser(f"Chromium is not installed at {CHROMIUM}: apt-get install chromium")
    with sync_playwright() as playwright, tempfile.TemporaryDirectory() as profile:
        context = playwright.chromium.launch_persistent_context(
            profile, executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS,
            viewport={"width": 1240, "height": 980})
        yield context
        context.close()


class Page:
    """A page opened from disk, with every console error and every request it made."""

    def __init__(self, browser, path):
        self.url = Path(path).resolve().as_uri()
        self.page = browser.new_page()
        self.errors, self.requests = [], []
        self.page.on("console", lambda message: message.type == "error" and self.errors.append(message.text))
        self.page.on("pageerror", lambda error: self.errors.append(str(error)))
        self.page.on("request", lambda request: self.requests.append(request.url))
        started = time.perf_counter()
        self.page.goto(self.url)
        # Polled from here: Playwright's wait_for_function evaluates its predicate with eval() on every poll
        # after the first, which the page's Content-Security-Policy refuses (the page needs no eval), so it
        # can wait only for a page that is ready at its first check.
        while not self.js("Boolean(window.explore && window.explore.ready)"):
            assert time.perf_counter() - started < 10, f"the page did not become ready: {self.errors}"
            time.sleep(0.02)
        self.load_seconds = time.perf_counter() - started

    def js(self, expression, arg=None):
        return self.page.evaluate(expression, arg)

    def settled(self):
        self.js("explore.settled()")

    def state(self, name):
        return self.js(f"(() => {{ const v = explore.state.{name}; return v && Array.from(v); }})()")

    def box(self, selector):
        return self.js(f"(() => {{ const r = document.querySelector('{selector}').getBoundingClientRect(); "
                       f"return [r.left, r.top, r.width, r.height]; }})()")

    def map_point(self, x, y):
        """The (u, v) the map shows at client pixel (x, y), from the page's layout and its view box."""
        left, top, width, height = self.box("#map")
        u0, u1, v0, v1 = self.js("explore.data.view")
        return u0 + (x - left) / width * (u1 - u0), v1 - (y - top) / height * (v1 - v0)

    def map_pixel(self, fx, fy):
        """The whole client pixel at fractions (fx, fy) of the map."""
        left, top, width, height = self.box("#map")
        return round(left + fx * width), round(top + fy * height)

    def close(self):
        self.page.close()


@pytest.fixture
def open_page(browser):
    pages = []

    def opener(path):
        page = Page(browser, path)
        pages.append(page)
        return page

    yield opener
    for page in pages:
        page.close()


# ---------------------------------------------------------------- the command, no browser

def test_explore_writes_one_self_contained_page(run_z2, capsys):
    out = write_page(run_z2)
    assert capsys.readouterr().out.strip() == str(out)
    page = out.read_text()
    # Nothing outside the page: no linked script, style, image or font, no URL to fetch.
    assert not re.search(r"<(link|img|iframe|object|embed)\b", page)
    assert not re.search(r"""\b(src|href)\s*=""", page)
    assert not re.search(r"""(https?:)?//[a-z0-9.-]+\.[a-z]{2,}/""", page, re.I)
    data_json = json.loads(re.search(r'id="explore-data">(.*?)</script>', page, re.S).group(1))
    assert data_json["network"]["dim_z"] == 2 and data_json["network"]["conditional"] is False
    assert data_json["classes"] == [str(d) for d in range(10)]
    assert data_json["summary"]["test_neg_elbo"] == 543.21


def test_explore_out_and_open(run_z2, tmp_path, capsys, monkeypatch):
    import webbrowser

    opened = []
    monkeypatch.setattr(webbrowser, "open", lambda url: opened.append(url) or True)
    out = tmp_path / "page.html"
    assert cli.main(["explore", str(run_z2), "--out", str(out), "--open"], prog="mnist-vae") == 0
    assert out.is_file() and opened == [out.resolve().as_uri()]
    assert capsys.readouterr().out.strip() == str(out)


def bad_input_cases(run_z2, tmp_path):
    return {"no run": [str(tmp_path / "nothing")],
            "not html": [str(run_z2), "--out", str(tmp_path / "page.png")],
            "folder": [str(run_z2), "--out", str(tmp_path)],
            "no parent": [str(run_z2), "--out", str(tmp_path / "missing" / "page.html")]}


@pytest.mark.parametrize("case", ["no run", "not html", "folder", "no parent"])
def test_explore_bad_input_is_one_line(run_z2, tmp_path, capsys, case):
    code = cli.main(["explore", *bad_input_cases(run_z2, tmp_path)[case]], prog="mnist-vae")
    err = capsys.readouterr().err
    assert code == 1 and "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("mnist-vae: error:"), err
    assert not list(tmp_path.glob("*.html"))


def test_explore_bad_input_exits_non_zero_without_traceback(tmp_path):
    """The installed command, in its own process: exit status and one line."""
    result = subprocess.run([sys.executable, "-m", "mnist_vae", "explore", str(tmp_path / "nothing")],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and "holds no" not in result.stderr
    assert "is not a folder" in result.stderr


def test_unknown_layer_is_refused_in_one_line():
    model = VAE(2, 8)
    model.decoder[1] = nn.GELU()
    with pytest.raises(UserError) as excinfo:
        export_network(model, "run/checkpoint.safetensors")
    message = str(excinfo.value)
    assert isinstance(excinfo.value, ExploreError) and "\n" not in message
    assert "GELU" in message and "decoder" in message


def test_a_layer_that_lies_about_its_kind_is_refused():
    class Tanh(nn.Module):  # named like an activation the page knows, computing something else
        def forward(self, x):
            return x * 2

    model = VAE(2, 8)
    # Whichever activations the model uses, in whatever place: the first one is the impostor.
    index = next(i for i, module in enumerate(model.encoder) if type(module).__name__ in ("ELU", "Tanh"))
    model.encoder[index] = Tanh()
    with pytest.raises(ExploreError, match="does not compute what its kind says"):
        export_network(model)


# ---------------------------------------------------------------- the page in Chromium

@pytest.mark.parametrize("dim_z", [2, 1])
def test_page_opens_from_disk_without_error_or_request(dim_z, run_z2, dataset_dir, tmp_path, open_page):
    run = run_z2 if dim_z == 2 else make_run(tmp_path / "z1", dataset_dir, dim_z=1)
    page = open_page(write_page(run))
    page.page.mouse.move(*page.map_pixel(0.5, 0.5))
    page.settled()
    assert page.errors == []
    assert page.requests == [page.url]  # the page itself, and nothing else
    header = page.js("document.getElementById('summary').textContent")
    assert f"dim_z {dim_z}" in header and "test −ELBO 543.21" in header and "1 epochs" in header
    assert page.js("document.querySelectorAll('#legend > span').length") == 10
    assert page.js("document.getElementById('noise-control').hidden") is True
    assert page.js("document.getElementById('class-panel').hidden") is True


@pytest.mark.parametrize("which", ["z2", "z5"])
def test_pointer_on_the_map_decodes_what_torch_decodes(which, run_z2, run_z5, open_page):
    run = {"z2": run_z2, "z5": run_z5}[which]
    model = load_model(run)
    page = open_page(write_page(run))
    decoded_before = page.state("decoded")
    for fx, fy in ((0.3, 0.7), (0.8, 0.2)):
        x, y = page.map_pixel(fx, fy)
        page.page.mouse.move(x, y)
        page.settled()
        z = np.array(page.state("shown"))
        u, v = page.map_point(x, y)
        if which == "z2":  # the map is the latent plane: the point is where the pointer is
            np.testing.assert_allclose(z, [u, v], atol=1e-9)
        else:  # on the principal plane, through the pinned point
            np.testing.assert_allclose(page.js("z => explore.project(z)", z.tolist()), [u, v], atol=1e-9)
        pixels = np.array(page.state("decoded"))
        assert np.abs(pixels - torch_decode(model, z)).max() <= PIXEL_TOLERANCE
        assert np.abs(pixels - np.array(decoded_before)).max() > 0.01  # it did change
        decoded_before = pixels
        # The big image shows those pixels, scaled without smoothing from a 28 x 28 canvas.
        shown = page.js("""(() => { const c = document.getElementById('decoded');
            return Array.from(c.getContext('2d').getImageData(0, 0, 28, 28).data.filter((_, i) => i % 4 == 0)); })()""")
        assert np.abs(np.array(shown) - np.round(pixels * 255)).max() <= 1
    assert page.js("getComputedStyle(document.getElementById('decoded')).imageRendering") == "pixelated"
    assert page.errors == []


def draw_seven(page):
    """A scripted stroke: a '7' with the mouse on the drawing canvas."""
    left, top, width, height = page.box("#draw")
    path = [(0.25, 0.2), (0.75, 0.2), (0.7, 0.35), (0.55, 0.6), (0.45, 0.85)]
    mouse = page.page.mouse
    mouse.move(left + path[0][0] * width, top + path[0][1] * height)
    mouse.down()
    for fx, fy in path[1:]:
        mouse.move(left + fx * width, top + fy * height, steps=6)
    mouse.up()
    page.settled()


def python_prepared(page, tmp_path):
    """The page's drawing as a PNG file, read and prepared by the Python path of `mnist-vae reconstruct`."""
    url = page.js("explore.drawingPNG()")
    path = tmp_path / "drawing.png"
    path.write_bytes(base64.b64decode(url.split(",", 1)[1]))
    return images.load_user_image(path)


def test_stroke_is_prepared_and_encoded_as_in_python(run_z2, open_page, tmp_path):
    model = load_model(run_z2)
    page = open_page(write_page(run_z2))
    draw_seven(page)
    prepared = np.array(page.js("Array.from(explore.state.drawing.prepared)"))
    expected = python_prepared(page, tmp_path)
    assert expected.max() > 0.9 and prepared.shape == (784,)
    assert np.abs(prepared - expected).max() <= 1e-6
    mu = np.array(page.js("Array.from(explore.state.drawing.mu)"))
    std = np.array(page.js("Array.from(explore.state.drawing.std)"))
    with torch.no_grad():
        torch_mu, torch_std = model.encode(torch.from_numpy(expected)[None])
    assert np.abs(mu - torch_mu[0].numpy()).max() <= 1e-4
    assert np.abs(std - torch_std[0].numpy()).max() <= 1e-4
    # The drawing becomes the current point, and its reconstruction is the decoded mean.
    np.testing.assert_allclose(page.state("z"), mu)
    reconstruction = np.array(page.js("Array.from(explore.state.drawing.reconstruction)"))
    assert np.abs(reconstruction - torch_decode(model, mu)).max() <= PIXEL_TOLERANCE
    page.page.click("#clear")
    page.settled()
    assert page.js("explore.state.drawing") is None
    assert page.errors == []


# Grey images that take every branch of the preparation: light and dark backgrounds, wide and
# tall ink, images to shrink and to enlarge, ink that fills the frame, and soft grey levels.
def preparation_cases():
    rng = np.random.default_rng(3)
    ys, xs = np.indices((90, 60))
    ring = (np.abs(np.hypot(ys - 45, xs - 30) - 20) < 4).astype(np.float32)
    cases = {"dark ring": ring, "light ring": 1 - ring,
             "wide bar": np.pad(np.ones((5, 50), np.float32), 7),
             "tiny dot to enlarge": np.pad(np.float32([[0.3, 1], [1, 0.6]]), 3),
             "full frame": rng.random((33, 41)).astype(np.float32),
             "soft grey": np.clip(ring * 0.7 + rng.random(ring.shape).astype(np.float32) * 0.25, 0, 1)}
    return {name: (np.round(grey * 255) / np.float32(255)).astype(np.float32) for name, grey in cases.items()}


def test_preparation_matches_prepare_digit(run_z2, open_page):
    page = open_page(write_page(run_z2))
    for name, grey in preparation_cases().items():
        expected = images.prepare_digit(grey)
        found = page.js("([g, w, h]) => Array.from(explore.prepare(Float32Array.from(g), w, h))",
                        [grey.ravel().tolist(), grey.shape[1], grey.shape[0]])
        assert np.abs(np.array(found) - expected).max() <= 1e-6, name


def test_sliders_show_and_move_the_point(run_z5, open_page):
    model = load_model(run_z5)
    page = open_page(write_page(run_z5))
    assert page.js("document.querySelectorAll('#sliders input[type=range]').length") == 5
    # Hovering over the map sets the sliders to the point under the pointer.
    page.page.mouse.move(*page.map_pixel(0.6, 0.4))
    page.settled()
    shown = page.state("shown")
    values = page.js("Array.from(document.querySelectorAll('#sliders input'), s => Number(s.value))")
    np.testing.assert_allclose(values, shown, atol=0.005)
    page.page.mouse.click(*page.map_pixel(0.6, 0.4))  # pin it
    page.page.mouse.move(5, 5)  # and leave the map
    page.settled()
    before = np.array(page.state("z"))
    map_before = page.js("z => explore.project(z)", before.tolist())
    slider = page.page.locator("#slider-3")
    slider.focus()
    for _ in range(40):
        slider.press("ArrowRight")
    page.settled()
    after = np.array(page.state("z"))
    assert after[3] == pytest.approx(float(slider.input_value()))
    assert after[3] - before[3] == pytest.approx(0.4, abs=0.011)
    np.testing.assert_allclose(np.delete(after, 3), np.delete(before, 3))
    assert np.abs(np.subtract(page.js("z => explore.project(z)", after.tolist()), map_before)).max() > 1e-3
    assert np.abs(np.array(page.state("decoded")) - torch_decode(model, after)).max() <= PIXEL_TOLERANCE
    assert page.errors == []


def test_walk_strip_runs_from_a_to_b(run_z2, open_page):
    model = load_model(run_z2)
    page = open_page(write_page(run_z2))
    ends = []
    for fraction, button in (((0.2, 0.3), "#walk-a"), ((0.85, 0.75), "#walk-b")):
        page.page.mouse.click(*page.map_pixel(*fraction))
        page.settled()
        ends.append(np.array(page.state("z")))
        page.page.click(button)
    page.settled()
    walk = np.array(page.js("explore.state.walk.map(image => Array.from(image))"))
    assert walk.shape == (10, 784)
    assert np.abs(walk[0] - torch_decode(model, ends[0])).max() <= PIXEL_TOLERANCE
    assert np.abs(walk[-1] - torch_decode(model, ends[1])).max() <= PIXEL_TOLERANCE
    third = ends[0] + (ends[1] - ends[0]) * 3 / 9
    assert np.abs(walk[3] - torch_decode(model, third)).max() <= PIXEL_TOLERANCE
    assert np.abs(walk[0] - walk[-1]).max() > 0.01
    assert page.errors == []


def test_noise_slider_of_a_denoising_run(run_z5, open_page):
    page = open_page(write_page(run_z5))
    assert page.js("document.getElementById('noise-control').hidden") is False
    draw_seven(page)
    clean = np.array(page.js("Array.from(explore.state.drawing.input)"))
    page.page.locator("#noise").focus()
    for _ in range(6):
        page.page.locator("#noise").press("ArrowRight")
    page.settled()
    noisy = np.array(page.js("Array.from(explore.state.drawing.input)"))
    prepared = np.array(page.js("Array.from(explore.state.drawing.prepared)"))
    np.testing.assert_allclose(clean, prepared)
    assert 0.05 < np.abs(noisy - prepared).mean() < 0.5 and noisy.min() >= 0 and noisy.max() <= 1
    assert page.errors == []


def one_hot(cls, n=10):
    return nn.functional.one_hot(torch.tensor([cls]), n).float()


def conditional_pixels(model, z, cls):
    """What a conditional model decodes at z in class cls: the decoder on [z, one-hot]."""
    with torch.no_grad():
        logits = model.decoder(torch.cat([torch.tensor(z, dtype=torch.float32)[None], one_hot(cls)], 1))
        return model.mean_image(logits)[0].numpy()


def check_class_picker(page, model):
    """The class picker re-decodes the point in every class, and a drawing is encoded with the class."""
    dim_z = model.dim_z
    assert page.js("document.getElementById('class-panel').hidden") is False
    page.page.mouse.click(*page.map_pixel(0.4, 0.6))
    page.settled()
    z = page.state("z")
    strip = np.array(page.js("explore.state.classStrip.map(image => Array.from(image))"))
    assert strip.shape == (10, 784)
    for cls in range(10):
        assert np.abs(strip[cls] - conditional_pixels(model, z, cls)).max() <= PIXEL_TOLERANCE
    assert np.abs(np.array(page.state("decoded")) - strip[0]).max() <= PIXEL_TOLERANCE
    page.page.click("#class-picker button[data-cls='7']")
    page.settled()
    assert page.js("explore.state.cls") == 7
    decoded = np.array(page.state("decoded"))
    assert np.abs(decoded - conditional_pixels(model, z, 7)).max() <= PIXEL_TOLERANCE
    assert np.abs(decoded - strip[0]).max() > 0.05  # another class, another image
    draw_seven(page)
    drawn = torch.tensor(page.js("Array.from(explore.state.drawing.input)"), dtype=torch.float32)
    with torch.no_grad():
        out = model.encoder(torch.cat([drawn[None], one_hot(7)], 1))
    assert np.abs(np.array(page.js("Array.from(explore.state.drawing.mu)")) - out[0, :dim_z].numpy()).max() <= 1e-4
    assert page.errors == []


class HandMadeConditional(nn.Module):
    """The conditional model's seam: the one-hot class after x and after z."""

    def __init__(self, dim_z=3, n_hidden=16, n_classes=10):
        super().__init__()
        torch.manual_seed(5)
        self.dim_z, self.n_classes, self.conditional, self.likelihood = dim_z, n_classes, True, "bernoulli"
        self.encoder = nn.Sequential(nn.Linear(784 + n_classes, n_hidden), nn.ELU(), nn.Dropout(0.1),
                                     nn.Linear(n_hidden, 2 * dim_z))
        self.decoder = nn.Sequential(nn.Linear(dim_z + n_classes, n_hidden), nn.Tanh(),
                                     nn.Linear(n_hidden, 784))
        with torch.no_grad():
            self.decoder[0].weight[:, dim_z:] *= 8  # the class matters to the image

    def mean_image(self, logits):
        return torch.sigmoid(logits)


def test_class_picker_on_a_hand_made_conditional_model(dataset_dir, tmp_path, open_page):
    model = HandMadeConditional().eval()
    config = Config(dim_z=3, n_hidden=16)
    test = data.load_dataset("mnist", dataset_dir)
    images = torch.from_numpy(test.test_images[:100].reshape(100, -1) / np.float32(255))
    path = tmp_path / "conditional.html"
    path.write_text(render_page(*page_data(model, config, {"epoch": 3, "history": []}, tmp_path, images,
                                           test.test_labels[:100], test.classes)))
    check_class_picker(open_page(path), model)


def test_class_picker_on_a_real_conditional_run(dataset_dir, tmp_path, open_page):
    run = make_run(tmp_path / "conditional", dataset_dir, dim_z=2, conditional=True)
    model = load_model(run)
    assert getattr(model, "conditional", False)
    page = open_page(write_page(run))
    assert page.js("explore.data.network.conditional") is True
    check_class_picker(page, model)


def test_a_default_size_page_loads_within_two_seconds(tmp_path, dataset_dir, open_page):
    run = make_run(tmp_path / "big", dataset_dir, dim_z=20, n_hidden=500)
    out = write_page(run)
    page = open_page(out)
    assert out.stat().st_size > 6e6  # the weights of a default model are all there
    assert page.load_seconds < 2.0, page.load_seconds
    assert page.js("document.querySelectorAll('#sliders input').length") == 20
    assert page.errors == []


# ---------------------------------------------------------------- folder names of every kind

# A run folder named like a placeholder of the template broke the page (the placeholders were filled one
# after another, the title first), and one holding "<!--" inside the data's script element swallowed the
# rest of the document. Each must stay a name: the page works, and says it.
STRANGE_NAMES = ["{{DATA}}", "{{SCRIPT}}{{DATA}}", "x<!--<script>", "&amp;<b>\u2028\u2029 ]]>"]


@pytest.mark.parametrize("name", STRANGE_NAMES)
def test_a_page_works_whatever_its_run_folder_is_named(name, dataset_dir, tmp_path, open_page):
    run = make_run(tmp_path / name, dataset_dir, dim_z=2)
    page = open_page(write_page(run))
    assert page.errors == []
    assert page.js("document.title") == f"mnist-vae explore: {name}"
    assert page.js("explore.data.summary.run") == name
    assert page.js("document.getElementById('summary').textContent").startswith(name + " \u00b7 mnist")
    assert page.js("document.querySelectorAll('script').length") == 3  # the data, the weights, the program
    # The page still runs its model: the pointer decodes what torch decodes.
    page.page.mouse.move(*page.map_pixel(0.4, 0.6))
    page.settled()
    z = np.array(page.state("shown"))
    assert np.abs(np.array(page.state("decoded")) - torch_decode(load_model(run), z)).max() <= PIXEL_TOLERANCE


@pytest.mark.parametrize("name", STRANGE_NAMES)
def test_the_page_holds_each_placeholder_once_and_no_markup_in_its_data(name, dataset_dir, tmp_path):
    """Without a browser: the template filled in one pass, and the inline JSON free of <, > and &."""
    page = write_page(make_run(tmp_path / name, dataset_dir, dim_z=2)).read_text()
    data_text = re.search(r'<script type="application/json" id="explore-data">(.*?)</script>', page, re.S).group(1)
    assert not set("<>&\u2028\u2029") & set(data_text)
    assert json.loads(data_text)["summary"]["run"] == name
    assert page.count('id="explore-data"') == 1 and page.count("<title>") == 1
    assert "{{" not in page.replace(name, "")  # no placeholder left unfilled


def test_a_conditional_runs_header_shows_its_test_elbo(dataset_dir, tmp_path, open_page):
    run = make_run(tmp_path / "conditional", dataset_dir, dim_z=2, conditional=True)
    (run / "evaluation.json").write_text(json.dumps({"iw_nll_given_y": 530.5, "iw_nll_given_y_stderr": 1.25,
                                                     "k": 100}))
    page = open_page(write_page(run))
    header = page.js("document.getElementById('summary').textContent")
    assert "conditional" in header and "test \u2212ELBO(x|y) 543.21" in header, header
    assert "test NLL(x|y) 530.50 \u00b1 1.25 (k=100)" in header, header
    assert page.errors == []


# ---------------------------------------------------------------- the README's screenshots

def test_screenshots_of_real_runs(open_page, tmp_path):
    """With MNIST_VAE_EXPLORE_RUNS=RUN_DIR[:RUN_DIR...], pictures of each run's page into docs/explore/."""
    runs = [Path(run) for run in os.environ.get("MNIST_VAE_EXPLORE_RUNS", "").split(":") if run]
    if not runs:
        pytest.skip("set MNIST_VAE_EXPLORE_RUNS to run folders to take the README's screenshots")
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    for run in runs:
        out = tmp_path / f"{run.name}.html"
        assert cli.main(["explore", str(run), "--out", str(out)], prog="mnist-vae") == 0
        page = open_page(out)
        decode_ms = page.js("""(() => { const z = explore.state.z, t = performance.now();
            for (let i = 0; i < 50; i++) explore.decode(z, 0);
            return (performance.now() - t) / 50; })()""")
        print(f"{run}: {out.stat().st_size / 1e6:.1f} MB, loaded in {page.load_seconds:.2f} s, "
              f"one decode {decode_ms:.2f} ms")
        # A walk between two pinned points, then a drawn '7' with its ellipse, the pointer elsewhere.
        page.page.mouse.click(*page.map_pixel(0.3, 0.7))
        page.page.click("#walk-a")
        page.page.mouse.click(*page.map_pixel(0.7, 0.3))
        page.page.click("#walk-b")
        draw_seven(page)
        page.page.mouse.move(*page.map_pixel(0.6, 0.6))
        page.settled()
        assert page.errors == []
        summary = page.js("explore.data.summary")
        name = f"{summary['dataset']}_dim{summary['dim_z']}.png"
        page.page.screenshot(path=str(SCREENSHOTS / name), full_page=True)


def test_explore_pretrained_writes_the_packaged_models_page(tmp_path, open_page, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the packaged model has no run folder: the page goes to the current one
    assert cli.main(["explore", "pretrained", "--n_points", "200"], prog="mnist-vae") == 0
    page = open_page(tmp_path / "explore.html")
    assert page.js("explore.data.network.dim_z") == 2
    assert page.errors == []
