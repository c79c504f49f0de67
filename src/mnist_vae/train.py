"""The training loop: data as tensors in memory, fused Adam steps, evaluation, output files, checkpoints.

`train(config)` reads straight down: set up the output folder, the data and the model
(or restore them from a checkpoint), then for each epoch train, evaluate on the whole
test set, write the images, metrics and a checkpoint.

The module is callable: `mnist_vae.train(output=..., **settings)` is the Python API's
api.train (see the end of this file for why).
"""

import csv
import io
import math
import signal
import sys
import tempfile
import types
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from . import checkpoint, files, plots
from .config import Interrupted, UserError
from .data import load_dataset
from .fused import FusedTrainStep
from .model import VAE, importance_weighted_log_likelihood

# Fixed seeds, independent of --seed, so that every run is measured on the same draws.
TEST_BINARIZATION_SEED = 20140101  # the binarized test set
EVAL_SEED = 1312  # the z samples of the test -ELBO
IW_SEED = 6114  # the importance samples of the log-likelihood estimate
METRIC_FIELDS = ["epoch", "train_neg_elbo", "train_recon", "train_kl",
                 "test_neg_elbo", "test_recon", "test_kl", "seconds", "likelihood", "binarize"]
CHECK_EVERY = 50  # steps between checks for a non-finite loss (each check synchronises)


class TrainingError(UserError):
    pass


# ---------------------------------------------------------------- set-up

def resolve_device(name):
    """--device auto picks CUDA, then Apple's MPS, then the CPU."""
    cuda = torch.cuda.is_available()
    mps = getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()
    if name == "auto":
        name = "cuda" if cuda else "mps" if mps else "cpu"
    elif (name == "cuda" and not cuda) or (name == "mps" and not mps):
        raise UserError(f"--device {name}: no such device on this machine; use --device auto or cpu")
    return torch.device(name)


def prepare_output(folder, resume=False, overwrite=False):
    """Create the output folder if needed; refuse to write over another run unless asked to."""
    out = Path(folder)
    if out.exists() and not out.is_dir():
        raise UserError(f"--output {out} is a file, not a folder; give a folder name")
    if not (resume or overwrite) and ((out / "config.json").exists() or (out / checkpoint.FILENAME).exists()):
        raise UserError(f"--output {out} already holds a run; continue it with --resume {out}, "
                        f"replace its files with --overwrite, or choose another --output")
    try:
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=out):
            pass
    except OSError as e:
        raise UserError(f"--output {out}: cannot write there ({e.strerror or e}); "
                        f"choose a folder you can write to") from None
    return out


@dataclass
class Tensors:
    train: torch.Tensor  # (n, 784) float32 in [0, 1]: grey levels, or binary when binarized
    test: torch.Tensor
    test_labels: np.ndarray
    classes: list
    source: str


def load_tensors(config, device, log=print):
    """The dataset as float tensors on `device`, subset and binarized as the config says."""
    dataset = load_dataset(config.dataset, config.data_dir, log=log)
    log(f"data: {config.dataset} from the {dataset.source}")
    train = dataset.train_images[: config.n_train or None].copy()  # writable, for torch
    test = dataset.test_images[: config.n_test or None].copy()
    train = torch.from_numpy(train.reshape(len(train), -1)).float().div_(255)
    test = torch.from_numpy(test.reshape(len(test), -1)).float().div_(255)
    if config.binarize != "none":
        test = torch.bernoulli(test, generator=torch.Generator().manual_seed(TEST_BINARIZATION_SEED))
    if config.binarize == "static":
        train = torch.bernoulli(train, generator=torch.Generator().manual_seed(config.seed))
    return Tensors(train.to(device), test.to(device), dataset.test_labels[: config.n_test or None].copy(),
                   dataset.classes, dataset.source)


def add_noise(x, noise_factor, generator=None):
    """x + noise_factor * N(0, 1), clipped to [0, 1] so the encoder sees valid pixel values."""
    noise = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
    return (x + noise_factor * noise).clamp_(0, 1)


def make_model(config, device):
    model = VAE(config.dim_z, config.n_hidden, config.dropout, config.likelihood).to(device)
    try:
        optimizer = torch.optim.Adam(model.parameters(), lr=config.learning_rate, fused=True)
    except RuntimeError:  # a device without a fused Adam kernel
        optimizer = torch.optim.Adam(model.parameters(), lr=config.learning_rate)
    return model, optimizer


# ---------------------------------------------------------------- evaluation

