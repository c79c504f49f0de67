"""The Python API: load a trained model (a run folder, or the one shipped in the package) and use it, or train one.

    import mnist_vae
    model = mnist_vae.load("pretrained")          # or a run folder: mnist_vae.load("runs/z2")
    mu, std = model.encode(images)                # q(z|x) of each image
    pictures = model.decode(mu)                   # (N, 28, 28) mean pixel values in [0, 1]

The command line's model commands (evaluate, sample, reconstruct, denoise, interpolate,
classify, analogies, export) are calls of these methods plus writing a picture or printing,
so there is one implementation of each.

Images may be a NumPy array of shape (N, 28, 28) or (N, 784) (or one image, (28, 28) or
(784,)), uint8 in 0..255 or float in [0, 1]; a torch tensor of the same; a PIL image or a
path to a PNG or JPEG (prepared as MNIST's digits were, as the command line does); or a
list of these. Outputs are NumPy arrays, or torch tensors when a tensor came in.

Bad arguments raise ValueError or TypeError; where the command line reports the same
problem (a bad run folder, an unreadable image, a bad setting or a refused training), the
message is the line it prints.

A conditional model (a run trained with --conditional) takes labels: `sample(n, label=7)`,
`decode(z, labels)`, `encode`/`reconstruct(images, labels)` (the labels it finds when none are
given), `elbo`/`log_likelihood(images, labels=...)` of log p(x|y), `classify(images)` (p(y|x)),
`predict(images)` (the class of each image) and `analogies(images)` (each image's style as every class).
"""

from __future__ import annotations

import dataclasses
import math
import os
from pathlib import Path
from typing import Any, Callable, Optional, Union

import numpy as np
import torch
from PIL import Image

from . import checkpoint, limits, loop, pretrained, runs
from .config import SETTINGS, Config, SettingError, bad_value_line, resume_conflict
from .data import DATASETS, add_noise, class_index, load_tensors
from .errors import ArgumentError, ArgumentTypeError, UserError, as_argument_error
from .evaluation import (EVAL_SEED, classifier_accuracy, evaluate, log_likelihood_estimate, log_likelihoods,
                         reconstruct)
from .export import export_onnx
from .images import load_user_image, prepare_digit
from .machine import resolve_device
from .model import analogies, classify, noise_size

__all__ = ["Model", "load", "train", "prepare_images", "PRETRAINED", "ArgumentError", "ArgumentTypeError"]

PRETRAINED = "pretrained"  # the name that loads the model shipped in the package
DEVICES = ("auto", "cpu", "cuda", "mps")  # what --device accepts

Images = Any  # np.ndarray | torch.Tensor | PIL.Image.Image | str | os.PathLike | a list of these
Labels = Any  # None | a class number or name | a sequence, NumPy array or tensor of them (conditional models)


# ---------------------------------------------------------------- loading

def load(run_dir: Union[str, os.PathLike] = PRETRAINED, device: str = "cpu") -> "Model":
    """The trained model of a run folder (the --output of a training run), ready to use.

    `run_dir="pretrained"` loads the dim_z 2 MNIST model shipped with the package, unless a
    folder named `pretrained` exists in the current directory: a real folder always wins.
    `device` is "cpu" (the default, whatever device trained the model), "cuda", "mps" or "auto".
    Raises ValueError for a missing folder, a folder without a checkpoint, or a damaged checkpoint.
    """
    if not isinstance(run_dir, (str, os.PathLike)):
        raise ArgumentTypeError(f"run_dir must be a folder name (str or path), not {type(run_dir).__name__}")
    if device not in DEVICES:
        raise ArgumentError(f"device must be one of auto, cpu, cuda, mps; got {device!r}")
    try:
        torch_device = resolve_device(device)
        if str(run_dir) == PRETRAINED and not Path(run_dir).is_dir():
            config, module, info = pretrained.load_model()
            return Model(module.to(torch_device), config, epoch=info["epoch"], run_dir=None, name=PRETRAINED,
                         provenance=info["provenance"])
        config, state, tensors = checkpoint.load(run_dir)
        module = checkpoint.build_model(config, tensors, Path(run_dir) / checkpoint.FILENAME, state)
    except UserError as e:
        raise as_argument_error(e) from None
    return Model(module.to(torch_device), config, epoch=state["epoch"], run_dir=Path(run_dir), name=str(run_dir),
                 data_fingerprint=state.get("data_fingerprint"))


