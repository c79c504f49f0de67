"""The training loop: data as tensors in memory, fused Adam steps, evaluation, output files, checkpoints.

`train(config)` reads straight down: set up the output folder, the data and the model
(or restore them from a checkpoint), then for each epoch train, evaluate on the whole
test set, write the images, metrics and a checkpoint.
"""

import dataclasses
import math
import signal
import tempfile
import time
from pathlib import Path

import torch
from tqdm import tqdm

from . import checkpoint, files, limits, plots, runs
from .config import fixed_length
from .data import add_noise, load_tensors
from .errors import ArgumentError, Interrupted, UserError
from .evaluation import IW_SEED, classifier_accuracy, elbo_name, evaluate, log_likelihood_estimate, metric_fields
from .fast import products
from .fast.fused import FusedTrainStep, unsupported
from .fast.threads import ThreadGovernor, products_thread_invariant
from .machine import resolve_device
from .model import build
from .outputs import log_tensorboard, tensorboard, write_epoch_images, write_metrics
from .step import kl_weight, learning_rate, make_step

CHECK_EVERY = 50  # steps between checks for a non-finite loss (each check synchronises)
PLAN_SECONDS = 10  # at most this long timing the training step to plan a --time_budget run


class TrainingError(UserError):
    pass


# ---------------------------------------------------------------- set-up


def prepare_output(folder, resume=False, overwrite=False):
    """Create the output folder if needed; refuse to write over another run unless asked to (ArgumentError:
    the folder is the caller's argument)."""
    out = Path(folder)
    try:
        is_file = out.exists() and not out.is_dir()
        holds_run = (out / checkpoint.FILENAME).exists()  # a folder with no checkpoint is not a run
    except OSError as e:  # a name too long, a part of it a file
        raise files.WriteError(files.error_line(out, e)) from None
    if is_file:
        raise ArgumentError(f"--output {out} is a file, not a folder; give a folder name")
    if not (resume or overwrite) and holds_run:
        raise ArgumentError(f"--output {out} already holds a run; continue it with --resume {out}, "
                        f"replace its files with --overwrite, or choose another --output")
    try:
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=out):
            pass
    except OSError as e:
        raise ArgumentError(f"--output {out}: cannot write there ({e.strerror or e}); "
                        f"choose a folder you can write to") from None
    return out


def make_model(config, device):
    model = build(config).to(device)
    try:
        optimizer = torch.optim.Adam(model.parameters(), lr=config.learning_rate, eps=config.adam_eps, fused=True)
    except RuntimeError:  # a device without a fused Adam kernel
        optimizer = torch.optim.Adam(model.parameters(), lr=config.learning_rate, eps=config.adam_eps)
    return model, optimizer


def plan_epochs(config, tensors, n_steps, device, log=print):
    """The epochs that fit config.time_budget minutes of training, planned before the first epoch so that
    the learning-rate schedule knows the run's length.

    It times the run's own training step on a model and optimizer made for the purpose and thrown
    away, with the random generators put back after, so that the run trains as it would without
    the timing. The timing is at most PLAN_SECONDS (a hundredth of the budget when that is less),
    and is not counted as training.
    """
    budget = 60 * config.time_budget
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        model, optimizer = make_model(config, device)
        step_function = make_step(model, optimizer, config)
        x = tensors.train[: config.batch_size]
        labels = tensors.train_y[: config.batch_size] if model.conditional else None
        for _ in range(3):  # the first steps allocate and warm the caches
            step_function(x, x, labels)
        steps, started = 0, time.perf_counter()
        while steps < 10 or time.perf_counter() - started < min(PLAN_SECONDS, budget / 100):
            step_function(x, x, labels)
            steps += 1
        if device.type == "cuda":
            torch.cuda.synchronize()
        step_seconds = (time.perf_counter() - started) / steps
    epochs = max(1, int(budget / (step_seconds * n_steps)))
    log(f"time budget {config.time_budget:g} min: {steps} training steps took {step_seconds * steps:.2f} s, so an "
        f"epoch of {n_steps} steps about {step_seconds * n_steps:.2f} s; planned {epochs} epochs (training stops "
        f"earlier if the budget is spent)")
    return epochs


# ---------------------------------------------------------------- evaluation


# ---------------------------------------------------------------- pictures of the model


