"""Datasets: reading IDX files, finding or downloading MNIST and Fashion-MNIST, and holding them as tensors.

A dataset is looked for, in order: in --data_dir; in the user cache that downloads
write to; in /usr/share/datasets/<name>/ (Debian's dataset-fashion-mnist); in the copy
of MNIST bundled with this package; and last it is downloaded from the official
mirrors, each file checked against its published MD5.
"""

import gzip
import hashlib
import http.client
import math
import os
import urllib.error
import urllib.request
import zlib
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import numpy as np
import torch

from . import files
from .errors import DataError, UserError

FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}

DATASETS = {
    "mnist": {
        "classes": [str(digit) for digit in range(10)],
        "mirrors": [
            "https://ossci-datasets.s3.amazonaws.com/mnist/",
            "http://yann.lecun.com/exdb/mnist/",
        ],
        "md5": {
            "train-images-idx3-ubyte.gz": "f68b3c2dcbeaaa9fbdd348bbdeb94873",
            "train-labels-idx1-ubyte.gz": "d53e105ee54ea40749a09fcbcd1e9432",
            "t10k-images-idx3-ubyte.gz": "9fb629c4189551a2d022fa330f9573f3",
            "t10k-labels-idx1-ubyte.gz": "ec29112dd5afa0611ce80d1b7f02629c",
        },
        # SHA-256 of each published file once decompressed (`gunzip -c FILE | sha256sum`): a copy
        # recompressed by another gzip has other bytes but these contents.
        "sha256": {
            "train_images": "ba891046e6505d7aadcbbe25680a0738ad16aec93bde7f9b65e87a2fc25776db",
            "train_labels": "65a50cbbf4e906d70832878ad85ccda5333a97f0f4c3dd2ef09a8a9eef7101c5",
            "test_images": "0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7",
            "test_labels": "ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2",
        },
    },
    "fashion-mnist": {
        "classes": ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"],
        "mirrors": ["http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"],
        "md5": {
            "train-images-idx3-ubyte.gz": "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
            "train-labels-idx1-ubyte.gz": "25c81989df183df01b3e8a0aad5dffbe",
            "t10k-images-idx3-ubyte.gz": "bef4ecab320f06d8554ea6380940ec79",
            "t10k-labels-idx1-ubyte.gz": "bb300cfdad3c16e7a12a480ee83cd310",
        },
        "sha256": {
            "train_images": "c59f468a2f672dc815687fe0f83887768d799fd8a3f3276145d20f83aa44d888",
            "train_labels": "bad3541b69d912435c50bb6ba87bec294ff4f6a2e1246121d8633921760443d9",
            "test_images": "5b4141f0afbad91edebe8549f8fcffe087ea10ca49f1dbef5c9a5cd8815ce37b",
            "test_labels": "0402a96d92fd2663957122ceb108a494c5af83dab82d92729df917d7dec38c34",
        },
    },
}
DISPLAY_NAMES = {"mnist": "MNIST", "fashion-mnist": "Fashion-MNIST"}
FILE_NAMES = {"train_images": "training images", "train_labels": "training labels", "test_images": "test images",
              "test_labels": "test labels"}

SYSTEM_DATA_DIR = Path("/usr/share/datasets")
# An IDX payload larger than this is refused rather than read: far above MNIST's 47 MB, and it keeps a
# small gzip file that inflates to many gigabytes (or a header that promises them) from filling memory.
MAX_IDX_BYTES = 1 << 31
DOWNLOAD_TIMEOUT_S = 30


@dataclass
class Dataset:
    name: str
    classes: list
    train_images: np.ndarray  # (n, 28, 28) uint8
    train_labels: np.ndarray  # (n,) uint8
    test_images: np.ndarray
    test_labels: np.ndarray
    source: str  # where the files were found, for the user and config.json


# ---------------------------------------------------------------- IDX files

def read_idx(path):
    """Read an IDX file (gzipped or raw) of unsigned bytes into a numpy array, checking its header.

    The file is read as a stream, the header first, so that no more than the header promises (and
    never more than MAX_IDX_BYTES) is ever decompressed.
    """
    path = Path(path)
    try:
        with open(path, "rb") as f:
            stream = gzip.GzipFile(fileobj=f) if f.read(2) == b"\x1f\x8b" else f
            f.seek(0)
            return _read_idx_stream(stream, path)
    except OSError as e:  # includes gzip.BadGzipFile
        raise DataError(f"{path}: cannot read it ({e.strerror or e}); replace the file with a good copy") from None
    except EOFError:
        raise DataError(f"{path}: the gzip stream is truncated; replace the file with a good copy") from None
    except zlib.error as e:
        raise DataError(f"{path}: the gzip stream is corrupt ({e}); replace the file with a good copy") from None