def train(output: Union[str, os.PathLike] = "results", *, resume: bool = False, overwrite: bool = False,
          log: Callable[[str], None] = print, **settings: Any) -> "Model":
    """Train a model exactly as `mnist-vae --output OUTPUT --SETTING VALUE ...` does; return it loaded.

    `settings` are the command line's flags by their Python names (dim_z=2, num_epochs=60, ...),
    with the same defaults and checks; every file lands in `output`, as from the command line.
    `resume=True` continues the run in `output` (settings that define the model must then match
    it), or finishes its missing --eval_k estimate; `overwrite=True` writes over an earlier run
    there. Progress goes to `log` (print). Raises TypeError for an unknown setting and ValueError
    for a bad value. The command line's training is this function.
    """
    unknown = sorted(set(settings) - set(SETTINGS))
    if "output" in settings or unknown:
        name = "output" if "output" in settings else unknown[0]
        raise ArgumentTypeError(f"train() got an unknown setting {name!r}" + (
            "; pass the folder as train(output=...)" if name == "output" else
            f"; the settings are {', '.join(SETTINGS)}"))
    for flag, value in (("resume", resume), ("overwrite", overwrite)):
        if not isinstance(value, bool):
            raise ArgumentTypeError(f"{flag} must be True or False, not {value!r}")
    if not callable(log):
        raise ArgumentTypeError(f"log must be a function of one line of text (print, or lambda line: None), "
                                f"not {type(log).__name__}")
    output = os.fspath(output)
    # The folder's lock first, as on the command line: it creates the folder, and removes it again if the
    # run fails before writing anything (bad data, too little memory, a `log` that raises).
    try:
        if not resume:
            lock = runs.hold(output)
        elif os.path.isdir(output):
            lock = runs.hold(output, create=False, what="--resume")
        else:
            lock = None  # checkpoint.load says what is wrong with it
    except UserError as e:
        raise as_argument_error(e) from None
    try:
        try:
            config, state = _training_config(output, resume, settings)
        except checkpoint.CheckpointError as e:
            raise as_argument_error(e) from None
        if resume and runs.training_done(config, state) and not runs.estimate_missing(config, output):
            log(runs.finished_message(output, config, state))
        else:
            loop.train(config, resume=resume, overwrite=overwrite, log=log)
    finally:
        runs.release(lock)
    return load(output)


def _training_config(output: str, resume: bool, settings: dict) -> tuple:
    """The settings of a run about to train, checked, and the state of the run it resumes (else None)."""
    if resume:
        saved, state, _ = checkpoint.load(output)
        conflict = resume_conflict(saved, settings, output)
        if conflict:
            raise ArgumentError(conflict)
        config = dataclasses.replace(saved, **settings, output=output)
        if "threads" not in settings:  # the count the run was started with, perhaps on a larger machine
            limits.check_threads(config.threads, resumed_from=output)
    else:
        if "num_epochs" in settings and settings.get("time_budget"):
            raise ArgumentError("--num_epochs and --time_budget both set how long the run trains; give one of them")
        config, state = Config(**settings, output=output), None
    try:
        config.check()
    except SettingError as e:  # the command line's line for the same flag
        raise ArgumentError(bad_value_line(e.name, e.value, e.reason)) from None
    if config.tensorboard:
        try:
            import torch.utils.tensorboard  # noqa: F401  (an optional extra)
        except ImportError:
            raise UserError("--tensorboard needs the tensorboard package: pip install "
                            "'mnist-vae[tensorboard]' (or pip install tensorboard)") from None
    return config, state


# ---------------------------------------------------------------- the model

