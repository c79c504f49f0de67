"""The datasets as NumPy arrays: `mnist_vae.datasets.load("mnist")` (this folder also holds the bundled MNIST files)."""

from __future__ import annotations

import os
from typing import Optional, Union

from ..data import load_dataset
from ..errors import ArgumentError, ArgumentTypeError, UserError

__all__ = ["load", "NAMES"]

NAMES = ("mnist", "fashion-mnist")


def load(name: str = "mnist", data_dir: Optional[Union[str, os.PathLike]] = None):
    """The train and test sets of `name` ("mnist" or "fashion-mnist"), found as training finds them.

    Returns a Dataset with `train_images`, `test_images` (uint8 arrays (n, 28, 28)),
    `train_labels`, `test_labels` (uint8 arrays (n,)), `classes` (the class names, by label),
    `name` and `source` (where the files were found). `data_dir` is a folder holding the four
    IDX files, as --data_dir. MNIST ships with the package; Fashion-MNIST is looked for in the
    user cache and /usr/share/datasets, then downloaded. Raises ValueError for an unknown name
    or unusable files.
    """

    if not isinstance(name, str):
        raise ArgumentTypeError(f"name must be a dataset name (str), not {type(name).__name__}")
    if name not in NAMES:
        raise ArgumentError(f"unknown dataset {name!r}; choose one of {', '.join(NAMES)}")
    try:
        return load_dataset(name, None if data_dir is None else os.fspath(data_dir), log=lambda _: None)
    except UserError as e:
        raise ArgumentError(str(e)) from None
