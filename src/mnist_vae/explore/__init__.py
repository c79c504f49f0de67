"""`mnist-vae explore`: one self-contained HTML page that runs a trained model in the browser.

The page (page.html, explore.js, explore.css beside this file) holds everything inline:
its script and style, the network's weights as base64 float32, and the test set's posterior
means for the latent map. It makes no request of any kind, so it works opened from disk.
The network runs in a small hand-written JavaScript forward pass over those weights; the
layers are exported by walking the model's encoder and decoder (nn.Sequential) and mapping
each module by its kind, so a new model that uses the same kinds of layers needs no change
here, and one that uses another kind is refused in one line.
"""

import base64
import dataclasses
import html
import json
import math
import os
import re
import webbrowser
from importlib import resources
from pathlib import Path

import numpy as np
import torch

from .. import checkpoint, files, runs
from ..api import PRETRAINED, load
from ..arguments import Parser
from ..config import boolean, integer, text
from ..data import load_tensors
from ..errors import UserError

IMAGE_PIXELS = 28 * 28
MAX_SLIDERS = 32  # one slider per latent dimension, up to this many
# Activations the page implements, by class name (torch's and this project's own classes alike).
ACTIVATIONS = {"ELU": "elu", "Tanh": "tanh", "ReLU": "relu", "Sigmoid": "sigmoid", "LeakyReLU": "leaky_relu",
               "Softplus": "softplus"}
# Modules that do nothing at inference time (dropout is off in eval mode).
IGNORED = ("Dropout", "Identity")


class ExploreError(UserError):
    pass


class Blob:
    """The page's numbers: float32 arrays appended to one buffer, each known by its offset."""

    def __init__(self):
        self.parts, self.length = [], 0

    def add(self, array):
        array = np.ascontiguousarray(np.asarray(array, dtype=np.float32).reshape(-1))
        offset = self.length
        self.parts.append(array)
        self.length += array.size
        return offset

    def base64(self):
        data = np.concatenate(self.parts) if self.parts else np.zeros(0, np.float32)
        return base64.b64encode(data.astype("<f4").tobytes()).decode("ascii")


def export_layers(sequential, blob, what, path):
    """The layers of an nn.Sequential as a list of {"op": ...}, weights into `blob`."""
    layers = []
    for module in sequential:
        kind = type(module).__name__
        if kind == "Linear":
            weight = module.weight.detach().cpu().numpy()
            bias = module.bias.detach().cpu().numpy() if module.bias is not None else np.zeros(weight.shape[0])
            layers.append({"op": "linear", "in": int(weight.shape[1]), "out": int(weight.shape[0]),
                           "weight": blob.add(weight), "bias": blob.add(bias)})
        elif kind in ACTIVATIONS:
            layer = {"op": ACTIVATIONS[kind]}
            if kind == "ELU":
                layer["alpha"] = float(module.alpha)
            elif kind == "LeakyReLU":
                layer["slope"] = float(module.negative_slope)
            elif kind == "Softplus":
                layer.update(beta=float(module.beta), threshold=float(module.threshold))
            layers.append(layer)
        elif any(kind.endswith(name) for name in IGNORED):
            continue
        else:
            raise ExploreError(f"{path}: the {what} holds a {kind} layer, which the explore page cannot run; "
                               f"it runs Linear, {', '.join(ACTIVATIONS)} and dropout layers")
    if not layers or layers[0]["op"] != "linear":
        raise ExploreError(f"{path}: the {what} does not start with a Linear layer; the explore page cannot run it")
    return layers


def numpy_forward(layers, weights, x):
    """The page's forward pass in NumPy (float64): checks the export before the page is written."""
    for layer in layers:
        op = layer["op"]
        if op == "linear":
            w = weights[layer["weight"]: layer["weight"] + layer["in"] * layer["out"]].reshape(layer["out"], -1)
            x = x @ w.T.astype(np.float64) + weights[layer["bias"]: layer["bias"] + layer["out"]]
        elif op == "elu":
            x = np.where(x > 0, x, layer["alpha"] * np.expm1(np.minimum(x, 0)))
        elif op == "tanh":
            x = np.tanh(x)
        elif op == "relu":
            x = np.maximum(x, 0)
        elif op == "sigmoid":
            x = 1 / (1 + np.exp(-x))
        elif op == "leaky_relu":
            x = np.where(x > 0, x, layer["slope"] * x)
        elif op == "softplus":
            bx = layer["beta"] * x
            x = np.where(bx > layer["threshold"], x, np.log1p(np.exp(np.minimum(bx, 50))) / layer["beta"])
    return x


