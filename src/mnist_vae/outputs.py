"""What a training run writes each epoch: the pictures, metrics.csv and its curves, TensorBoard's logs."""

import csv
import io

import numpy as np
import torch
from PIL import Image

from . import files, plots, runs
from .evaluation import decode_images, elbo_name, metric_fields, reconstruct
from .model import analogies, evaluating, samples_by_class


def epoch_name(prefix, epoch, num_epochs, digits=0):
    """The file of an epoch's image: the epoch zero-padded to `digits`, or else to the width of num_epochs."""
    return f"{prefix}_epoch_{epoch:0{digits or runs.epoch_digits(num_epochs)}d}.jpg"


def write_epoch_images(model, config, fixed, tensors, out, epoch):
    cpu = lambda t: t.detach().float().cpu().numpy()  # noqa: E731
    nx, ny = config.PRR_n_img_x, config.PRR_n_img_y
    labels = fixed["prr_labels"] if model.conditional else None
    plots.save_grid(cpu(reconstruct(model, fixed["prr_input"], labels)), nx, ny,
                    out / epoch_name("PRR", epoch, config.num_epochs, config.epoch_digits))
    if model.conditional:
        # One row per class, one fixed z per column: a column is one style written as every class.
        plots.save_grid(cpu(samples_by_class(model, fixed["prior_z"][:nx])).reshape(-1, 784), nx, model.n_classes,
                        out / epoch_name("samples", epoch, config.num_epochs, config.epoch_digits))
        # Kingma et al. 2014's analogies: a test image, then its z decoded with each class.
        x = fixed["prr_clean"][:ny]
        styles = analogies(model, x, fixed["prr_labels"][:ny])
        plots.save_grid(cpu(torch.cat([x[:, None], styles], dim=1)).reshape(-1, 784), 1 + model.n_classes, len(x),
                        out / epoch_name("analogies", epoch, config.num_epochs, config.epoch_digits))
    else:
        plots.save_grid(cpu(decode_images(model, fixed["prior_z"])), nx, ny,
                        out / epoch_name("samples", epoch, config.num_epochs, config.epoch_digits))
    if config.dim_z == 2:
        z = torch.from_numpy(plots.manifold_grid_z(config.PMLR_n_img_x, config.PMLR_n_img_y, config.PMLR_z_range))
        z = z.to(fixed["prior_z"].device)
        for c in range(model.n_classes) if model.conditional else [None]:
            grid_labels = None if c is None else torch.full((len(z),), c, dtype=torch.long, device=z.device)
            plots.save_grid(cpu(decode_images(model, z, grid_labels)), config.PMLR_n_img_x, config.PMLR_n_img_y,
                            out / epoch_name("PMLR" if c is None else f"PMLR_class{c}", epoch, config.num_epochs,
                                              config.epoch_digits))
        n = min(config.PMLR_n_samples, len(tensors.test))
        with evaluating(model):
            mu, _ = model.encode(tensors.test[:n], tensors.test_y[:n] if model.conditional else None)
        plots.save_latent_map(cpu(mu), tensors.test_labels[:n], tensors.classes, config.PMLR_z_range,
                              out / epoch_name("PMLR_map", epoch, config.num_epochs, config.epoch_digits))


def write_metrics(history, out, config):
    table = io.StringIO()
    writer = csv.DictWriter(table, fieldnames=metric_fields(config), lineterminator="\n")
    writer.writeheader()
    for row in history:
        writer.writerow({key: (f"{value:.4f}" if isinstance(value, float) else value) for key, value in row.items()})
    files.write_text(out / "metrics.csv", table.getvalue())
    plots.save_loss_curves(history, out / "loss_curves.png", elbo_key=elbo_name(config),
                           title=f"{config.dataset}, dim_z={config.dim_z}, likelihood={config.likelihood}, "
                                 f"binarize={config.binarize}")


def tensorboard(config):
    if not config.tensorboard:
        return None
    from torch.utils.tensorboard import SummaryWriter  # availability checked by the CLI

    return SummaryWriter(config.tensorboard)


def log_tensorboard(board, row, out, config, epoch):
    for key in metric_fields(config)[1:-2]:
        board.add_scalar(key.replace("_", "/", 1), row[key], epoch)
    for prefix in ("PRR", "samples", "PMLR"):
        path = out / epoch_name(prefix, epoch, config.num_epochs, config.epoch_digits)
        if path.exists():
            board.add_image(prefix, np.asarray(Image.open(path)), epoch, dataformats="HW")
    board.flush()
