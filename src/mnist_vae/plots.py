"""Pictures: image grids (JPEG, as the old program wrote them), the latent map and the loss curves."""

import io
from pathlib import Path

import numpy as np
from PIL import Image

from . import files


def grid(images, n_x, n_y):
    """Tile the first n_x*n_y images (rows of 784 values in [0, 1]) into one uint8 array."""
    images = np.asarray(images, dtype=np.float32)[: n_x * n_y].reshape(-1, 28, 28)
    if len(images) < n_x * n_y:  # fewer images than cells: leave the rest black
        pad = np.zeros((n_x * n_y - len(images), 28, 28), dtype=np.float32)
        images = np.concatenate([images, pad])
    tiles = images.reshape(n_y, n_x, 28, 28).transpose(0, 2, 1, 3).reshape(n_y * 28, n_x * 28)
    return np.uint8(np.clip(tiles, 0, 1) * 255 + 0.5)


def save_grid(images, n_x, n_y, path):
    """Write a grid of images as a grey JPEG of (n_y*28) x (n_x*28) pixels."""
    save_image(Image.fromarray(grid(images, n_x, n_y), mode="L"), path, quality=95)


def side_by_side(columns, path, gap=2):
    """Write columns of images (each a list of 784-value rows) next to each other: input | result."""
    rows = max(len(column) for column in columns)
    canvas = np.full((rows * 28 + (rows - 1) * gap, len(columns) * 28 + (len(columns) - 1) * gap), 128,
                     dtype=np.uint8)
    for c, column in enumerate(columns):
        for r, image in enumerate(column):
            tile = np.uint8(np.clip(np.asarray(image).reshape(28, 28), 0, 1) * 255 + 0.5)
            canvas[r * (28 + gap): r * (28 + gap) + 28, c * (28 + gap): c * (28 + gap) + 28] = tile
    save_image(Image.fromarray(canvas, mode="L"), path)


def save_image(image, path, **options):
    """Write a PIL image atomically, in the format its file name says (.png, .jpg).

    It is encoded in memory first and written by files.write_bytes, which checks that every byte
    reached the file: a picture is whole under its name or not there, and an error names it."""
    kind = Image.registered_extensions()[Path(path).suffix.lower()]
    encoded = io.BytesIO()
    try:
        image.save(encoded, format=kind, **options)
    except (OSError, ValueError) as e:  # the encoder's refusal (a size it cannot hold), not the disk's
        raise files.WriteError(f"cannot encode {path} as {kind} ({e}); choose a smaller picture") from None
    files.write_bytes(path, encoded.getvalue())


def _save_figure(fig, path, **options):
    """Write a matplotlib figure as save_image writes a picture: encoded in memory, then written whole."""
    encoded = io.BytesIO()
    try:
        fig.savefig(encoded, format=Path(path).suffix[1:].lower(), **options)
    finally:
        _pyplot().close(fig)
    files.write_bytes(path, encoded.getvalue())


def manifold_grid_z(n_x, n_y, z_range):
    """The 2-D latent points of the manifold image, row by row from the top (z2 = +r) down."""
    z1 = np.linspace(-z_range, z_range, n_x, dtype=np.float32)
    z2 = np.linspace(z_range, -z_range, n_y, dtype=np.float32)
    return np.stack(np.meshgrid(z1, z2), axis=-1).reshape(-1, 2)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_latent_map(mu, labels, classes, z_range, path):
    """Scatter of 2-D posterior means coloured by class, with the manifold's square drawn in."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(8, 6.5), dpi=100)
    colours = plt.get_cmap("tab10")
    for label, name in enumerate(classes):
        points = mu[labels == label]
        ax.scatter(points[:, 0], points[:, 1], s=4, color=colours(label), label=name, alpha=0.8)
    ax.plot([-z_range, z_range, z_range, -z_range, -z_range],
            [-z_range, -z_range, z_range, z_range, -z_range], "k--", lw=0.8, label="manifold image")
    ax.set_xlabel("z[0] (posterior mean)")
    ax.set_ylabel("z[1] (posterior mean)")
    ax.set_aspect("equal", adjustable="datalim")
    ax.grid(alpha=0.3)
    ax.legend(loc="center left", bbox_to_anchor=(1.01, 0.5), markerscale=3, fontsize=9)
    ax.set_title(f"{len(mu)} test images in the latent space")
    fig.tight_layout()
    _save_figure(fig, path, pil_kwargs={"quality": 95})


def save_loss_curves(history, path, title="", elbo_key="neg_elbo"):
    """Train and test -ELBO, reconstruction and KL against epoch, one panel each; `elbo_key` names the
    -ELBO's column (neg_elbo_given_y: the bound on log p(x|y) of a conditional model)."""
    plt = _pyplot()
    epochs = [row["epoch"] for row in history]
    panels = [(elbo_key, "-ELBO" if elbo_key == "neg_elbo" else "-ELBO of log p(x|y)"), ("recon", "reconstruction  -log p(x|z)"), ("kl", "KL(q(z|x) || p(z))")]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8), dpi=100)
    for ax, (key, name) in zip(axes, panels):
        for split, style in (("train", "-"), ("test", "--")):
            ax.plot(epochs, [row[f"{split}_{key}"] for row in history], style, marker="o", ms=3, label=split)
        ax.set_title(name)
        ax.set_xlabel("epoch")
        ax.set_ylabel("nats per image")
        ax.grid(alpha=0.3)
        ax.legend()
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    _save_figure(fig, path)