def model_facts(model):
    """(dim_z, conditional, n_classes) of a model, whichever version of the VAE class made it."""
    conditional = bool(getattr(model, "conditional", False))
    n_classes = int(getattr(model, "n_classes", getattr(model, "num_classes", 10))) if conditional else 0
    return int(model.dim_z), conditional, n_classes


def export_network(model, path="the model"):
    """The model's encoder and decoder for the page: (description, float32 blob), checked against torch."""

    dim_z, conditional, n_classes = model_facts(model)
    blob = Blob()
    encoder = export_layers(model.encoder, blob, "encoder", path)
    decoder = export_layers(model.decoder, blob, "decoder", path)
    shapes = {"encoder input": (encoder[0]["in"], IMAGE_PIXELS + n_classes),
              "encoder output": (_last_linear(encoder)["out"], 2 * dim_z),
              "decoder input": (decoder[0]["in"], dim_z + n_classes),
              "decoder output": (_last_linear(decoder)["out"], IMAGE_PIXELS)}
    for name, (found, expected) in shapes.items():
        if found != expected:
            raise ExploreError(f"{path}: the {name} has {found} values where the page expects {expected}; "
                               f"the model is not one the explore page knows")
    network = {"encoder": encoder, "decoder": decoder, "dim_z": dim_z, "conditional": conditional,
               "n_classes": n_classes, "likelihood": model.likelihood}
    # The page computes what these modules compute only if each module is what its name says:
    # run both on a few inputs and refuse a model where they differ.
    weights = np.concatenate(blob.parts).astype(np.float64)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for sequential, layers, width in ((model.encoder, encoder, encoder[0]["in"]),
                                          (model.decoder, decoder, decoder[0]["in"])):
            x = torch.rand((4, width), generator=generator)
            expected = sequential(x.to(next(model.parameters()).device)).cpu().double().numpy()
            found = numpy_forward(layers, weights, x.double().numpy())
            if not np.allclose(found, expected, atol=1e-3, rtol=1e-3):
                raise ExploreError(f"{path}: a layer of the model does not compute what its kind says "
                                   f"(largest difference {np.abs(found - expected).max():.3g}); "
                                   f"the explore page cannot run it")
    return network, blob


def _last_linear(layers):
    return [layer for layer in layers if layer["op"] == "linear"][-1]


def encode_means(model, images, labels):
    """Posterior means of `images` (n, 784) in float32, with the labels for conditional models."""

    _, conditional, n_classes = model_facts(model)
    means = []
    with torch.no_grad():
        for start in range(0, len(images), 2000):
            x = images[start: start + 2000]
            if conditional:
                y = torch.nn.functional.one_hot(torch.tensor(np.asarray(labels[start: start + 2000]), dtype=torch.long),
                                                n_classes).float()
                mu = model.encoder(torch.cat([x, y], dim=1))[:, : model.dim_z]
            else:
                mu = model.encoder(x)[:, : model.dim_z]
            means.append(mu.cpu().numpy())
    return np.concatenate(means).astype(np.float32)


def map_plane(means):
    """Where the map looks: (origin, axis u, axis v) in latent space, and each mean's (u, v).

    For dim_z 2 the latent plane itself; for more, the plane through the means' average
    spanned by their first two principal axes; for dim_z 1 the line, with the means spread
    over v by class for legibility (v then sets nothing).
    """
    dim_z = means.shape[1]
    if dim_z <= 2:
        origin = np.zeros(dim_z)
        axes = np.eye(2, dim_z)
    else:
        origin = means.astype(np.float64).mean(0)
        centred = means - origin
        values, vectors = np.linalg.eigh(centred.T @ centred)
        axes = vectors[:, np.argsort(values)[::-1][:2]].T
        # A principal axis has no sign of its own; fix one so the same run gives the same map.
        for axis in axes:
            if axis[np.argmax(np.abs(axis))] < 0:
                axis *= -1
    coords = (means - origin) @ axes.T
    return origin, axes, coords