class Model:
    """A trained VAE and its run's settings; every method works in eval mode (no dropout), without gradients.

    Attributes: `config` (the run's settings, a Config dataclass), `epoch` (epochs trained),
    `dim_z`, `device`, `module` (the torch.nn.Module), `run_dir` (None for the packaged model),
    `name` (what it was loaded from), `provenance` (for the packaged model: how it was made).
    """

    def __init__(self, module: "torch.nn.Module", config: Config, *, epoch: int, run_dir: Optional[Path],
                 name: str, provenance: Optional[dict] = None, data_fingerprint: Optional[str] = None):
        self.module = module.eval()
        self.config = config
        self.epoch = epoch
        self.run_dir = run_dir
        self.name = name
        self.provenance = provenance
        self.data_fingerprint = data_fingerprint  # of the data the run was trained on (runs.data_fingerprint)

    def __repr__(self) -> str:
        return (f"<mnist_vae.Model {self.name}: {self.config.dataset}, dim_z={self.dim_z}, "
                f"likelihood={self.config.likelihood}, {self.epoch} epochs, on {self.device}>")

    @property
    def dim_z(self) -> int:
        return self.config.dim_z

    @property
    def device(self) -> "torch.device":
        return next(self.module.parameters()).device

    @property
    def conditional(self) -> bool:
        """Whether the model takes a class label: q(z|x, y), p(x|z, y) (a run trained with --conditional)."""
        return bool(getattr(self.module, "conditional", False))

    @property
    def classes(self) -> list:
        """The names of the dataset's classes, by label."""
        return list(DATASETS[self.config.dataset]["classes"])

    # ------------------------------------------------------------ the model's maps

    def encode(self, images: Images, labels: Labels = None) -> tuple:
        """Mean and standard deviation of q(z|x) (of q(z|x, y) for a conditional model) for each image:
        two arrays of shape (N, dim_z)."""
        x, as_tensor = self._images(images)
        y = self._labels(labels, len(x), x)
        with _no_grad():
            mu, std = self.module.encode(x, y)
        return as_tensor(mu), as_tensor(std)

    def decode(self, z: Any, labels: Labels = None) -> Any:
        """Mean pixel values of p(x|z) (of p(x|z, y) given `labels`, which a conditional model needs) for
        each row of `z` (N, dim_z): images (N, 28, 28) in [0, 1]."""
        z, as_tensor = self._latents(z)
        if self.conditional and labels is None:
            raise ArgumentError(f"{self.name} is a conditional model: decode(z, labels) needs the class of each row")
        self._check_decoding(len(z), f"decode(z) of {len(z)} rows", "decode fewer rows at a time")
        y = self._labels(labels, len(z))
        with _no_grad():
            images = self.module.mean_image(self.module.decode(z, y))
        return as_tensor(images.reshape(-1, 28, 28))

    def classify(self, images: Images, k: int = 1) -> Any:
        """p(y|x) of each image for each class (N, n_classes), for a conditional model: the bounds on
        log p(x|y) (the ELBO for k = 1, the importance-weighted bound for k > 1) with a uniform p(y).
        The class is the argmax of each row; `classes` names them."""
        self._require_conditional("classify")
        k = _whole_number("k", k, low=1)
        x, as_tensor = self._images(images)
        return as_tensor(classify(self.module, x, k=k).exp())

    def predict(self, images: Images, k: int = 100) -> Any:
        """The class of each image by a conditional model, as class numbers (N,) (`classes` names them):
        the most probable under `classify(images, k)`. These are the labels that encode, reconstruct and
        analogies use when they are given none."""
        self._require_conditional("predict")
        k = _whole_number("k", k, low=1)
        x, as_tensor = self._images(images)
        return as_tensor(self._predict(x, k))

    def analogies(self, images: Images, labels: Labels = None) -> Any:
        """Each image's style written as every class, by a conditional model (Kingma et al. 2014's
        analogies): images (N, n_classes, 28, 28), where [i, c] is the mean of q(z|x, y) of image i under
        its label, decoded with class c. Without `labels`, each image's label is the class it is read as
        (predict)."""
        self._require_conditional("analogies")
        x, as_tensor = self._images(images)
        y = self._labels(labels, len(x), x)
        with _no_grad():
            styles = analogies(self.module, x, y)
        return as_tensor(styles.reshape(len(x), -1, 28, 28))

    def sample(self, n: int, seed: Optional[int] = None, label: Labels = None) -> np.ndarray:
        """`n` images (n, 28, 28) decoded from z drawn from the prior N(0, I).

        The same `seed` gives the same images (`mnist-vae sample --seed`); None draws fresh ones.
        `label` (a class number or name) is the class a conditional model draws; it needs one, or a
        sequence of n, one per image (`label=[i % 10 for i in range(n)]`: every class in turn).
        """
        n = _whole_number("n", n, low=1)
        if self.conditional and label is None:
            raise ArgumentError(f"{self.name} is a conditional model: sample(n, label=...) needs a class "
                                f"(a number or one of {', '.join(self.classes)})")
        generator = torch.Generator()
        if seed is None:
            generator.seed()
        else:
            generator.manual_seed(_whole_number("seed", seed, low=0, high=2**63 - 1))
        self._check_decoding(n, f"sample({n})", "ask for fewer images, or for them in parts")
        z = torch.randn((n, self.dim_z), generator=generator)  # drawn on the CPU, so every device gets the same z
        return self.decode(z, label).cpu().numpy()

    def reconstruct(self, images: Images, labels: Labels = None) -> Any:
        """Each image decoded from its posterior mean: images (N, 28, 28), what the reconstruction grids show.
        A conditional model uses `labels`, or else the class it finds for each image (classify)."""
        x, as_tensor = self._images(images)
        return as_tensor(reconstruct(self.module, x, self._labels(labels, len(x), x)).reshape(-1, 28, 28))

    def add_noise(self, images: Images, seed: int = 0) -> Any:
        """The images with the run's training noise added (noise_factor · N(0, 1), clipped to [0, 1]): (N, 28, 28).

        For trying a denoising run (`mnist-vae denoise --add_noise`); the same seed gives the same noise.
        """
        x, as_tensor = self._images(images)
        generator = torch.Generator().manual_seed(_whole_number("seed", seed, low=0, high=2**63 - 1))
        noisy = add_noise(x.cpu(), self.config.noise_factor, generator).to(x.device)
        return as_tensor(noisy.reshape(-1, 28, 28))

    def interpolate(self, a: Images, b: Images, steps: int = 10) -> np.ndarray:
        """`steps` images (steps, 28, 28) decoded along the straight line between the latent means of `a` and `b`.

        The first and last are the reconstructions of `a` and `b`; each of `a`, `b` is one image.
        """
        steps = _whole_number("steps", steps, low=2)
        self._check_decoding(steps, f"interpolate(steps={steps})", "ask for fewer steps")
        if self.conditional:
            raise ArgumentError(f"{self.name} is a conditional model: its z is a style, not a digit; use "
                                f"sample(label=...) or the analogies instead of interpolate")
        ends = []
        for name, image in (("a", a), ("b", b)):
            x, _ = self._images(image)
            if len(x) != 1:
                raise ArgumentError(f"{name}: expected one image, got {len(x)}")
            ends.append(x)
        with _no_grad():
            mu, _ = self.module.encode(torch.cat(ends))
        weights = torch.linspace(0, 1, steps, device=mu.device)[:, None]
        return self.decode((1 - weights) * mu[0] + weights * mu[1]).cpu().numpy()

    # ------------------------------------------------------------ numbers

    def elbo(self, images: Images, labels: Labels = None) -> Any:
        """The ELBO of each image, in nats (N,): the lower bound on log p(x) (on log p(x|y) given the
        `labels`, which a conditional model needs), with one z per image.

        The z draws are fixed (as in the runs' test metrics), so the same images give the same numbers.
        """
        x, as_tensor = self._images(images)
        y = self._labels(labels, len(x), required=True)
        generator = torch.Generator(device=x.device).manual_seed(EVAL_SEED)
        values = []
        with _no_grad():
            for start in range(0, len(x), 2000):  # the batches of train.evaluate, so the draws are its own
                batch = x[start: start + 2000]
                eps = torch.randn((len(batch), noise_size(self.module)), generator=generator, device=x.device)
                batch_labels = None if y is None else y[start: start + 2000]
                values.append(self.module(batch, eps=eps, labels=batch_labels)[0])
        return as_tensor(torch.cat(values))

    def log_likelihood(self, images: Images, k: int = 1000, labels: Labels = None) -> Any:
        """Importance-weighted estimate of log p(x) of each image (N,) in nats, with `k` samples from q(z|x);
        of log p(x|y) given the `labels`, which a conditional model needs.

        Burda et al.'s bound, which tightens as k grows; the draws are fixed, so it is repeatable.
        With grey-level pixels and the Bernoulli likelihood it is a cross-entropy, not a density.
        """
        k = _whole_number("k", k, low=1)
        x, as_tensor = self._images(images)
        y = self._labels(labels, len(x), required=True)
        with torch.random.fork_rng(devices=[]):  # the estimate seeds torch's generator; leave the caller's alone
            values = log_likelihoods(self.module, x, k, progress=False, labels=y)
        return as_tensor(values)

    def evaluate(self, k: int = 1000, n_test: int = 0, data_dir: Optional[str] = None,
                 progress: bool = False, log: Optional[Callable[[str], None]] = None,
                 other_data: bool = False) -> dict:
        """The run's test metrics, as `mnist-vae evaluate` prints them, in nats per image.

        Returns {"images", "neg_elbo", "recon", "kl", "source" (where the data came from), "other_data"}
        and, when k > 0, the importance-weighted {"nll", "nll_stderr"} (± one standard error over the
        images; NaN for one image). For a conditional model the bounds are of log p(x|y) and "accuracy"
        is its accuracy as a classifier (the class of highest ELBO). The test set is the run's dataset
        (binarized as the run was); `n_test` > 0 uses its first n images. Data other than the run was
        trained on (`data_dir` holding other files) raise ValueError, unless `other_data` is True; the
        result's "other_data" says whether they were. `progress` shows a bar while the estimate runs;
        `log` (none by default) is told where the data comes from.
        """
        k = _whole_number("k", k, low=0)
        n_test = _whole_number("n_test", n_test, low=0)
        if not isinstance(other_data, bool):
            raise ArgumentTypeError(f"other_data must be True or False, not {other_data!r}")
        config = dataclasses.replace(self.config, data_dir=data_dir or self.config.data_dir, n_test=n_test,
                                     n_train=1)
        try:
            tensors = load_tensors(config, self.device, log=log or (lambda _: None),
                                   fingerprint_of=(self.config.n_train, self.config.n_test))
            runs.check_evaluation_data(self.data_fingerprint, tensors.fingerprint, self.name, tensors.source,
                                       other_data, log=log or (lambda _: None))
        except UserError as e:
            raise as_argument_error(e) from None
        test = tensors.test
        labels = tensors.test_y if self.conditional else None  # bounds on log p(x|y) then
        neg_elbo, recon, kl = evaluate(self.module, test, labels=labels)
        result = {"images": len(test), "neg_elbo": neg_elbo, "recon": recon, "kl": kl, "source": tensors.source,
                  "other_data": self.data_fingerprint not in (None, tensors.fingerprint)}
        if self.conditional:
            result["accuracy"] = classifier_accuracy(self.module, test, labels)
        if k > 0:
            with torch.random.fork_rng(devices=[]):
                result["nll"], result["nll_stderr"] = log_likelihood_estimate(
                    self.module, test, k, progress=progress, labels=labels)
        return result

    def export(self, out: Union[str, os.PathLike], format: str = "onnx") -> dict:
        """Write the encoder and decoder as ONNX files into the folder `out`; return {name: path}.

        `encoder.onnx` (image -> mu, std), `decoder.onnx` (z -> mean image) and `model.json`
        (inputs, outputs and the run's settings); a conditional model's graphs also take `label`, the
        int64 class index of each row. Needs `pip install 'mnist-vae[export]'`. A model the exporter
        cannot export faithfully raises ValueError, and nothing is written.
        """
        if format != "onnx":
            raise ArgumentError(f"format must be 'onnx', got {format!r}")
        try:
            return export_onnx(self, Path(out))
        except UserError as e:
            raise as_argument_error(e) from None

    # ------------------------------------------------------------ inputs

    def _check_decoding(self, n: int, what: str, advice: str) -> None:
        """Refuse (ValueError, one line) decoding n images that the available memory cannot hold, before
        allocating anything: the same check as training's, on limits.available_memory."""
        n_classes = int(getattr(self.module, "n_classes", 0)) if self.conditional else 0
        need = limits.decoding_memory(n, self.dim_z, self.config.n_hidden, self.config.n_layers, n_classes)
        limits.check_memory(need, what, advice)

    def _images(self, images: Images) -> tuple:
        """The images as a float tensor (N, 784) on the model's device, and how to hand results back."""
        x = prepare_images(images)
        return x.to(self.device), _returner(images)

    def _labels(self, labels: Labels, n: int, x: Any = None, required: bool = False) -> Any:
        """The labels as an int64 tensor (n,) on the model's device, for a conditional model; None for another.

        A label is a class number or name ("7", "sneaker"); one label serves every image. Without labels, a
        conditional model's `x` is classified (for encode/reconstruct), unless they are `required`.
        """
        if not self.conditional:
            if labels is not None:
                raise ArgumentError(f"{self.name} is not a conditional model; call it without labels")
            return None
        if labels is None:
            if required or x is None:
                raise ArgumentError(f"{self.name} is a conditional model: give the labels of the images")
            return self._predict(x, 100)
        if isinstance(labels, torch.Tensor):
            check_has_data("labels", labels)
        values = labels.tolist() if isinstance(labels, (np.ndarray, torch.Tensor)) else labels
        values = [values] * n if isinstance(values, (int, str, np.integer)) else list(values)
        if len(values) != n:
            raise ArgumentError(f"labels: expected {n} labels, one per image, got {len(values)}")
        try:
            index = [class_index(str(value), self.config.dataset) for value in values]
        except UserError as e:
            raise ArgumentError(str(e).replace("--class ", "label ")) from None
        return torch.tensor(index, dtype=torch.int64, device=self.device)

    def _predict(self, x: "torch.Tensor", k: int) -> "torch.Tensor":
        """The most probable class of each image of `x` (a tensor (N, 784) on the model's device)."""
        return classify(self.module, x, k=k).argmax(1)

    def _require_conditional(self, method: str) -> None:
        if not self.conditional:
            raise ArgumentError(f"{self.name} is not a conditional model; {method} needs a run trained with "
                                f"--conditional")

    def _latents(self, z: Any) -> tuple:
        as_tensor = _returner(z)
        if isinstance(z, torch.Tensor):
            check_has_data("z", z)
            values = z.detach().to("cpu", torch.float32)
        else:
            try:
                values = torch.from_numpy(np.array(z, dtype=np.float32))
            except (TypeError, ValueError):
                raise ArgumentTypeError(f"z must be an array of numbers of shape (N, {self.dim_z}), "
                                        f"not {type(z).__name__}") from None
        if values.ndim == 1:
            values = values[None]
        if values.ndim != 2 or values.shape[1] != self.dim_z:
            raise ArgumentError(f"z must have shape (N, {self.dim_z}) for this model (dim_z={self.dim_z}), "
                                f"got {tuple(values.shape)}")
        if not torch.isfinite(values).all():
            raise ArgumentError("z holds NaN or infinite values")
        return values.to(self.device), as_tensor


