"""Datasets: reading IDX files, finding or downloading MNIST and Fashion-MNIST, and users' own images.

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
import warnings
import zlib
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import numpy as np

from . import files
from .config import UserError

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


class DataError(UserError):
    """A problem with the user's data or files, reported as one line without a traceback."""


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

def load_user_image(path):
    """A user's PNG or JPEG as a float32 array of 784 pixels in [0, 1], prepared like MNIST."""
    return prepare_digit(read_user_image(path), path)


# Users' images larger than this are refused: a 20000 x 20000 PNG is a few hundred KB on disk but
# gigabytes once decoded. Larger images up to it are decoded downscaled to about MAX_USER_SIDE pixels
# a side (a digit needs far fewer), so memory stays near the decoded file's own size.
MAX_USER_PIXELS = 100_000_000
MAX_USER_SIDE = 2048


def read_user_image(path):
    """A user's image file as a float32 grey array (height, width) in [0, 1]; any size and colour.

    Ink is found where people put it: in the alpha channel of a drawing on a transparent background,
    and in the full range of 16-bit grey values.
    """
    from PIL import Image, UnidentifiedImageError

    try:
        with warnings.catch_warnings():  # sizes are checked here, in one line of our own
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as image:
                width, height = image.size
                if width * height > MAX_USER_PIXELS:
                    raise DataError(f"{path}: the image is {width} x {height} pixels, more than the "
                                    f"{MAX_USER_PIXELS // 1_000_000} megapixels accepted; scale it down")
                factor = max(1, math.ceil(max(width, height) / MAX_USER_SIDE))
                if factor > 1 and image.format == "JPEG":
                    image.draft(image.mode, (width // factor, height // factor))  # decode at 1/2..1/8 size
                image.load()
                sixteen_bit = image.mode.startswith("I;16")
                factor = max(1, math.ceil(max(image.size) / MAX_USER_SIDE))
                if factor > 1:  # reduce() averages blocks, but not in these modes
                    if sixteen_bit:
                        image = image.convert("I")
                    elif image.mode in ("1", "P"):
                        image = image.convert("RGBA" if "transparency" in image.info else "L")
                    image = image.reduce(factor)
                return _grey(image, sixteen_bit)
    except FileNotFoundError:
        raise DataError(f"{path}: no such file") from None
    except Image.DecompressionBombError:  # Pillow's own limit, above ours: refused before its size is read
        raise DataError(f"{path}: the image has more than the {MAX_USER_PIXELS // 1_000_000} megapixels "
                        f"accepted; scale it down") from None
    except UnidentifiedImageError:
        raise DataError(f"{path}: not an image Pillow can read; give a PNG or JPEG file") from None
    except OSError as e:
        raise DataError(f"{path}: cannot read the image ({e}); give a readable PNG or JPEG") from None
    except (ValueError, MemoryError) as e:
        raise DataError(f"{path}: cannot decode the image ({e}); give a PNG or JPEG") from None


def _grey(image, sixteen_bit=False):
    """A decoded PIL image as grey levels in [0, 1], with ink on a transparent background made visible."""
    if image.mode.startswith("I;16") or (image.mode == "I" and sixteen_bit):
        return np.clip(np.asarray(image, dtype=np.float32) / 65535.0, 0, 1)
    if image.mode in ("I", "F"):  # 32-bit values (TIFFs, or 16-bit PNGs in some Pillow versions)
        values = np.asarray(image, dtype=np.float32)
        top = 1.0 if values.max() <= 1 else 255.0 if values.max() <= 255 else 65535.0
        return np.clip(values / top, 0, 1)
    if image.mode == "P" and "transparency" in image.info or image.mode in ("PA", "La"):
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "RGBa"):
        rgba = np.asarray(image.convert("RGBA"), dtype=np.float32) / 255.0
        alpha = rgba[..., 3]
        grey = np.asarray(image.convert("RGB").convert("L"), dtype=np.float32) / 255.0
        if alpha.min() < 1.0:
            # Lay the drawing on paper that contrasts with its ink: white under dark ink, black under
            # light ink. Transparent pixels' colour (often black, like the ink) then no longer matters.
            opaque = alpha > 0.5
            ink_is_dark = not opaque.any() or np.median(grey[opaque]) < 0.5
            paper = 1.0 if ink_is_dark else 0.0
            grey = grey * alpha + paper * (1.0 - alpha)
        return grey
    return np.asarray(image.convert("L"), dtype=np.float32) / 255.0


def prepare_digit(grey, path="the image"):
    """A grey image (height, width) in [0, 1] as 784 pixels prepared as MNIST's digits were made.

    Inverted when the background is light (ink on paper), the ink cropped, scaled to fit
    20x20 and centred by its centre of mass in a 28x28 frame.

    `mnist-vae explore` repeats these steps in JavaScript (explore/explore.js) on the user's
    drawing, and a test holds the two to the same result: so every step is plain arithmetic
    that JavaScript can do in the same order, float32 up to the crop (as read_user_image
    gives it), float64 after.
    """
    grey = np.asarray(grey, dtype=np.float32)
    border = np.concatenate([grey[0], grey[-1], grey[:, 0], grey[:, -1]])
    if np.median(border) > 0.5:
        grey = 1.0 - grey
    grey = grey - grey.min()
    if grey.max() <= 0:
        raise DataError(f"{path}: the image is blank; give an image with a visible digit or object")
    grey = grey / grey.max()
    rows, cols = np.nonzero(grey > 0.2)
    grey = grey[rows.min(): rows.max() + 1, cols.min(): cols.max() + 1].astype(np.float64)
    height, width = grey.shape
    scale = 20.0 / max(height, width)
    # Area resampling (each output pixel the mean of the input area it covers), as two matrix
    # products. It replaced Pillow's LANCZOS so that the page can compute the same pixels: it is
    # the ideal anti-aliasing filter for shrinking, which is what users' images need.
    ink = area_weights(max(1, round(height * scale)), height) @ grey @ area_weights(
        max(1, round(width * scale)), width).T
    frame = np.zeros((28, 28), dtype=np.float32)
    total = ink.sum()
    ys, xs = np.indices(ink.shape)
    centre_y = (ys * ink).sum() / total if total > 0 else ink.shape[0] / 2
    centre_x = (xs * ink).sum() / total if total > 0 else ink.shape[1] / 2
    # round() halves to even, as the page does too.
    top = int(np.clip(round(14 - centre_y), 0, 28 - ink.shape[0]))
    left = int(np.clip(round(14 - centre_x), 0, 28 - ink.shape[1]))
    frame[top: top + ink.shape[0], left: left + ink.shape[1]] = ink
    return frame.reshape(-1)


def area_weights(n_out, n_in):
    """The (n_out, n_in) matrix of area resampling: row i averages input span [i, i+1) * n_in / n_out.

    Each weight is the length of the overlap of output pixel i's span with input pixel j,
    over the span's length, so every row sums to 1, shrinking or enlarging.
    """
    weights = np.zeros((n_out, n_in))
    for i in range(n_out):
        low, high = i * n_in / n_out, (i + 1) * n_in / n_out
        for j in range(int(low), min(n_in, math.ceil(high))):
            weights[i, j] = (min(high, j + 1) - max(low, j)) * n_out / n_in
    return weights