def nonfinite_cause(config, terms):
    """What most likely made a step's loss non-finite, named by the settings that were set, from the step's
    batch means `terms` [-ELBO, reconstruction, KL, loss]."""
    if math.isfinite(terms[0]):  # the model's -ELBO was fine: the loss's own weighting overflowed
        named = ([f"--beta {config.beta:g}"] if config.beta != 1 else []) + (
            [f"--objective iwae with --k_train {config.k_train}"] if config.objective == "iwae" else [])
        if named:
            advice = "choose a smaller --beta" if config.beta > 1 else "choose another --beta or --objective elbo"
            return f"{' and '.join(named)} made the training loss overflow while the -ELBO stayed finite; {advice}"
    # The model itself diverged: from the settings that push it hardest, as far as they were raised.
    defaults = type(config)()
    raised = [(what, name) for what, name in (("the learning rate", "learning_rate"), ("the KL's weight", "beta"))
              if getattr(config, name) > getattr(defaults, name)]
    if len(raised) > 1:
        return (" or ".join(f"{what} (--{name} {getattr(config, name):g})" for what, name in raised)
                + " is likely too high, try smaller values")
    if raised and raised[0][1] == "beta":
        return f"the KL's weight (--beta {config.beta:g}) is likely too high, try a smaller --beta"
    return (f"the learning rate (--learning_rate {config.learning_rate:g}) is likely too high, try a smaller "
            f"--learning_rate")


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

