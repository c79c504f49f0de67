"""What a training run writes as it goes: the observers of the loop (the epoch's log line, its pictures,
metrics.csv and its curves, TensorBoard's logs, the checkpoint) and the files they write.

The loop tells every observer when an epoch ends, when a signal stops it mid-epoch and when training
ends (Observer); default_observers is the list every run has, in the order they are told.
"""

import csv
import io
import time

import numpy as np
import torch
from PIL import Image

from . import checkpoint, files, plots, runs
from .evaluation import decode_images, elbo_name, metric_fields, reconstruct
from .model import analogies, evaluating, samples_by_class


class Observer:
    """What the training loop tells as it goes; a subclass overrides what it needs.

    `run` is the loop's run state (loop.Run: config, out, model, optimizer, tensors, progress, log...),
    `row` the epoch's metrics row as metrics.csv gets it. When on_epoch_end is called, run.progress
    is already past the epoch (run.progress.history ends with `row`)."""

    def on_epoch_end(self, run, row):
        pass

    def on_interrupt(self, run):
        """A signal stopped the run, between two steps of an epoch or as an epoch ended (after on_epoch_end;
        run.progress.step is 0 then); the loop stops after telling everyone."""

    def on_train_end(self, run):
        """The last epoch is done (or the time budget spent); called before the log-likelihood estimate."""


class EpochLog(Observer):
    """The epoch's line in the log: the training and test -ELBO with their terms, and the seconds."""

    def on_epoch_end(self, run, row):
        config, elbo = run.config, elbo_name(run.config)
        name = "-elbo(x|y)" if run.model.conditional else "-elbo"
        loss = f", loss {row['train_loss']:8.3f}" if "train_loss" in row else ""
        extra = ""
        bound = "test_neg_iw_bound" + ("_given_y" if run.model.conditional else "")
        if bound in row:
            extra += f"  test -iw bound (k={config.k_train}) {row[bound]:8.3f}"
        if "test_accuracy" in row:
            extra += f"  test accuracy {row['test_accuracy']:.4f}"
        run.log(f"epoch {row['epoch']:>{len(str(config.num_epochs))}}/{config.num_epochs}  "
                f"train {name} {row[f'train_{elbo}']:8.3f} (recon {row['train_recon']:8.3f}, "
                f"kl {row['train_kl']:6.3f}{loss})  "
                f"test {name} {row[f'test_{elbo}']:8.3f} (recon {row['test_recon']:8.3f}, "
                f"kl {row['test_kl']:6.3f}){extra}  {row['seconds']:5.1f} s")


class EpochImages(Observer):
    """The epoch's pictures (write_epoch_images)."""

    def on_epoch_end(self, run, row):
        write_epoch_images(run.model, run.config, run.fixed, run.tensors, run.out, row["epoch"])


class Metrics(Observer):
    """metrics.csv, rewritten with every epoch's row so far, and loss_curves.png, drawn from the same rows
    after the first epoch, then at most every `redraw_seconds` while the run goes on, and always where
    training ends or a signal stops it.

    matplotlib takes about as long to draw the curves as the test set takes to evaluate: drawn after
    every epoch, they would slow a run of short epochs by a tenth or more. So between drawings the
    picture may lag metrics.csv by up to `redraw_seconds`, never at the end."""

    def __init__(self, redraw_seconds=30.0):
        self.redraw_seconds = redraw_seconds
        self.drawn_at = None  # time.monotonic() of the last drawing in this process
        self.behind = False  # rows in metrics.csv that loss_curves.png does not show yet

    def on_epoch_end(self, run, row):
        write_metrics(run.progress.history, run.out, run.config)
        self.behind = True
        if self.drawn_at is None or time.monotonic() - self.drawn_at >= self.redraw_seconds:
            self._draw(run)

    def on_interrupt(self, run):
        self._draw(run)

    def on_train_end(self, run):
        self._draw(run)

    def _draw(self, run):
        if self.behind:
            draw_loss_curves(run.progress.history, run.out, run.config)
            self.drawn_at, self.behind = time.monotonic(), False


class TensorBoard(Observer):
    """The epoch's metrics and pictures in TensorBoard's logs (--tensorboard)."""

    def __init__(self, config):
        self.board = tensorboard(config)

    def on_epoch_end(self, run, row):
        log_tensorboard(self.board, row, run.out, run.config, row["epoch"])

    def on_train_end(self, run):
        self.board.close()


class Checkpoint(Observer):
    """checkpoint.safetensors, at the end of every epoch and where a signal stops an epoch midway."""

    def on_epoch_end(self, run, row):
        save_checkpoint(run)

    def on_interrupt(self, run):
        if run.progress.step:  # else the epoch's end, whose checkpoint on_epoch_end has written
            save_checkpoint(run)


def default_observers(config):
    """The observers of every run, in the order they are told: the log line, the pictures, the metrics,
    TensorBoard's logs where config.tensorboard asks for them, and last the checkpoint."""
    return [EpochLog(), EpochImages(), Metrics(), *([TensorBoard(config)] if config.tensorboard else []),
            Checkpoint()]


def save_checkpoint(run):
    """Write the run's checkpoint: the model, Adam, the random states and run.progress (the epoch and the
    step reached, the history, the seconds of this epoch, the data order's state at the epoch's start, and
    the step results of the epoch so far)."""
    progress = run.progress
    extra = {"rng.data_epoch_start": progress.epoch_start_state, "rng.torch": torch.get_rng_state(),
             "progress.step_terms": progress.step_terms}
    if run.device.type == "cuda":
        extra["rng.cuda"] = torch.cuda.get_rng_state()
    state = {"config": run.config.to_dict(), "model": run.model.name, "epoch": progress.epoch,
             "step": progress.step, "history": progress.history, "seconds_in_epoch": progress.seconds,
             "data_source": run.tensors.source, "data_fingerprint": run.tensors.fingerprint}
    checkpoint.save(run.out, run.model, run.optimizer, state, extra)


def write_input_images(config, fixed, out):
    """input.jpg, the test images the reconstructions start from, and input_noise.jpg, their noisy copies
    (--add_noise)."""
    plots.save_grid(fixed["prr_clean"].cpu().numpy(), config.PRR_n_img_x, config.PRR_n_img_y, out / "input.jpg")
    if config.add_noise:
        plots.save_grid(fixed["prr_input"].cpu().numpy(), config.PRR_n_img_x, config.PRR_n_img_y,
                        out / "input_noise.jpg")


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


def draw_loss_curves(history, out, config):
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