@torch.no_grad()
def evaluate(model, x, batch_size=2000):
    """Test -ELBO, reconstruction -log p(x|z) and KL, nats per image, dropout off, fixed z draws."""
    was_training = model.training
    model.eval()
    generator = torch.Generator(device=x.device).manual_seed(EVAL_SEED)
    sums = torch.zeros(3, device=x.device, dtype=torch.float64)
    for start in range(0, len(x), batch_size):
        batch = x[start: start + batch_size]
        eps = torch.randn((len(batch), model.dim_z), generator=generator, device=x.device)
        elbo, reconstruction, kl = model(batch, eps=eps)
        sums += torch.stack([-elbo.sum(), -reconstruction.sum(), kl.sum()]).double()
    model.train(was_training)
    return (sums / len(x)).tolist()


@torch.no_grad()
def log_likelihoods(model, x, k, batch_size=100, progress=True):
    """Importance-weighted estimate of log p(x) for each image of `x`, from fixed draws: a tensor (n,)."""
    was_training = model.training
    model.eval()
    torch.manual_seed(IW_SEED)  # the estimator draws from the global generator; fix it for repeatability
    from tqdm import tqdm

    per_image = []
    for start in tqdm(range(0, len(x), batch_size), desc=f"log-likelihood, k={k}", disable=None if progress else True,
                      leave=False):
        per_image.append(importance_weighted_log_likelihood(model, x[start: start + batch_size], k))
    model.train(was_training)
    return torch.cat(per_image)


def log_likelihood_estimate(model, x, k, batch_size=100, progress=True):
    """Importance-weighted NLL over `x`: (mean, standard error) in nats per image."""
    nll = -log_likelihoods(model, x, k, batch_size, progress).double()
    stderr = nll.std().item() / math.sqrt(len(nll)) if len(nll) > 1 else float("nan")
    return nll.mean().item(), stderr


# ---------------------------------------------------------------- pictures of the model

@torch.no_grad()
def reconstruct(model, x):
    """Decoded posterior means: what the reconstruction grids show."""
    was_training = model.training
    model.eval()
    mu, _ = model.encode(x)
    images = model.mean_image(model.decode(mu))
    model.train(was_training)
    return images


@torch.no_grad()
def decode_images(model, z):
    was_training = model.training
    model.eval()
    images = model.mean_image(model.decode(z))
    model.train(was_training)
    return images


def epoch_name(prefix, epoch, num_epochs):
    return f"{prefix}_epoch_{epoch:0{max(2, len(str(num_epochs)))}d}.jpg"


def write_epoch_images(model, config, fixed, tensors, out, epoch):
    cpu = lambda t: t.detach().float().cpu().numpy()  # noqa: E731
    nx, ny = config.PRR_n_img_x, config.PRR_n_img_y
    plots.save_grid(cpu(reconstruct(model, fixed["prr_input"])), nx, ny,
                    out / epoch_name("PRR", epoch, config.num_epochs))
    plots.save_grid(cpu(decode_images(model, fixed["prior_z"])), nx, ny,
                    out / epoch_name("samples", epoch, config.num_epochs))
    if config.dim_z == 2:
        z = torch.from_numpy(plots.manifold_grid_z(config.PMLR_n_img_x, config.PMLR_n_img_y, config.PMLR_z_range))
        plots.save_grid(cpu(decode_images(model, z.to(fixed["prior_z"].device))), config.PMLR_n_img_x,
                        config.PMLR_n_img_y, out / epoch_name("PMLR", epoch, config.num_epochs))
        n = min(config.PMLR_n_samples, len(tensors.test))
        was_training = model.training
        model.eval()
        with torch.no_grad():
            mu, _ = model.encode(tensors.test[:n])
        model.train(was_training)
        plots.save_latent_map(cpu(mu), tensors.test_labels[:n], tensors.classes, config.PMLR_z_range,
                              out / epoch_name("PMLR_map", epoch, config.num_epochs))


def write_metrics(history, out, config):
    table = io.StringIO()
    writer = csv.DictWriter(table, fieldnames=METRIC_FIELDS, lineterminator="\n")
    writer.writeheader()
    for row in history:
        writer.writerow({key: (f"{value:.4f}" if isinstance(value, float) else value) for key, value in row.items()})
    files.write_text(out / "metrics.csv", table.getvalue())
    plots.save_loss_curves(history, out / "loss_curves.png",
                           title=f"{config.dataset}, dim_z={config.dim_z}, likelihood={config.likelihood}, "
                                 f"binarize={config.binarize}")


# ---------------------------------------------------------------- signals

class StopSignal:
    """Remembers SIGINT or SIGTERM so the loop can stop between two steps."""

    def __init__(self):
        self.received = None

    def __enter__(self):
        self.previous = {sig: signal.signal(sig, self._handle) for sig in (signal.SIGINT, signal.SIGTERM)}
        return self

    def _handle(self, signum, frame):
        if self.received is not None:  # a second Ctrl-C: stop at once
            raise KeyboardInterrupt
        self.received = signum

    def __exit__(self, *exc):
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)


