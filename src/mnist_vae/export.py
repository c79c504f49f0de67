"""Exporting a trained model to ONNX, for use outside Python: encoder.onnx, decoder.onnx and a JSON describing them.

`mnist-vae export RUN_DIR --format onnx --out DIR` and `Model.export(DIR)` write, into DIR:

- encoder.onnx: input "image", float32 (batch, 784) in [0, 1] (a 28 x 28 image row by row);
  outputs "mu" and "std", float32 (batch, dim_z), the mean and standard deviation of q(z|x);
- decoder.onnx: input "z", float32 (batch, dim_z); output "image", float32 (batch, 784), the
  mean pixel values of p(x|z) in [0, 1];
- model.json: the same in words, and the run's settings.

The batch size is free (a dynamic axis). The graphs are made by torch.onnx's exporter
(torch.export, then onnxscript) and are checked against the PyTorch model with
onnxruntime before they are written. They need the optional packages of
`pip install 'mnist-vae[export]'`.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import warnings
from pathlib import Path

import numpy as np
import torch

from . import files
from .errors import UserError
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
    """Write encoder.onnx, decoder.onnx and model.json for `model` (an api.Model) into `out`; return their paths."""

    require_packages()
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ExportError(f"--out {out} is a file, not a folder; give a folder name")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ExportError(files.error_line(out, e)) from None
    vae = model.module
    cpu = type(vae)(vae.dim_z, vae.n_hidden, 0.0, vae.likelihood)  # a copy on the CPU, whatever device holds it
    cpu.load_state_dict({name: value.detach().cpu() for name, value in vae.state_dict().items()})
    cpu.eval()
    Encoder, Decoder = _modules()
    graphs = {
        "encoder.onnx": (Encoder(cpu), torch.rand(3, 784), ["image"], ["mu", "std"]),
        "decoder.onnx": (Decoder(cpu), torch.randn(3, vae.dim_z), ["z"], ["image"]),
    }
    written = {}
    for name, (module, example, inputs, outputs) in graphs.items():
        data = _onnx_bytes(module.eval(), example, inputs, outputs)
        _check(data, module, inputs[0], example.shape[1], name)
        files.write_bytes(out / name, data)
        written[name] = out / name
    files.write_json(out / "model.json", describe(model))
    written["model.json"] = out / "model.json"
    return written


def _modules():
    """The two graphs as torch modules (defined here, so that importing this file does not import torch)."""

    class Encoder(torch.nn.Module):
        """image (batch, 784) -> mu, std of q(z|x)."""

        def __init__(self, vae):
            super().__init__()
            self.vae = vae

        def forward(self, image):
            return self.vae.encode(image)

    class Decoder(torch.nn.Module):
        """z (batch, dim_z) -> mean image (batch, 784)."""

        def __init__(self, vae):
            super().__init__()
            self.vae = vae

        def forward(self, z):
            return self.vae.mean_image(self.vae.decode(z))

    return Encoder, Decoder


def _onnx_bytes(module, example, inputs, outputs) -> bytes:
    """The ONNX model of `module`, with a dynamic batch axis, as bytes (weights inside, no side file)."""

    batch = torch.export.Dim("batch")
    with _quiet():
        program = torch.onnx.export(module, (example,), None, input_names=inputs, output_names=outputs,
                                    dynamic_shapes={next(iter(_forward_args(module))): {0: batch}},
                                    opset_version=OPSET, dynamo=True, verbose=False, optimize=True)
    return program.model_proto.SerializeToString()


def _forward_args(module):

    return inspect.signature(module.forward).parameters


def _check(data: bytes, module, input_name: str, width: int, name: str):
    """Run the graph with onnxruntime on fresh inputs and compare it with PyTorch; refuse to write a wrong one."""
    import onnxruntime

    session = onnxruntime.InferenceSession(data, providers=["CPUExecutionProvider"])
    generator = torch.Generator().manual_seed(0)
    for batch in (1, 7):  # two batch sizes: the axis is dynamic
        x = torch.rand((batch, width), generator=generator) if input_name == "image" else \
            3 * torch.randn((batch, width), generator=generator)
        with torch.no_grad():
            expected = module(x)
        expected = expected if isinstance(expected, tuple) else (expected,)
        got = session.run(None, {input_name: x.numpy()})
        difference = max(float(np.abs(g - e.numpy()).max()) for g, e in zip(got, expected))
        if not difference <= TOLERANCE:
            raise ExportError(f"{name}: onnxruntime differs from PyTorch by {difference:.2g} (more than "
                              f"{TOLERANCE:g}); this model cannot be exported faithfully with this torch and onnx")


@contextlib.contextmanager
def _quiet():
    """Silence the exporter's progress lines and warnings (about torchvision and the like): one line is ours to print."""
    loggers = [logging.getLogger(name) for name in ("torch.onnx", "torch.export", "torch._dynamo", "torch.fx",
                                                    "torch._export", "onnxscript")]
    levels = [logger.level for logger in loggers]
    with warnings.catch_warnings(), contextlib.redirect_stdout(_Null()):
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
    return {
        "format": "mnist-vae onnx 1",
        "model": model.name,
        "encoder": {
            "file": "encoder.onnx",
            "inputs": [{"name": "image", "dtype": "float32", "shape": ["batch", 784],
                        "meaning": "28 x 28 grey images row by row, pixel values in [0, 1], white ink on black "
                                   "(as MNIST)"}],
            "outputs": [{"name": "mu", "dtype": "float32", "shape": ["batch", dim_z],
                         "meaning": "mean of the Gaussian q(z|x)"},
                        {"name": "std", "dtype": "float32", "shape": ["batch", dim_z],
                         "meaning": "standard deviation of q(z|x)"}],
        },
        "decoder": {
            "file": "decoder.onnx",
            "inputs": [{"name": "z", "dtype": "float32", "shape": ["batch", dim_z],
                        "meaning": "latent vectors; the prior is N(0, I)"}],
            "outputs": [{"name": "image", "dtype": "float32", "shape": ["batch", 784],
                         "meaning": f"mean pixel values of p(x|z) ({likelihood}), in [0, 1], row by row"}],
        },
        "opset": OPSET,
        "settings": model.config.to_dict(),
        "epochs": model.epoch,
        "mnist_vae": __version__,
        "torch": torch.__version__,
        "tolerance": f"checked against PyTorch with onnxruntime: at most {TOLERANCE:g} apart",
    }
