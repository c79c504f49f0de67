"""What settings ask of the machine, checked before any work: memory against what is available, and
every picture's size against the limits of its file format.

Without these checks an impossible setting failed late and loudly: `--n_hidden 1000000000` with
"RuntimeError: can't allocate memory", `--PMLR_n_img_x 3000` after a whole epoch, when the JPEG
encoder refused an image wider than 65500 pixels.
"""

import os
from pathlib import Path

import torch

from .errors import UserError

# The largest side each format can hold: libjpeg's JPEG_MAX_DIMENSION, and PNG's 31-bit sizes.
MAX_SIDE = {".jpg": 65500, ".jpeg": 65500, ".png": 2**31 - 1}
PIXELS = 28 * 28
FLOAT = 4  # bytes of a float32
DEFAULT_N_TRAIN, DEFAULT_N_TEST = 60000, 10000  # MNIST's and Fashion-MNIST's sizes, for n_train 0 (all)
GB = 1e9


class LimitError(UserError, ValueError):
    """A setting the machine or a file format cannot honour: a usage error, exit status 2 (and a
    ValueError for Python callers, as every bad argument of the API)."""

    exit_code = 2


# torch's threads: more than a few per core only slow a run down, and far more crash OpenMP
# (--threads 100000 ended in a segmentation fault, 30000 in libgomp's errors).
THREADS_PER_CORE = 4
MAX_THREADS = 1024


def thread_limit():
    """The most threads a run may ask for on this machine: THREADS_PER_CORE per core, at most MAX_THREADS."""
    return min(MAX_THREADS, THREADS_PER_CORE * (os.cpu_count() or 1))


def check_threads(threads, resumed_from=None):
    """Refuse a thread count this machine cannot use; `resumed_from`: the run folder whose checkpoint it came from."""
    limit = thread_limit()
    if threads <= limit:
        return
    machine = f"this machine has {os.cpu_count() or 1} cores and takes at most {limit} threads"
    if resumed_from is not None:
        raise LimitError(f"--resume {resumed_from}: its saved --threads {threads} is more than {machine}; resume "
                         f"with --threads 0 (every core) or a count up to {limit}")
    raise LimitError(f"--threads {threads}: {machine}; choose 0 (every core) or a count up to {limit}")


def check_image(path, width, height, what):
    """Refuse a picture of width x height pixels that the format of `path` cannot hold."""
    suffix = Path(path).suffix.lower()
    limit = MAX_SIDE.get(suffix)
    if limit is not None and max(width, height) > limit:
        raise LimitError(f"{what} makes an image of {width} x {height} pixels, but a {suffix} file holds at most "
                         f"{limit} pixels a side; choose a smaller grid")


def available_memory():
    """Bytes of memory this process can still use: MemAvailable on Linux, else the physical memory."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def parameters(dim_z, n_hidden, n_layers=2):
    """Weights and biases of the encoder (784 -> h -> ... -> 2z) and decoder (z -> h -> ... -> 784), with
    n_layers hidden layers of h units each."""
    h = n_hidden
    encoder = (PIXELS + 1) * h + (n_layers - 1) * (h + 1) * h + (h + 1) * 2 * dim_z
    decoder = (dim_z + 1) * h + (n_layers - 1) * (h + 1) * h + (h + 1) * PIXELS
    return encoder + decoder


def training_memory(config):
    """Bytes a training run needs at its peak, by what needs them: {what (the flags): bytes}."""
    h, z = config.n_hidden, config.dim_z
    n_train = config.n_train or DEFAULT_N_TRAIN
    n_test = config.n_test or DEFAULT_N_TEST
    # Weights, gradients and Adam's two moments, plus a checkpoint's serialised copy of three of them.
    model = parameters(z, h, config.n_layers) * FLOAT * (4 + 3 * 2)
    # A training batch's activations, with their gradients: --objective iwae decodes k_train draws of z
    # per image, so its decoder holds k_train times the rows (and the logits, likelihoods and their
    # gradients of each); and the test batches of 2000 images (evaluate()).
    k = config.z_per_image
    per_row = (4 * config.n_layers * h + 6 * PIXELS + 8 * z) * FLOAT
    batch = max(config.batch_size, 2000) * per_row
    draws = max(0, config.batch_size * k - max(config.batch_size, 2000)) * per_row  # the rows k_train adds
    # The data as bytes and as float32, train and test.
    data = (n_train + n_test) * PIXELS * (1 + FLOAT + FLOAT)
    # The pictures: the images of a grid as float32 tensors and arrays, then its pixels.
    n_prr = config.PRR_n_img_x * config.PRR_n_img_y
    images = 2 * n_prr * (PIXELS * (3 * FLOAT + 1) + (h + z) * FLOAT)
    if z == 2:
        n_pmlr = config.PMLR_n_img_x * config.PMLR_n_img_y
        images += n_pmlr * (PIXELS * (3 * FLOAT + 1) + 2 * h * FLOAT)
    return {"--n_hidden, --n_layers and --dim_z": model + batch, "--k_train and --batch_size": draws,
            "--n_train": data, "the image grids (--PRR_n_img_x/y, --PMLR_n_img_x/y)": images}


def decoding_memory(n, dim_z, n_hidden, n_layers=2, n_classes=0):
    """Bytes that decoding n latent vectors into mean images takes at its peak (no gradients): the inputs
    (with their one-hot labels), two hidden layers' activations at a time, the logits and the mean image
    with the temporaries of its formula, and the pixels handed back."""
    return n * (2 * (dim_z + n_classes) + 3 * n_hidden + 8 * PIXELS) * FLOAT


def check_memory(need, what, advice):
    """Refuse, before allocating, work that needs more memory than is available: LimitError (a ValueError)."""
    free = available_memory()
    if free is not None and need > free:
        raise LimitError(f"{what} needs about {_size(need)} of memory, but {_size(free)} is available; {advice}")


def check_training(config, device=None):
    """Refuse, before anything is written, settings whose pictures no file can hold, whose training
    needs more memory than the machine has, or that ask for more threads than it can run."""
    check_threads(config.threads)
    check_image("grid.jpg", config.PRR_n_img_x * 28, config.PRR_n_img_y * 28, "--PRR_n_img_x/--PRR_n_img_y")
    if config.dim_z == 2:
        check_image("grid.jpg", config.PMLR_n_img_x * 28, config.PMLR_n_img_y * 28, "--PMLR_n_img_x/--PMLR_n_img_y")
    needs = training_memory(config)
    total = sum(needs.values())
    free = available_memory()
    if device is not None and getattr(device, "type", "cpu") == "cuda":
        free = min(free or float("inf"), torch.cuda.mem_get_info(device)[0])
    if free is not None and total > free:
        biggest = max(needs, key=needs.get)
        raise LimitError(f"these settings need about {_size(total)} of memory to train ({_size(needs[biggest])} "
                         f"for {biggest}; the model has {parameters(config.dim_z, config.n_hidden, config.n_layers):,} weights), "
                         f"but {_size(free)} is available; choose smaller {biggest}")


def _size(n):
    return f"{n / GB:,.1f} GB" if n >= 0.1 * GB else f"{n / 1e6:,.0f} MB"