# ---------------------------------------------------------------- the run

def train(config, resume=False, overwrite=False, log=print):
    """Train as `config` says, writing everything into config.output; return the last metrics row."""
    from tqdm import tqdm

    device = resolve_device(config.device)
    # Gradients and Adam's second moments drift into denormal floats, which x86 CPUs handle
    # 10-100x slower: epochs took 4 s or 20 s by chance. Flushing them to zero costs nothing.
    torch.set_flush_denormal(True)
    out = prepare_output(config.output, resume, overwrite)
    saved = checkpoint.load(out) if resume else None
    tensors = load_tensors(config, device, log)
    torch.manual_seed(config.seed)
    model, optimizer = make_model(config, device)
    step_function = FusedTrainStep(model, optimizer)
    data_generator = torch.Generator(device=device).manual_seed(config.seed)

    # What every epoch's pictures are made from: fixed inputs, their noisy copies, prior draws.
    images_generator = torch.Generator().manual_seed(config.seed)
    n_prr = config.PRR_n_img_x * config.PRR_n_img_y
    prr_clean = tensors.test[:n_prr]
    fixed = {"prr_input": prr_clean,
             "prior_z": torch.randn((n_prr, config.dim_z), generator=images_generator).to(device)}
    if config.add_noise:
        fixed["prr_input"] = add_noise(prr_clean.cpu(), config.noise_factor, images_generator).to(device)

    n_train, batch_size = len(tensors.train), config.batch_size
    n_steps = math.ceil(n_train / batch_size)
    batch_sizes = torch.full((n_steps,), batch_size, device=device, dtype=torch.float64)
    batch_sizes[-1] = n_train - batch_size * (n_steps - 1)
    epoch, step, history, seconds_before = 0, 0, [], 0.0
    if saved is not None:
        _, state, saved_tensors = saved
        model.load_state_dict(checkpoint.build_model(config, saved_tensors, out).state_dict())
        checkpoint.load_optimizer_state(optimizer, saved_tensors)
        epoch, step, history = state["epoch"], state["step"], state["history"]
        seconds_before = state["seconds_in_epoch"]
        data_generator.set_state(saved_tensors["rng.data_epoch_start"])
        torch.set_rng_state(saved_tensors["rng.torch"])
        if device.type == "cuda" and "rng.cuda" in saved_tensors:
            torch.cuda.set_rng_state(saved_tensors["rng.cuda"])
        step_terms = saved_tensors["progress.step_terms"].to(device)
        log(f"resuming {out} at epoch {epoch + 1}, step {step}")
    else:
        plots.save_grid(prr_clean.cpu().numpy(), config.PRR_n_img_x, config.PRR_n_img_y, out / "input.jpg")
        if config.add_noise:
            plots.save_grid(fixed["prr_input"].cpu().numpy(), config.PRR_n_img_x, config.PRR_n_img_y,
                            out / "input_noise.jpg")
    files.write_json(out / "config.json", {**config.to_dict(), "data_source": tensors.source, "device": str(device),
                                     "torch": torch.__version__})
    board = _tensorboard(config)

    row = history[-1] if history else None

    def save_checkpoint(epoch_start_state, seconds):
        extra = {"rng.data_epoch_start": epoch_start_state, "rng.torch": torch.get_rng_state(),
                 "progress.step_terms": step_terms}
        if device.type == "cuda":
            extra["rng.cuda"] = torch.cuda.get_rng_state()
        state = {"config": config.to_dict(), "epoch": epoch, "step": step, "history": history,
                 "seconds_in_epoch": seconds, "data_source": tensors.source}
        checkpoint.save(out, model, optimizer, state, extra)

    with StopSignal() as stop:
        while epoch < config.num_epochs:
            epoch_start_state = data_generator.get_state()
            order = torch.randperm(n_train, generator=data_generator, device=device)
            epoch_data = tensors.train
            if config.binarize == "dynamic":
                epoch_data = torch.bernoulli(tensors.train, generator=data_generator)
            if step == 0:
                step_terms = torch.zeros((n_steps, 3), device=device)
            bar = tqdm(total=n_steps, initial=step, desc=f"epoch {epoch + 1}/{config.num_epochs}",
                       disable=None, leave=False, unit="step")
            started = time.perf_counter()
            while step < n_steps:
                target = epoch_data.index_select(0, order[step * batch_size: (step + 1) * batch_size])
                x = add_noise(target, config.noise_factor) if config.add_noise else target
                step_terms[step] = step_function(x, target)  # batch means of -ELBO, -log p(x|z), KL
                step += 1
                bar.update(1)
                if step % CHECK_EVERY == 0 or step == n_steps:
                    losses = step_terms[:step, 0]
                    if not torch.isfinite(losses.sum()):
                        bad = int(torch.nonzero(~torch.isfinite(losses))[0])
                        bar.close()
                        raise TrainingError(
                            f"the loss became {losses[bad].item()} at epoch {epoch + 1}, step {bad + 1}; "
                            f"the learning rate ({config.learning_rate}) is likely too high, try a smaller "
                            f"--learning_rate; the last good checkpoint"
                            + (f" (epoch {epoch}) is kept in {out}" if epoch > 0 else " does not exist yet"))
                    bar.set_postfix_str(f"-elbo {losses[-CHECK_EVERY:].mean().item():.2f}")
                if stop.received is not None and step < n_steps:
                    bar.close()
                    save_checkpoint(epoch_start_state, seconds_before + time.perf_counter() - started)
                    log(f"interrupted at epoch {epoch + 1}, step {step}; checkpoint written; resume with:\n"
                        f"  mnist-vae --resume {out}")
                    raise Interrupted(128 + stop.received)
            bar.close()
            seconds = seconds_before + time.perf_counter() - started

            # Batch means weighted by batch sizes (the last batch may be smaller): means over images.
            train_terms = (step_terms.double() * batch_sizes[:, None]).sum(0).div_(n_train).tolist()
            test_terms = evaluate(model, tensors.test)
            row = {"epoch": epoch + 1,
                   **dict(zip(["train_neg_elbo", "train_recon", "train_kl"], train_terms)),
                   **dict(zip(["test_neg_elbo", "test_recon", "test_kl"], test_terms)),
                   "seconds": seconds, "likelihood": config.likelihood, "binarize": config.binarize}
            history.append(row)
            log(f"epoch {epoch + 1:>{len(str(config.num_epochs))}}/{config.num_epochs}  "
                f"train -elbo {train_terms[0]:8.3f} (recon {train_terms[1]:8.3f}, kl {train_terms[2]:6.3f})  "
                f"test -elbo {test_terms[0]:8.3f} (recon {test_terms[1]:8.3f}, kl {test_terms[2]:6.3f})  "
                f"{seconds:5.1f} s")
            write_epoch_images(model, config, fixed, tensors, out, epoch + 1)
            write_metrics(history, out, config)
            if board is not None:
                _log_tensorboard(board, row, out, config, epoch + 1)
            epoch, step, seconds_before = epoch + 1, 0, 0.0
            save_checkpoint(data_generator.get_state(), 0.0)
            if stop.received is not None and epoch < config.num_epochs:
                log(f"interrupted after epoch {epoch}; checkpoint written; resume with:\n"
                    f"  mnist-vae --resume {out}")
                raise Interrupted(128 + stop.received)

    if board is not None:
        board.close()
    if config.eval_k > 0:
        nll, stderr = log_likelihood_estimate(model, tensors.test, config.eval_k)
        result = {"test_neg_elbo": row["test_neg_elbo"] if row else None, "iw_nll": nll, "iw_nll_stderr": stderr,
                  "k": config.eval_k, "n_test": len(tensors.test), "likelihood": config.likelihood,
                  "binarize": config.binarize}
        files.write_json(out / "evaluation.json", result)
        log(f"test log-likelihood (importance weighted, k={config.eval_k}): "
            f"NLL {nll:.3f} ± {stderr:.3f} nats per image")
        row = {**row, "iw_nll": nll, "iw_nll_stderr": stderr} if row else row
    return row


def _tensorboard(config):
    if not config.tensorboard:
        return None
    from torch.utils.tensorboard import SummaryWriter  # availability checked by the CLI

    return SummaryWriter(config.tensorboard)


def _log_tensorboard(board, row, out, config, epoch):
    for key in METRIC_FIELDS[1:8]:
        board.add_scalar(key.replace("_", "/", 1), row[key], epoch)
    from PIL import Image

    for prefix in ("PRR", "samples", "PMLR"):
        path = out / epoch_name(prefix, epoch, config.num_epochs)
        if path.exists():
            board.add_image(prefix, np.asarray(Image.open(path)), epoch, dataformats="HW")
    board.flush()



class _CallableModule(types.ModuleType):
    """This module, callable: `mnist_vae.train(output=..., **settings)` is the Python API's api.train."""

    def __call__(self, *args, **kwargs):
        from .api import train as api_train

        return api_train(*args, **kwargs)


# `mnist_vae.train` is both this module and the API's training function, as the issue spells it.
# Importing a submodule sets the package's attribute to the module, so the module itself is made
# callable rather than letting one name hide the other.
sys.modules[__name__].__class__ = _CallableModule