def view_box(coords):
    """The map's square window [u0, u1] x [v0, v1] around the bulk of the points."""
    if len(coords) == 0:
        return [-3.0, 3.0, -3.0, 3.0]
    low, high = np.percentile(coords, 0.5, axis=0), np.percentile(coords, 99.5, axis=0)
    centre, half = (low + high) / 2, max(1.0, float((high - low).max()) / 2 * 1.15)
    return [float(centre[0] - half), float(centre[0] + half), float(centre[1] - half), float(centre[1] + half)]


def run_summary(config, state, run_dir):
    """The header's facts: the run's settings and its last test numbers."""
    # A folder name whose bytes are not UTF-8 reaches Python with surrogates, which no page can hold:
    # shown with U+FFFD where those bytes were.
    name = os.fsencode(Path(run_dir).resolve().name).decode("utf-8", "replace")
    facts = {"run": name, "dataset": config.dataset, "dim_z": config.dim_z,
             "n_hidden": config.n_hidden, "likelihood": config.likelihood, "binarize": config.binarize,
             "add_noise": bool(config.add_noise), "noise_factor": float(config.noise_factor),
             "epochs": int(state.get("epoch", 0))}
    history = state.get("history") or []
    # A conditional run's numbers bound log p(x|y): its metrics name them *_given_y; the header says so.
    given = "_given_y" if getattr(config, "conditional", False) else ""
    if given:
        facts["given_y"] = True
    if history:
        last = history[-1]
        for key in ("test_neg_elbo", "test_recon", "test_kl"):
            saved = key + given if key == "test_neg_elbo" else key
            if saved in last and last[saved] is not None:
                facts[key] = float(last[saved])
    evaluation = Path(run_dir) / "evaluation.json"
    if evaluation.is_file():
        try:
            values = json.loads(evaluation.read_text())
            if values.get(f"iw_nll{given}") is not None:
                stderr = values.get(f"iw_nll{given}_stderr")
                facts["nll"] = {"nll": float(values[f"iw_nll{given}"]),
                                "stderr": None if stderr is None else float(stderr), "k": int(values["k"])}
        except (ValueError, OSError, KeyError, TypeError):
            pass  # the header goes without the estimate rather than failing the page
    for name in ("beta", "objective", "conditional"):  # settings that later versions add
        if hasattr(config, name):
            facts[name] = getattr(config, name)
    return facts


def page_data(model, config, state, run_dir, images, labels, classes, path="the model"):
    """Everything the page needs, as (JSON-able dict, base64 float32 blob)."""
    network, blob = export_network(model, path)
    means = encode_means(model, images, labels)
    origin, axes, coords = map_plane(means)
    if config.dim_z == 1:
        coords = np.stack([coords[:, 0], (np.asarray(labels, np.float64) - 4.5) * 0.25], axis=1)
    data = {
        "format": "mnist-vae explore 1",
        "summary": run_summary(config, state, run_dir),
        "network": network,
        "classes": list(classes),
        "points": {"n": int(len(means)), "means": blob.add(means), "coords": blob.add(coords),
                   "labels": [int(label) for label in labels]},
        "plane": {"origin": blob.add(origin), "axes": blob.add(axes)},
        "view": view_box(coords),
        "slider_range": float(max(4.0, math.ceil(float(np.abs(means).max(initial=0)) + 0.5))),
        "max_sliders": MAX_SLIDERS,
    }
    return data, blob.base64()


def _asset(name):
    return (resources.files(__name__) / name).read_text(encoding="utf-8")


def render_page(data, blob_base64):
    """The HTML page: template, style, script and data inline."""
    script = _asset("explore.js")
    style = _asset("explore.css")
    for name, asset in (("explore.js", script), ("explore.css", style)):
        if "</" + "script" in asset.lower() or "</" + "style" in asset.lower() or "<!" + "--" in asset:
            raise AssertionError(f"{name} would close or hide its own inline tag")
    title = f"mnist-vae explore: {data['summary']['run']}"
    values = {"TITLE": html.escape(title), "STYLE": style, "DATA": inline_json(data), "WEIGHTS": blob_base64,
              "SCRIPT": script}
    # One pass over the template: a value is never searched for placeholders, so a run folder named
    # "{{DATA}}" stays a name (replacing one placeholder after another put the data into the title).
    return re.sub(r"\{\{(TITLE|STYLE|DATA|WEIGHTS|SCRIPT)\}\}", lambda match: values[match.group(1)],
                  _asset("page.html"))