def _read_idx_stream(f, path):
    raw = f.read(4)
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0:
        raise DataError(f"{path}: not an IDX file (bad magic number); replace it with a good copy")
    if raw[2] != 0x08:
        raise DataError(f"{path}: IDX element type 0x{raw[2]:02x} is not unsigned byte (0x08)")
    ndim = raw[3]
    dims = f.read(4 * ndim)
    if ndim == 0 or len(dims) < 4 * ndim:
        raise DataError(f"{path}: IDX header is truncated; replace the file with a good copy")
    shape = tuple(int.from_bytes(dims[4 * i: 4 + 4 * i], "big") for i in range(ndim))
    expected = math.prod(shape)  # Python integers: no overflow, whatever the header says
    if expected > MAX_IDX_BYTES:
        raise DataError(f"{path}: header promises {expected} bytes of data for shape {shape}, more than the "
                        f"{MAX_IDX_BYTES} this program reads; the file is damaged or not a dataset")
    payload = f.read(expected)
    if len(payload) != expected:
        raise DataError(f"{path}: header promises {expected} bytes of data for shape {shape} "
                        f"but the file holds {len(payload)}; replace it with a good copy")
    extra = 0
    while extra <= MAX_IDX_BYTES and (chunk := f.read(1 << 20)):  # count what is left, up to a bound
        extra += len(chunk)
    if extra:
        held = f"{expected + extra}" if extra <= MAX_IDX_BYTES else f"more than {expected + MAX_IDX_BYTES}"
        raise DataError(f"{path}: header promises {expected} bytes of data for shape {shape} "
                        f"but the file holds {held}; replace it with a good copy")
    return np.frombuffer(payload, dtype=np.uint8).reshape(shape)


def _check_pair(images, labels, images_path, labels_path):
    if images.ndim != 3 or images.shape[1:] != (28, 28):
        raise DataError(f"{images_path}: images have shape {images.shape}, expected (n, 28, 28)")
    if labels.ndim != 1:
        raise DataError(f"{labels_path}: labels have shape {labels.shape}, expected (n,)")
    if len(images) != len(labels):
        raise DataError(f"{images_path} holds {len(images)} images but {labels_path} holds "
                        f"{len(labels)} labels; the files do not belong together")
    if labels.size and labels.max() > 9:
        raise DataError(f"{labels_path}: label {int(labels.max())} is outside 0..9")
    if len(images) == 0:
        raise DataError(f"{images_path} holds no images; a dataset needs at least one training and one test "
                        f"image; replace it with a good copy")


# ---------------------------------------------------------------- finding a dataset

def cache_dir(name):
    """Where downloads go: $XDG_CACHE_HOME/mnist-vae/<name>, or ~/.cache/mnist-vae/<name>."""
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "mnist-vae" / name


def bundled_dir(name):
    """The copy of the dataset shipped inside this package (MNIST only), or None."""
    folder = resources.files("mnist_vae") / "datasets" / name
    return Path(str(folder)) if folder.is_dir() else None


def _file_in(folder, stem):
    """The IDX file `stem` in `folder`, gzipped or raw, or None."""
    for candidate in (folder / (stem + ".gz"), folder / stem):
        if candidate.is_file():
            return candidate
    return None


def _complete(folder):
    return folder is not None and all(_file_in(folder, stem) for stem in FILES.values())


def find_dataset(name, data_dir=None, download=True, log=print):
    """The folder holding the four IDX files of `name`, and a phrase saying where it came from."""
    if name not in DATASETS:
        raise DataError(f"unknown dataset {name!r}; choose one of {', '.join(DATASETS)}")
    if data_dir is not None:
        folder = Path(data_dir)
        if not _complete(folder):
            missing = [s for s in FILES.values() if not _file_in(folder, s)]
            raise DataError(f"--data_dir {folder} lacks {', '.join(missing)} (.gz or raw); "
                            f"put the four IDX files of {name} there")
        return folder, f"--data_dir {folder}"
    candidates = [
        (cache_dir(name), "user cache"),
        (SYSTEM_DATA_DIR / name, "system folder"),
        (bundled_dir(name), "copy bundled with mnist-vae"),
    ]
    for folder, what in candidates:
        if _complete(folder):
            return folder, f"{what} {folder}"
    if not download:
        raise DataError(f"{name} is not on this machine; pass --data_dir with its four IDX files")
    folder = cache_dir(name)
    download_dataset(name, folder, log=log)
    return folder, f"downloaded to {folder}"


