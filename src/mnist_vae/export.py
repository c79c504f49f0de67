"""Exporting a trained model to ONNX, for use outside Python: encoder.onnx, decoder.onnx and a JSON describing them.

`mnist-vae export RUN_DIR --format onnx --out DIR` and `Model.export(DIR)` write, into DIR:

- encoder.onnx: input "image", float32 (batch, 784) in [0, 1] (a 28 x 28 image row by row);
  outputs "mu" and "std", float32 (batch, dim_z), the mean and standard deviation of q(z|x);
- decoder.onnx: input "z", float32 (batch, dim_z); output "image", float32 (batch, 784), the
  mean pixel values of p(x|z) in [0, 1];
- model.json: the same in words, and the run's settings.

A conditional model's graphs (both) take a second input, "label": int64 (batch,), the class index
of each row (0 to 9), one-hot encoded inside the graph as the model does it.

The batch size is free (a dynamic axis). The graphs are made by torch.onnx's exporter
(torch.export, then onnxscript) from a copy of the model the run holds, and are checked against
the loaded model's encode and decode with onnxruntime before anything is written. They need the
optional packages of `pip install 'mnist-vae[export]'`.
"""

from __future__ import annotations

import contextlib
import copy
import inspect
import json
import logging
import os
import re
import shutil
import signal
import threading
import warnings
from pathlib import Path

import numpy as np
import torch

from . import files, runs
from .errors import UserError, catch_signals, restore_signals
from .version import __version__

FILES = ("encoder.onnx", "decoder.onnx", "model.json")  # what an export writes
OPSET = 18
NEEDS = "onnx, onnxscript and onnxruntime: pip install 'mnist-vae[export]'"
TOLERANCE = 1e-5  # the largest difference from PyTorch allowed, per pixel and per latent coordinate


class ExportError(UserError):
    pass


def missing_packages() -> list:
    """The packages of the [export] extra that cannot be imported here."""
    import importlib.util

    return [name for name in ("onnx", "onnxscript", "onnxruntime") if importlib.util.find_spec(name) is None]


def require_packages():
    missing = missing_packages()
    if missing:
        raise ExportError(f"export needs {NEEDS} ({', '.join(missing)} not installed)")


def export_onnx(model, out: Path) -> dict:
    """Write encoder.onnx, decoder.onnx and model.json for `model` (an api.Model) into `out`; return their paths.

    The graphs are made from a copy of the model the run holds (its own modules, whatever their depth,
    activation or conditioning), and each is run with onnxruntime against `model.encode` and
    `model.decode` before anything is written. The three files then appear together or not at all:
    they are written into a temporary folder beside `out` and renamed into place, and Ctrl-C while
    exporting writes nothing (KeyboardInterrupt, after the graph in progress).
    """
    require_packages()
    out = Path(out)
    try:
        if out.exists() and not out.is_dir():
            raise ExportError(f"--out {out} is a file, not a folder; give a folder name")
    except OSError as e:
        raise ExportError(files.error_line(out, e)) from None
    _check_exportable(model)
    # A run folder in training is not ours to write in: hold its lock while writing there.
    keys = [runs.hold_if_run(folder, what="the folder") for folder in (out, out.parent)]
    try:
        with _deferred_interrupt() as interrupted:
            contents = {name: data for name, data in _graphs(model, interrupted)}
            contents["model.json"] = (json.dumps(describe(model), indent=2) + "\n").encode()
            if interrupted():
                raise KeyboardInterrupt
            _write_together(out, contents, interrupted)
    finally:
        for key in keys:
            runs.release(key)
    return {name: out / name for name in FILES}


def _check_exportable(model):
    """Refuse, in one line and before any work, a model whose graphs this exporter cannot describe."""
    module = model.module
    missing = [name for name in ("encode", "decode", "mean_image") if not callable(getattr(module, name, None))]
    if missing:
        raise ExportError(f"{model.name}: its model ({type(module).__name__}) has no {', '.join(missing)}; "
                          f"only mnist-vae's models can be exported")
    if model.conditional and not 1 <= int(getattr(module, "n_classes", 0)) <= 1000:
        raise ExportError(f"{model.name}: a conditional model without a number of classes cannot be exported")