@runs.locked_run
def train(config, resume=False, overwrite=False, log=print):
    """Train as `config` says, writing everything into config.output; return the last metrics row.

    The run holds the lock of config.output throughout (runs.locked_run)."""
    device = resolve_device(config.device)
    limits.check_training(config, device)  # memory and image sizes, before anything is written
    try:
        products.check_precision(config.precision, device)
    except ValueError as e:
        raise UserError(str(e)) from None
    # Gradients and Adam's second moments drift into denormal floats, which x86 CPUs handle
    # 10-100x slower: epochs took 4 s or 20 s by chance. Flushing them to zero costs nothing.
    torch.set_flush_denormal(True)
    config.check_combination()
    if not resume and not config.time_budget:  # (a resumed run's were accepted when it started)
        config.check_warmups()
    out = prepare_output(config.output, resume, overwrite)
    saved = checkpoint.load(out) if resume else None
    if saved is not None and fixed_length(saved[0]):  # fixed when the run started (a schedule, a plan): keep it
        config = dataclasses.replace(config, num_epochs=saved[0].num_epochs)
    if not config.epoch_digits:  # fixed at the run's start; an older run's from its saved num_epochs
        first = saved[0] if saved else config
        config = dataclasses.replace(config, epoch_digits=runs.epoch_digits(first.num_epochs))
    tensors = load_tensors(config, device, log)
    torch.manual_seed(config.seed)
    model, optimizer = make_model(config, device)
    step_function = make_step(model, optimizer, config)
    step_name = "fused" if isinstance(step_function, FusedTrainStep) else "autograd"
    if step_name == "autograd" and config.step == "auto":
        log(f"training step: autograd (the fused step does not fit: {unsupported(model, config)})")
    data_generator = torch.Generator(device=device).manual_seed(config.seed)

    # What every epoch's pictures are made from: fixed inputs, their noisy copies, prior draws.
    images_generator = torch.Generator().manual_seed(config.seed)
    n_prr = config.PRR_n_img_x * config.PRR_n_img_y
    prr_clean = tensors.test[:n_prr]
    fixed = {"prr_input": prr_clean, "prr_clean": prr_clean, "prr_labels": tensors.test_y[:n_prr],
             "prior_z": torch.randn((n_prr, config.dim_z), generator=images_generator).to(device)}
    if config.add_noise:
        fixed["prr_input"] = add_noise(prr_clean.cpu(), config.noise_factor, images_generator).to(device)

    n_train, batch_size = len(tensors.train), config.batch_size
    n_steps = math.ceil(n_train / batch_size)
    batch_sizes = torch.full((n_steps,), batch_size, device=device, dtype=torch.float64)
    batch_sizes[-1] = n_train - batch_size * (n_steps - 1)
    if saved is None and config.time_budget:
        planned = plan_epochs(config, tensors, n_steps, device, log)
        config = dataclasses.replace(config, num_epochs=planned, epoch_digits=runs.epoch_digits(planned))
        config.check_warmups(planned=True)
    scheduled = config.lr_schedule != "constant" or config.warmup_epochs > 0
    epoch, step, history, seconds_before = 0, 0, [], 0.0
    if saved is not None:
        _, state, saved_tensors = saved
        runs.check_same_data(state, tensors.fingerprint, out, tensors.source, log)
        checkpoint.check_progress(state, saved_tensors, n_steps, out / checkpoint.FILENAME, device)
        model.load_state_dict(checkpoint.build_model(config, saved_tensors, out, state).state_dict())
        checkpoint.load_optimizer_state(optimizer, saved_tensors, out / checkpoint.FILENAME)
        epoch, step, history = state["epoch"], state["step"], state["history"]
        seconds_before = state["seconds_in_epoch"]
        data_generator.set_state(saved_tensors["rng.data_epoch_start"])
        torch.set_rng_state(saved_tensors["rng.torch"])
        if device.type == "cuda" and "rng.cuda" in saved_tensors:
            torch.cuda.set_rng_state(saved_tensors["rng.cuda"])
        step_terms = saved_tensors["progress.step_terms"].to(device)
        if step_terms.shape[1] == 3:  # a checkpoint from before the loss had its own column: it was -ELBO
            step_terms = torch.cat([step_terms, step_terms[:, :1]], dim=1)
        log(f"resuming {out} at epoch {epoch + 1}, step {step}")
    else:
        runs.clear_outputs(out, log)  # an earlier run's (--overwrite), or a failed start's: never a mix
        plots.save_grid(prr_clean.cpu().numpy(), config.PRR_n_img_x, config.PRR_n_img_y, out / "input.jpg")
        if config.add_noise:
            plots.save_grid(fixed["prr_input"].cpu().numpy(), config.PRR_n_img_x, config.PRR_n_img_y,
                            out / "input_noise.jpg")
    files.write_json(out / "config.json", {**config.to_dict(), "data_source": tensors.source, "device": str(device),
                                     "torch": torch.__version__, "model": model.name, "training_step": step_name,
                                     # which routine did the step's products: their rounding differs
                                     "products": step_function.products.name if step_name == "fused" else "torch"})
    board = tensorboard(config)

    row = history[-1] if history else None

    def save_checkpoint(epoch_start_state, seconds):
        extra = {"rng.data_epoch_start": epoch_start_state, "rng.torch": torch.get_rng_state(),
                 "progress.step_terms": step_terms}
        if device.type == "cuda":
            extra["rng.cuda"] = torch.cuda.get_rng_state()
        state = {"config": config.to_dict(), "model": model.name, "epoch": epoch, "step": step, "history": history,
                 "seconds_in_epoch": seconds, "data_source": tensors.source, "data_fingerprint": tensors.fingerprint}
        checkpoint.save(out, model, optimizer, state, extra)

    # The thread count may follow the machine's load only where no product of this run rounds otherwise.
    # (The autograd step's products are torch's, on k draws of z per image with --objective iwae.)
    step_products = getattr(step_function, "products", None) or products.Products(device, name="torch.mm")
    rows = {n * k for n in (batch_size, n_train - batch_size * (n_steps - 1)) for k in (1, config.k_train)}
    adapt = (config.threads == 0 and device.type == "cpu" and config.precision == "fp32"
             and products_thread_invariant(model, rows, step_products))
    with StopSignal() as stop, ThreadGovernor(config.threads, adapt=adapt) as governor:
        while epoch < config.num_epochs and not runs.budget_spent(config, history):
            epoch_start_state = data_generator.get_state()
            order = torch.randperm(n_train, generator=data_generator, device=device)
            epoch_data = tensors.train
            if config.binarize == "dynamic":
                epoch_data = torch.bernoulli(tensors.train, generator=data_generator)
            if step == 0:
                step_terms = torch.zeros((n_steps, 4), device=device)
            bar = tqdm(total=n_steps, initial=step, desc=f"epoch {epoch + 1}/{config.num_epochs}",
                       disable=None, leave=False, unit="step")
            started = time.perf_counter()
            while step < n_steps:
                batch = order[step * batch_size: (step + 1) * batch_size]
                target = epoch_data.index_select(0, batch)
                labels = tensors.train_y.index_select(0, batch) if model.conditional else None
                x = add_noise(target, config.noise_factor) if config.add_noise else target
                if config.kl_warmup:
                    step_function.loss_options["kl_weight"] = kl_weight(config, epoch, step, n_steps)
                if scheduled:  # a pure function of the position in the run, so a resumed run gets the same
                    for group in optimizer.param_groups:
                        group["lr"] = learning_rate(config, epoch, step, n_steps)
                step_terms[step] = step_function(x, target, labels)  # batch means of -ELBO, -log p(x|z), KL, loss
                governor()
                step += 1
                bar.update(1)
                if step % CHECK_EVERY == 0 or step == n_steps:
                    losses = step_terms[:step, 3]
                    if not torch.isfinite(losses.sum()):
                        bad = int(torch.nonzero(~torch.isfinite(losses))[0])
                        bar.close()
                        raise TrainingError(
                            f"the loss became {losses[bad].item()} at epoch {epoch + 1}, step {bad + 1}; "
                            f"{nonfinite_cause(config, step_terms[bad].tolist())}; the last good checkpoint"
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
            test_labels = tensors.test_y if model.conditional else None
            test_terms = evaluate(model, tensors.test, labels=test_labels)
            fields, elbo = metric_fields(config), elbo_name(config)
            row = {"epoch": epoch + 1,
                   **dict(zip([f"train_{elbo}", "train_recon", "train_kl", "train_loss"], train_terms)),
                   **dict(zip([f"test_{elbo}", "test_recon", "test_kl"], test_terms)),
                   "seconds": seconds, "likelihood": config.likelihood, "binarize": config.binarize}
            extra = ""
            if config.objective == "iwae":  # the bound trained on, at its K, with fixed draws
                bound, _ = log_likelihood_estimate(model, tensors.test, config.k_train, progress=False,
                                                   labels=test_labels,
                                                   generator=torch.Generator(device=device).manual_seed(IW_SEED))
                row["test_neg_iw_bound" + ("_given_y" if model.conditional else "")] = bound
                extra += f"  test -iw bound (k={config.k_train}) {bound:8.3f}"
            if model.conditional:
                row["test_accuracy"] = classifier_accuracy(model, tensors.test, tensors.test_y)
                extra += f"  test accuracy {row['test_accuracy']:.4f}"
            row = {key: value for key, value in row.items() if key in fields}
            history.append(row)
            name = "-elbo(x|y)" if model.conditional else "-elbo"
            loss = f", loss {train_terms[3]:8.3f}" if "train_loss" in fields else ""
            log(f"epoch {epoch + 1:>{len(str(config.num_epochs))}}/{config.num_epochs}  "
                f"train {name} {train_terms[0]:8.3f} (recon {train_terms[1]:8.3f}, kl {train_terms[2]:6.3f}{loss})  "
                f"test {name} {test_terms[0]:8.3f} (recon {test_terms[1]:8.3f}, kl {test_terms[2]:6.3f}){extra}  "
                f"{seconds:5.1f} s")
            write_epoch_images(model, config, fixed, tensors, out, epoch + 1)
            write_metrics(history, out, config)
            if board is not None:
                log_tensorboard(board, row, out, config, epoch + 1)
            epoch, step, seconds_before = epoch + 1, 0, 0.0
            save_checkpoint(data_generator.get_state(), 0.0)
            if stop.received is not None and epoch < config.num_epochs:
                log(f"interrupted after epoch {epoch}; checkpoint written; resume with:\n"
                    f"  mnist-vae --resume {out}")
                raise Interrupted(128 + stop.received)

    if board is not None:
        board.close()
    if epoch < config.num_epochs:
        log(f"time budget of {config.time_budget:g} minutes spent after {epoch} of the {config.num_epochs} "
            f"planned epochs; training stops here")
    if config.eval_k > 0:
        # A signal in the last epoch's end phase, or during the estimate, stops here; the checkpoint holds
        # the finished training, and --resume runs the estimate that is still missing.
        estimate = None
        if stop.received is None:
            with StopSignal() as stop, ThreadGovernor(config.threads, adapt=adapt) as governor:
                started = time.perf_counter()
                estimate = log_likelihood_estimate(model, tensors.test, config.eval_k,
                                                   labels=tensors.test_y if model.conditional else None, stop=stop,
                                                   governor=governor)
                estimate_seconds = time.perf_counter() - started
        if estimate is None:
            log(f"interrupted before the log-likelihood estimate was done; the trained model is saved; "
                f"finish the estimate with:\n  mnist-vae --resume {out}")
            raise Interrupted(128 + stop.received)
        nll, stderr = estimate
        stderr = stderr if math.isfinite(stderr) else None  # one test image: no standard error
        given = "_given_y" if model.conditional else ""
        elbo = f"test_{elbo_name(config)}"
        result = {elbo: row[elbo] if row else None, f"iw_nll{given}": nll, f"iw_nll{given}_stderr": stderr,
                  "k": config.eval_k, "n_test": len(tensors.test), "likelihood": config.likelihood,
                  "binarize": config.binarize, "seconds": estimate_seconds}
        files.write_json(out / "evaluation.json", result)
        log(f"test log-likelihood (importance weighted, k={config.eval_k}): NLL {nll:.3f}"
            + (f" ± {stderr:.3f}" if stderr is not None else " (one test image: no standard error)")
            + " nats per image" + (" (-log p(x|y), given the label)" if given else ""))
        row = {**row, f"iw_nll{given}": nll, f"iw_nll{given}_stderr": stderr} if row else row
    return {**row, "step": step_name} if row else row