def load_dataset(name, data_dir=None, log=print):
    """Find, read and check the train and test sets of `name`."""
    folder, source = find_dataset(name, data_dir, log=log)
    paths = {key: _file_in(folder, stem) for key, stem in FILES.items()}
    arrays = {key: read_idx(path) for key, path in paths.items()}
    for key, stem in FILES.items():  # a .gz beside a raw file: the two must be the same data
        raw = folder / stem
        if paths[key] != raw and raw.is_file() and not np.array_equal(read_idx(raw), arrays[key]):
            raise DataError(f"{paths[key]} and {raw} hold different data; keep the one that is {name}'s "
                            f"{FILE_NAMES[key]} and remove the other")
    check_identity(name, paths, arrays, folder)
    for split in ("train", "test"):
        _check_pair(arrays[f"{split}_images"], arrays[f"{split}_labels"],
                    paths[f"{split}_images"], paths[f"{split}_labels"])
    return Dataset(name=name, classes=DATASETS[name]["classes"], source=source, **arrays)


def content_sha256(array):
    """SHA-256 of the IDX file of unsigned bytes that holds `array`, as decompressed (header and payload)."""
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(int(n).to_bytes(4, "big") for n in array.shape)
    digest = hashlib.sha256(header)
    digest.update(np.ascontiguousarray(array).data)
    return digest.hexdigest()


def check_identity(name, paths, arrays, folder):
    """Refuse files that are a published dataset's, but not where they stand: another dataset's (Fashion-MNIST
    given as MNIST), a folder mixing two datasets' files, or one file of a dataset under another's name
    (its test images as training images). Files no dataset published (one's own data) pass."""
    known = {digest: (dataset, key) for dataset, spec in DATASETS.items()
             for key, digest in spec.get("sha256", {}).items()}
    found = {key: known.get(content_sha256(array)) for key, array in arrays.items()}
    others = {key: who for key, who in found.items() if who is not None and who[0] != name}
    if others:
        key, (dataset, what) = next(iter(others.items()))
        is_file = f"{paths[key]} is {DISPLAY_NAMES[dataset]}'s {FILE_NAMES[what]}"
        if any(who is not None and who[0] == name for who in found.values()):
            raise DataError(f"{folder} mixes {DISPLAY_NAMES[name]}'s and {DISPLAY_NAMES[dataset]}'s files "
                            f"({is_file}); give a folder with the four files of one dataset")
        raise DataError(f"{is_file}, not {DISPLAY_NAMES[name]}'s; pass --dataset {dataset} to use "
                        f"{DISPLAY_NAMES[dataset]}, or give the files of {DISPLAY_NAMES[name]}")
    for key, who in found.items():
        if who is not None and who[1] != key:
            raise DataError(f"{paths[key]} holds {DISPLAY_NAMES[who[0]]}'s {FILE_NAMES[who[1]]}, not its "
                            f"{FILE_NAMES[key]}; put each file under its own name ({FILES[who[1]]})")


# ---------------------------------------------------------------- downloading

def download_dataset(name, folder, mirrors=None, timeout=None, log=print):
    """Fetch the four .gz files of `name` into `folder`, each checked by MD5, trying mirrors in turn.

    Each file is written to a temporary name in `folder` and renamed into place only
    once its checksum is right, so a failed or interrupted download leaves nothing behind.
    """
    spec = DATASETS[name]
    mirrors = spec["mirrors"] if mirrors is None else mirrors
    timeout = DOWNLOAD_TIMEOUT_S if timeout is None else timeout
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise files.WriteError(files.error_line(folder, e)) from None
    for filename, md5 in spec["md5"].items():
        target = folder / filename
        if target.is_file() and _md5(target) == md5:
            continue
        failures = []
        for mirror in mirrors:
            url = mirror + filename
            log(f"downloading {url}")
            try:
                _fetch(url, target, md5, timeout)
                break
            # URLError, timeouts and HTTP errors are OSErrors; a server that does not speak HTTP, or
            # a transfer cut short, raises http.client.HTTPException: try the next mirror for all.
            except (MirrorFailed, ValueError) as e:
                failures.append(f"{url}: {_reason(e.args[0] if isinstance(e, MirrorFailed) else e)}")
        else:
            raise DataError(f"could not download {name} ({'; '.join(failures)}); if this machine is "
                            f"offline, copy the four IDX files into a folder and pass --data_dir")


def _fetch(url, target, md5, timeout):
    """Download `url` into `target` through files.atomic_path: a failed transfer or checksum raises (the
    next mirror is tried) and leaves nothing behind; a local write error is a WriteError (one line)."""
    digest = hashlib.md5()
    with files.atomic_path(target) as tmp, open(tmp, "wb") as out:
        try:
            with urllib.request.urlopen(url, timeout=timeout) as response:
                while chunk := response.read(1 << 16):
                    digest.update(chunk)
                    try:
                        out.write(chunk)
                    except OSError as e:  # the disk, not the mirror: no other mirror will help
                        raise files.WriteError(files.error_line(target, e)) from None
        except (OSError, http.client.HTTPException) as e:  # the mirror's fault: not atomic_path's to report
            raise MirrorFailed(e) from None
        if digest.hexdigest() != md5:
            raise ValueError(f"MD5 {digest.hexdigest()} does not match the published {md5}")