def _graphs(model, interrupted):
    """(file name, ONNX bytes) of the encoder and the decoder, each checked against `model` (the api.Model)."""


    # A copy on the CPU of the very modules the run holds, in eval mode (dropout off): never a model
    # rebuilt from a few settings, which would silently drop the run's depth, activation or labels.
    vae = copy.deepcopy(model.module).cpu().eval().requires_grad_(False)
    Encoder, Decoder = _modules()
    conditional = model.conditional
    labels = torch.tensor([0, 1, 2], dtype=torch.int64)
    graphs = {
        "encoder.onnx": (Encoder(vae, conditional), (torch.rand(3, 784),) + ((labels,) if conditional else ()),
                         ["image"] + (["label"] if conditional else []), ["mu", "std"]),
        "decoder.onnx": (Decoder(vae, conditional), (torch.randn(3, model.dim_z),) + ((labels,) if conditional else ()),
                         ["z"] + (["label"] if conditional else []), ["image"]),
    }
    for name, (module, example, inputs, outputs) in graphs.items():
        try:
            data = _onnx_bytes(module.eval(), example, inputs, outputs)
        except Exception as e:
            if interrupted():  # a second Ctrl-C inside the exporter, which wraps it in its own error
                raise KeyboardInterrupt from None
            raise ExportError(f"{model.name}: torch's ONNX exporter cannot export its {name[:-5]} "
                              f"({_reason(e)}); nothing was written") from None
        if interrupted():
            raise KeyboardInterrupt
        _check(data, model, inputs, name)
        yield name, data


def _reason(error):
    """The first line of the innermost cause of the exporter's error, without its terminal colours."""

    while error.__cause__ is not None or error.__context__ is not None:
        error = error.__cause__ or error.__context__
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(error))
    line = next((line.strip() for line in text.splitlines() if line.strip()), "")
    return f"{type(error).__name__}: {line[:160]}" if line else type(error).__name__


def _write_together(out, contents, interrupted=lambda: False):
    """Write `contents` ({file name: bytes}) into the folder `out` so that they appear together or not at all.

    A new folder is filled under a temporary name beside it and renamed into place. Into a folder
    that exists, the files go to a temporary folder inside it and are renamed over the old ones one
    after another, with Ctrl-C held back for those microseconds.
    """

    parent = out.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
        fresh = not out.exists()
        tmp = (parent / f".{out.name[:200]}.{os.getpid()}.tmp") if fresh else (out / f".export.{os.getpid()}.tmp")
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
    except OSError as e:
        raise ExportError(files.error_line(out, e)) from None
    try:
        for name, data in contents.items():
            try:
                files.write_bytes(tmp / name, data)
            except files.WriteError as e:  # say which file of the export failed, not its temporary name
                raise ExportError(str(e).replace(str(tmp / name), str(out / name))) from None
        if interrupted():  # Ctrl-C while writing: nothing is renamed into place
            raise KeyboardInterrupt
        if fresh:
            try:
                os.rename(tmp, out)  # atomic: the folder appears with its three files
                return
            except OSError:
                if not out.is_dir():  # else another process made it meanwhile: replace file by file below
                    raise
                moved = out / tmp.name
                os.rename(tmp, moved)
                tmp = moved
        blocked = hasattr(signal, "pthread_sigmask")
        if blocked:
            signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
        try:
            for name in contents:
                os.replace(tmp / name, out / name)
        finally:
            if blocked:
                signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT, signal.SIGTERM})
    except OSError as e:
        raise ExportError(files.error_line(out, e)) from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


@contextlib.contextmanager
def _deferred_interrupt():
    """Inside, a first Ctrl-C is remembered rather than raised (torch's exporter would wrap it in a long
    error of its own); `interrupted()` says whether one came. A second one raises at once."""

    received = []

    def handle(signum, frame):
        if received:
            raise KeyboardInterrupt
        received.append(signum)

    if threading.current_thread() is not threading.main_thread():
        yield lambda: False
        return
    previous = catch_signals(handle, [signal.SIGINT])
    try:
        yield lambda: bool(received)
    finally:
        restore_signals(previous)


def _modules():
    """The two graphs as torch modules (defined here, so that importing this file does not import torch):
    Encoder(vae) maps image (and label) to mu, std; Decoder(vae) maps z (and label) to the mean image."""

    class Encoder(torch.nn.Module):
        """image (batch, 784) [, label (batch,) int64] -> mu, std of q(z|x) (of q(z|x, y))."""

        def __init__(self, vae, conditional=False):
            super().__init__()
            self.vae, self.conditional = vae, conditional

        def forward(self, image, label=None):
            return self.vae.encode(image, label) if self.conditional else self.vae.encode(image)

    class Decoder(torch.nn.Module):
        """z (batch, dim_z) [, label (batch,) int64] -> mean image (batch, 784) of p(x|z) (of p(x|z, y))."""

        def __init__(self, vae, conditional=False):
            super().__init__()
            self.vae, self.conditional = vae, conditional

        def forward(self, z, label=None):
            logits = self.vae.decode(z, label) if self.conditional else self.vae.decode(z)
            return self.vae.mean_image(logits)

    return Encoder, Decoder


def _onnx_bytes(module, example, inputs, outputs) -> bytes:
    """The ONNX model of `module` on the `example` input(s), with a dynamic batch axis, as bytes (weights
    inside, no side file)."""

    example = example if isinstance(example, tuple) else (example,)
    batch = torch.export.Dim("batch")
    names = list(_forward_args(module))[: len(example)]
    with _quiet():
        program = torch.onnx.export(module, example, None, input_names=inputs, output_names=outputs,
                                    dynamic_shapes={name: {0: batch} for name in names},
                                    opset_version=OPSET, dynamo=True, verbose=False, optimize=True)
    return program.model_proto.SerializeToString()