# ---------------------------------------------------------------- images in


def _returner(given: Any) -> Callable:
    """How to hand results back: a tensor on the input's device if a tensor came in, else a NumPy array."""
    if isinstance(given, torch.Tensor):
        return lambda result: result.to(given.device)
    return lambda result: result.cpu().numpy()


def _whole_number(name: str, value: Any, low: Optional[int] = None, high: Optional[int] = None) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise ArgumentTypeError(f"{name} must be a whole number, not {type(value).__name__}")
    if (low is not None and value < low) or (high is not None and value > high):
        bounds = f"from {low} to {high}" if high is not None else f"of at least {low}"
        raise ArgumentError(f"{name}: expected a whole number {bounds}, got {value}")
    return int(value)


def _no_grad():
    return torch.no_grad()


# ---------------------------------------------------------------- images in

def prepare_images(images: Images) -> "torch.Tensor":
    """Images in any of the accepted forms (see this module's docstring) as a float32 tensor (N, 784) in [0, 1].

    Arrays and tensors are taken as MNIST-style pixels as they are; PIL images and files are
    prepared as MNIST's digits were (made grey, inverted on a light background, cropped to the
    ink, scaled to 20 x 20 and centred in 28 x 28), as the command line does.
    """
    if isinstance(images, (list, tuple)):
        if not images:
            raise ArgumentError("images: the list is empty; give at least one image")
        return torch.cat([prepare_images(image) for image in images])
    if isinstance(images, (str, os.PathLike)):
        try:
            return torch.from_numpy(load_user_image(images))[None]
        except UserError as e:
            raise as_argument_error(e) from None
    if isinstance(images, Image.Image):
        grey = np.asarray(images.convert("L"), dtype=np.float32) / 255.0
        try:
            return torch.from_numpy(prepare_digit(grey, "the image"))[None]
        except UserError as e:
            raise as_argument_error(e) from None
    if isinstance(images, torch.Tensor):
        check_has_data("images", images)
        array = images.detach().cpu()
        array = array.numpy() if array.dtype != torch.bfloat16 else array.float().numpy()
    elif isinstance(images, np.ndarray):
        array = images
    else:
        raise ArgumentTypeError("images must be a NumPy array, a torch tensor, a PIL image, a path or a list of "
                                f"these, not {type(images).__name__}")
    return torch.from_numpy(_pixels(array))


