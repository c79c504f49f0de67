"""mnist-vae: a variational auto-encoder for MNIST and Fashion-MNIST on PyTorch.

The Python API (see docs/api.md):

    import mnist_vae
    model = mnist_vae.load("pretrained")        # the dim_z 2 MNIST model shipped in the package
    images = model.sample(16, seed=0)           # (16, 28, 28) pixel values in [0, 1]
    mu, std = model.encode(images)              # q(z|x)
    model = mnist_vae.train(output="runs/z2", dim_z=2, num_epochs=60)   # as `mnist-vae` trains
    data = mnist_vae.datasets.load("mnist")     # arrays and class names

The names are loaded on first use, so that `import mnist_vae` (and `mnist-vae --help`) does
not wait for torch.
"""

import importlib
import os

from .version import __version__

# MKL's strict reproducibility mode: its float32 products (gemm) then give the same bits on any number
# of threads, so the thread count may follow a busy machine's load without changing a run's numbers
# (fast/threads.py). MKL reads the variable at its first product, hence here, before any; a value the
# user set is kept.
os.environ.setdefault("MKL_CBWR", "AUTO,STRICT")

__all__ = ["load", "train", "Model", "PRETRAINED", "prepare_images", "datasets", "ArgumentError",
           "ArgumentTypeError", "UserError", "__version__"]

_FROM_API = {"load", "train", "Model", "PRETRAINED", "prepare_images", "ArgumentError", "ArgumentTypeError"}


def __getattr__(name):
    if name in _FROM_API:
        from . import api

        return getattr(api, name)
    if name == "datasets":  # imported by name: `from . import datasets` would ask this function again
        return importlib.import_module(".datasets", __name__)
    if name == "UserError":
        from .errors import UserError

        return UserError
    raise AttributeError(f"module 'mnist_vae' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(__all__))