def _forward_args(module):

    return inspect.signature(module.forward).parameters


def _check(data: bytes, model, inputs, name: str):
    """Run the graph with onnxruntime on fresh inputs and compare it with the loaded model's own encode or
    decode (api.Model: what `mnist_vae.load(run)` gives); refuse to write a graph that differs."""
    import onnxruntime

    session = onnxruntime.InferenceSession(data, providers=["CPUExecutionProvider"])
    generator = torch.Generator().manual_seed(0)
    n_classes = int(getattr(model.module, "n_classes", 10))
    for batch in (1, 7):  # two batch sizes: the axis is dynamic
        feed = {}
        if name == "encoder.onnx":
            feed["image"] = torch.rand((batch, 784), generator=generator).numpy()
        else:
            feed["z"] = (3 * torch.randn((batch, model.dim_z), generator=generator)).numpy()
        labels = None
        if "label" in inputs:
            labels = torch.randint(0, n_classes, (batch,), generator=generator).numpy()
            feed["label"] = labels
        if name == "encoder.onnx":
            expected = model.encode(feed["image"], labels)
        else:
            expected = (model.decode(feed["z"], labels).reshape(batch, 784),)
        got = session.run(None, feed)
        difference = max(float(np.abs(g - e).max()) for g, e in zip(got, expected))
        if not difference <= TOLERANCE:
            raise ExportError(f"{name}: onnxruntime differs from PyTorch by {difference:.2g} (more than "
                              f"{TOLERANCE:g}); this model cannot be exported faithfully with this torch and onnx")


@contextlib.contextmanager
def _quiet():
    """Silence the exporter's progress lines, warnings (about torchvision and the like) and the graphs it prints on
    failing: one line is ours to print."""
    loggers = [logging.getLogger(name) for name in ("torch.onnx", "torch.export", "torch._dynamo", "torch.fx",
                                                    "torch._export", "onnxscript")]
    levels = [logger.level for logger in loggers]
    with warnings.catch_warnings(), contextlib.redirect_stdout(_Null()), contextlib.redirect_stderr(_Null()):
        warnings.simplefilter("ignore")
        for logger in loggers:
            logger.setLevel(logging.ERROR)
        try:
            yield
        finally:
            for logger, level in zip(loggers, levels):
                logger.setLevel(level)


class _Null:
    def write(self, text):
        return len(text)

    def flush(self):
        pass


def describe(model) -> dict:
    """model.json: what the graphs take and give, and the run's settings."""


    dim_z = model.dim_z
    likelihood = model.config.likelihood
    given = ", y" if model.conditional else ""
    # A model of two stochastic layers (vae2) is exported on its top z, z2, through the means of z1.
    two = int(getattr(model.module, "stochastic_layers", 1)) > 1
    q, p = ("q(z2|z1) at z1 = the mean of q(z1|x)", "p(x|z1) at z1 = the mean of p(z1|z2), z = z2") if two else \
        (f"q(z|x{given})", f"p(x|z{given})")
    label = [{"name": "label", "dtype": "int64", "shape": ["batch"],
              "meaning": "the class index of each row, 0 to 9: "
                         + ", ".join(f"{i} {name}" for i, name in enumerate(model.classes))}] if model.conditional else []
    return {
        "format": "mnist-vae onnx 1",
        "model": model.name,
        "conditional": model.conditional,
        "encoder": {
            "file": "encoder.onnx",
            "inputs": [{"name": "image", "dtype": "float32", "shape": ["batch", 784],
                        "meaning": "28 x 28 grey images row by row, pixel values in [0, 1], white ink on black "
                                   "(as MNIST)"}] + label,
            "outputs": [{"name": "mu", "dtype": "float32", "shape": ["batch", dim_z],
                         "meaning": f"mean of the Gaussian {q}"},
                        {"name": "std", "dtype": "float32", "shape": ["batch", dim_z],
                         "meaning": f"standard deviation of {q}"}],
        },
        "decoder": {
            "file": "decoder.onnx",
            "inputs": [{"name": "z", "dtype": "float32", "shape": ["batch", dim_z],
                        "meaning": "latent vectors; the prior is N(0, I)"}] + label,
            "outputs": [{"name": "image", "dtype": "float32", "shape": ["batch", 784],
                         "meaning": f"mean pixel values of {p} ({likelihood}), in [0, 1], row by row"}],
        },
        "opset": OPSET,
        "settings": model.config.to_dict(),
        "epochs": model.epoch,
        "mnist_vae": __version__,
        "torch": torch.__version__,
        "tolerance": f"checked against PyTorch with onnxruntime: at most {TOLERANCE:g} apart",
    }