def _pixels(array: np.ndarray) -> np.ndarray:
    """An array of MNIST-style images as float32 (N, 784) in [0, 1], with a clear error for anything else."""
    shape = array.shape
    if shape in ((28, 28), (784,)):
        array = array.reshape(1, 784)
    elif len(shape) == 3 and shape[1:] == (28, 28) or len(shape) == 4 and shape[1:] == (1, 28, 28) or \
            len(shape) == 2 and shape[1] == 784:
        array = array.reshape(len(array), 784)
    else:
        raise ArgumentError(f"images must have shape (N, 28, 28) or (N, 784), or (28, 28) or (784,) for one "
                            f"image; got {shape}")
    if array.dtype == np.uint8:
        return array.astype(np.float32) / 255.0
    if array.dtype == np.bool_:
        return array.astype(np.float32)
    if not (np.issubdtype(array.dtype, np.floating) or np.issubdtype(array.dtype, np.integer)):
        raise ArgumentTypeError(f"images must hold numbers (uint8 0..255 or float in [0, 1]), not {array.dtype}")
    if array.size == 0:
        raise ArgumentError("images: the array holds no image")
    low, high = float(array.min()), float(array.max())
    if not (math.isfinite(low) and math.isfinite(high)):
        raise ArgumentError("images hold NaN or infinite values")
    if np.issubdtype(array.dtype, np.integer):
        if low < 0 or high > 255:
            raise ArgumentError(f"integer pixel values must lie in 0..255; got {low:g}..{high:g}")
        return array.astype(np.float32) / 255.0
    if low < 0 or high > 1:
        hint = " (divide 0..255 pixel values by 255)" if high <= 255 and low >= 0 else ""
        raise ArgumentError(f"float pixel values must lie in [0, 1]; got {low:g}..{high:g}{hint}")
    return array.astype(np.float32)


def check_has_data(name: str, tensor: torch.Tensor) -> None:
    """Refuse a tensor without values (on the meta device: only a shape), which torch cannot copy or compute on."""
    if tensor.is_meta:
        raise ArgumentError(f"{name}: a tensor on the meta device has a shape but no values; give one with data "
                            f"(on the CPU or a GPU)")