class MirrorFailed(Exception):
    """A download failed on the mirror's side (unreachable, HTTP error, cut short): try the next one."""


def _reason(error):
    if isinstance(error, urllib.error.HTTPError):
        return f"HTTP {error.code}"
    if isinstance(error, urllib.error.URLError):
        return f"unreachable ({error.reason})"
    return str(error) or type(error).__name__


def _md5(path):
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "md5").hexdigest()


# ---------------------------------------------------------------- users' own images


def class_index(name, dataset, flag="--class"):
    """The index of a class given as its number or its name, case-insensitive (7, sneaker, ankle boot);
    `flag` is what the error names (the option that gave it)."""
    classes = DATASETS[dataset]["classes"]
    wanted = name.strip().lower()
    for index, known in enumerate(classes):
        if wanted in (str(index), known.lower(), known.lower().replace("/", " "), known.lower().split("/")[0]):
            return index
    raise UserError(f"{flag} {name}: {dataset} has no such class; give one of "
                    + ", ".join(f"{i} ({c})" if c != str(i) else c for i, c in enumerate(classes)))


# Fixed seeds, independent of --seed, so that every run is measured on the same draws.
TEST_BINARIZATION_SEED = 20140101  # the binarized test set


@dataclass
class Tensors:
    train: torch.Tensor  # (n, 784) float32 in [0, 1]: grey levels, or binary when binarized
    test: torch.Tensor
    test_labels: np.ndarray
    classes: list
    source: str
    train_y: torch.Tensor = None  # the labels as int64 tensors on the device, for conditional models
    test_y: torch.Tensor = None
    fingerprint: str = ""  # of the images and labels used (runs.data_fingerprint), for --resume


def load_tensors(config, device, log=print, fingerprint_of=None):
    """The dataset as float tensors on `device`, subset and binarized as the config says. The fingerprint
    is of the images and labels used, or of the first (n_train, n_test) of `fingerprint_of` (a run's
    own subsets, to compare with its checkpoint's when evaluating on a part of the test set)."""
    dataset = load_dataset(config.dataset, config.data_dir, log=log)
    log(f"data: {config.dataset} from the {dataset.source}")
    train = dataset.train_images[: config.n_train or None].copy()  # writable, for torch
    test = dataset.test_images[: config.n_test or None].copy()
    n_train, n_test = fingerprint_of or (config.n_train, config.n_test)
    fingerprint = data_fingerprint(dataset.train_images[: n_train or None], dataset.train_labels[: n_train or None],
                                   dataset.test_images[: n_test or None], dataset.test_labels[: n_test or None])
    train = torch.from_numpy(train.reshape(len(train), -1)).float().div_(255)
    test = torch.from_numpy(test.reshape(len(test), -1)).float().div_(255)
    if config.binarize != "none":
        test = binarize_test(test)
    if config.binarize == "static":
        train = torch.bernoulli(train, generator=torch.Generator().manual_seed(config.seed))
    test_labels = dataset.test_labels[: config.n_test or None].copy()
    train_y = torch.from_numpy(dataset.train_labels[: config.n_train or None].astype(np.int64)).to(device)
    return Tensors(train.to(device), test.to(device), test_labels, dataset.classes, dataset.source,
                   train_y, torch.from_numpy(test_labels.astype(np.int64)).to(device), fingerprint)


def binarize_test(grey, seed=TEST_BINARIZATION_SEED):
    """Binary test images drawn from the grey levels: with the fixed seed, the one test set every run with
    --binarize is measured on (other seeds: the other test sets the same grey levels could have given)."""
    return torch.bernoulli(grey, generator=torch.Generator().manual_seed(seed))


def add_noise(x, noise_factor, generator=None):
    """x + noise_factor * N(0, 1), clipped to [0, 1] so the encoder sees valid pixel values."""
    noise = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
    return (x + noise_factor * noise).clamp_(0, 1)


def data_fingerprint(*arrays):
    """SHA-256 over the shapes and bytes of the arrays (the images and labels a run uses)."""
    digest = hashlib.sha256()
    for array in arrays:
        digest.update(f"{array.dtype.str}{tuple(array.shape)}".encode())
        digest.update(np.ascontiguousarray(array).data)
    return digest.hexdigest()