def inline_json(data):
    """`data` as JSON that can stand inside a <script> element whatever its strings hold: <, > and & as
    \\u escapes (so neither "</script>" nor "<!--" can end or hide the element), and U+2028/U+2029,
    which older JavaScript parsers took for line ends. The escapes are JSON's own, so JSON.parse reads
    the same strings."""
    text = json.dumps(data, separators=(",", ":"))
    for character in "<>&\u2028\u2029":
        text = text.replace(character, f"\\u{ord(character):04x}")
    return text


def build_page(run_dir, n_points=None, device="cpu", log=print):
    """The explore page of the run in `run_dir`, as HTML text."""


    if _is_packaged(run_dir):

        packaged = load(run_dir, device=device)
        config, model, path = packaged.config, packaged.module, "the packaged model"
        state = {"epoch": packaged.epoch, "history": []}
    else:
        config, state, tensors = checkpoint.load(run_dir)
        path = Path(run_dir) / checkpoint.FILENAME
        model = checkpoint.build_model(config, tensors, path, state).to(device).eval()
    layers = int(getattr(model, "stochastic_layers", 1))
    if layers != 1:
        raise ExploreError(f"{path}: its {model.name} model has {layers} stochastic layers, and the explore page "
                           f"runs models of one z (vae, cvae) in the browser; use the Python API's encode, decode "
                           f"and sample, which work on its top z")
    n_points = config.PMLR_n_samples if n_points is None else n_points
    data_config = dataclasses.replace(config, n_test=n_points, n_train=1)
    test = load_tensors(data_config, torch.device(device), log=log)
    data, blob = page_data(model, config, state, run_dir, test.test, test.test_labels, test.classes, path)
    return render_page(data, blob)


def _is_packaged(run_dir):
    """Whether RUN_DIR names the model shipped with the package (a real folder of that name wins)."""

    return str(run_dir) == PRETRAINED and not Path(run_dir).is_dir()


def main(prog, args):
    """mnist-vae explore RUN_DIR [--out FILE.html] [--open]."""

    parser = Parser(prog=f"{prog} explore",
                    description="Write one self-contained HTML page that runs the trained model in your browser: "
                                "the latent map, decoding under the cursor, drawing and encoding, walks. It works "
                                "offline, opened straight from disk.")
    parser.add_argument("run_dir", metavar="RUN_DIR", help="the --output folder of a training run, or `pretrained` "
                                                           "for the model shipped with mnist-vae")
    parser.add_argument("--out", type=text, help="page to write (default: RUN_DIR/explore.html; for pretrained, "
                                                 "./explore.html)")
    parser.add_argument("--open", nargs="?", const=True, default=False, type=boolean,
                        metavar="BOOL", help="open the page in the system's web browser")
    parser.add_argument("--n_points", "--n-points", type=integer(1, 10000),
                        help="test images on the latent map (default: the run's PMLR_n_samples, 5000)")
    args = parser.parse_args(args)
    out = Path(args.out) if args.out else (Path("explore.html") if _is_packaged(args.run_dir)
                                           else Path(args.run_dir) / "explore.html")
    if args.out:
        if out.is_dir():
            raise ExploreError(f"--out {out} is a folder; give a file name such as {out / 'explore.html'}")
        if out.suffix.lower() not in (".html", ".htm"):
            raise ExploreError(f"--out {out}: give an .html file name")
        if not out.parent.is_dir():
            raise ExploreError(f"--out {out}: folder {out.parent} does not exist; create it or choose another path")
    # Writing into a run folder: not while a training writes there (cli.main releases the lock).
    runs.hold_if_run(out.parent, what="--out" if args.out else "the run folder")
    page = build_page(args.run_dir, args.n_points, log=lambda message: None)
    files.write_text(out, page)
    print(out)
    if args.open:

        if not webbrowser.open(out.resolve().as_uri()):
            print(f"note: no browser could be started; open {out} yourself")
    return 0

