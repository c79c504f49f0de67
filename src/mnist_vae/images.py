"""Users' own images: read from files, PIL images, arrays or tensors, and prepared as MNIST's digits were."""

from __future__ import annotations

import math
import warnings

import numpy as np
from PIL import Image, UnidentifiedImageError

from .errors import DataError



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
