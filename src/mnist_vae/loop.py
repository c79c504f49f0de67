"""The training loop: data as tensors in memory, fused Adam steps, evaluation, observers that write the outputs.

`train(config)` is the algorithm: prepare the run (the output folder, the data, the model and the
final config, or all of them restored from a checkpoint), then for each epoch run the steps, evaluate,
and tell the observers (outputs.py: the log line, the pictures, metrics.csv, TensorBoard, the checkpoint).
"""

import contextlib
import dataclasses
import functools
import json
import math
import tempfile
import time
from pathlib import Path
from typing import Any, Optional

import torch
from tqdm import tqdm

from . import checkpoint, files, limits, runs
from .config import Config, fixed_length
from .data import Tensors, add_noise, load_tensors
from .errors import ArgumentError, Interrupted, UserError, catch_signals, restore_signals
from .evaluation import TERMS, elbo_name, epoch_row, log_likelihood_estimate, term
from .fast import memory, products
from .fast.fused import FusedTrainStep, unsupported
from .fast.threads import ThreadGovernor, fastest_step_threads, invariant_counts, product_layers, thread_counts
from .machine import resolve_device
from .model import build
from .outputs import default_observers, write_input_images
from .step import kl_weight, learning_rate, make_step

CHECK_EVERY = 50  # steps between checks for a non-finite loss (each check synchronises)
GATHER_ROWS = 1024  # training images gathered at once for the coming steps: their batches stay in the cache
PLAN_SECONDS = 10  # at most this long timing the training step to plan a --time_budget run


class TrainingError(UserError):
    pass


# ---------------------------------------------------------------- the algorithm

@runs.locked_run
def train(config, resume=False, overwrite=False, log=print, observers=()):
    """Train as `config` says, writing everything into config.output; return the last metrics row.

    `observers` (outputs.Observer) are told after the run's own (outputs.default_observers) at the end
    of every epoch, where a signal stops the run, and when training ends. The run holds the lock of
    config.output throughout (runs.locked_run)."""
    run = prepare(config, resume, overwrite, log)
    observers = [*default_observers(run.config), *observers]
    probe = step_threads_probe(run, run.thread_counts) if run.step_threads is not None else None
    with StopSignal() as stop, ThreadGovernor(run.config.threads, counts=run.thread_counts, most=run.step_threads,
                                              probe=probe) as governor:
        while epochs_left(run):
            if not run_steps(run, stop, governor):  # a signal came between two steps
                stop_here(run, stop, observers, f"at epoch {run.progress.epoch + 1}, step {run.progress.step}")
            row = evaluate_epoch(run)
            run = replan_epochs(run)
            if probe is not None and governor.most != run.step_threads:  # timed again (fast/threads.py)
                run.log(f"threads: {governor.most} of {governor.start}, on which this model's products ran fastest "
                        f"when timed again on a quiet machine")
                run = dataclasses.replace(run, step_threads=governor.most)
            for observer in observers:
                observer.on_epoch_end(run, row)
            if stop.received is not None and run.progress.epoch < run.config.num_epochs:
                stop_here(run, stop, observers, f"after epoch {run.progress.epoch}")
    for observer in observers:
        observer.on_train_end(run)
    return finish(run, stop)


# ---------------------------------------------------------------- the run's state

@dataclasses.dataclass
class Progress:
    """Where the run is: what a checkpoint saves besides the weights, Adam and the global random states."""
    epoch: int = 0  # epochs done
    step: int = 0  # steps done in the epoch under way
    history: list = dataclasses.field(default_factory=list)  # the metrics rows of the epochs done
    seconds: float = 0.0  # training seconds spent in the epoch under way, across resumes
    step_terms: Optional[torch.Tensor] = None  # (steps, len(TERMS)): the epoch's step results so far
    epoch_start_state: Optional[torch.Tensor] = None  # the data generator's state at the epoch's start


@dataclasses.dataclass(frozen=True)
class Run:
    """Everything the loop works with, made by prepare before the first step; only `progress` changes."""
    config: Config  # final: the epochs and the digits of the image names fixed
    out: Path
    device: torch.device
    log: Any
    tensors: Tensors
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    step_function: Any  # step.make_step's: fused or autograd
    step_name: str
    data_generator: torch.Generator  # the order of the training images, and dynamic binarization
    fixed: dict  # what every epoch's pictures are made from
    n_steps: int
    batch_sizes: torch.Tensor  # (n_steps,) float64: the last batch may be smaller
    thread_counts: list  # the counts the thread count may move among with the machine's load: one, it stays
    step_threads: Optional[int]  # where it may move, the count the step's products ran fastest on: training's most
    progress: Progress


# ---------------------------------------------------------------- set-up

def prepare(config, resume, overwrite, log):
    """Check the settings, make the output folder, the data, the model and its step, fix the config,
    and restore the run's checkpoint (`resume`) or start the folder afresh; write config.json."""
    device = resolve_device(config.device)
    limits.check_training(config, device)  # memory and image sizes, before anything is written
    try:
        products.check_precision(config.precision, device)
    except ValueError as e:
        raise UserError(str(e)) from None
    # Gradients and Adam's second moments drift into denormal floats, which x86 CPUs handle
    # 10-100x slower: epochs took 4 s or 20 s by chance. Flushing them to zero costs nothing.
    torch.set_flush_denormal(True)
    memory.keep_freed_memory()  # the products' new outputs on pages already mapped (fast/memory.py)
    config.check_combination()
    if not resume and not config.time_budget:  # (a resumed run's were accepted when it started)
        config.check_warmups()
    out = prepare_output(config.output, resume, overwrite)
    saved = checkpoint.load(out) if resume else None
    tensors = load_tensors(config, device, log)
    torch.manual_seed(config.seed)
    model, optimizer = make_model(config, device)
    step_function = make_step(model, optimizer, config)
    step_name = "fused" if isinstance(step_function, FusedTrainStep) else "autograd"
    if step_name == "autograd" and config.step == "auto":
        log(f"training step: autograd (the fused step does not fit: {unsupported(model, config)})")
    data_generator = torch.Generator(device=device).manual_seed(config.seed)
    fixed = picture_inputs(config, tensors, device)
    n_train, batch_size = len(tensors.train), config.batch_size
    n_steps = math.ceil(n_train / batch_size)
    batch_sizes = torch.full((n_steps,), batch_size, device=device, dtype=torch.float64)
    batch_sizes[-1] = n_train - batch_size * (n_steps - 1)
    config = final_config(config, saved, tensors, n_steps, device, log)
    run = Run(config, out, device, log, tensors, model, optimizer, step_function, step_name, data_generator, fixed,
              n_steps, batch_sizes, thread_counts=[torch.get_num_threads()], step_threads=None, progress=Progress())
    if saved is not None:
        restore(run, saved)
    else:
        runs.clear_outputs(out, log)  # an earlier run's (--overwrite), or a failed start's: never a mix
        write_input_images(config, fixed, out)
    files.write_json(out / "config.json", {**config.to_dict(), "data_source": tensors.source, "device": str(device),
                                     "torch": torch.__version__, "model": model.name, "training_step": step_name,
                                     # which routine did the step's products: their rounding differs
                                     "products": step_function.products.name if step_name == "fused" else "torch"})
    counts = run_thread_counts(run)
    return dataclasses.replace(run, thread_counts=counts,
                               step_threads=step_threads(run, counts) if len(counts) > 1 else None)


def picture_inputs(config, tensors, device):
    """What every epoch's pictures are made from: fixed test inputs, their noisy copies, prior draws."""
    images_generator = torch.Generator().manual_seed(config.seed)
    n_prr = config.PRR_n_img_x * config.PRR_n_img_y
    prr_clean = tensors.test[:n_prr]
    fixed = {"prr_input": prr_clean, "prr_clean": prr_clean, "prr_labels": tensors.test_y[:n_prr],
             "prior_z": torch.randn((n_prr, config.dim_z), generator=images_generator).to(device)}
    if config.add_noise:
        fixed["prr_input"] = add_noise(prr_clean.cpu(), config.noise_factor, images_generator).to(device)
    return fixed


def final_config(config, saved, tensors, n_steps, device, log):
    """The config the loop runs with, fixed before its first step: a resumed run keeps the epochs fixed at
    its start (a schedule, a plan), the epochs' digits in image names are fixed at a run's start (an
    older run's from its saved num_epochs), and a new --time_budget run plans its epochs (plan_epochs)."""
    if saved is not None and fixed_length(saved[0]):
        config = dataclasses.replace(config, num_epochs=saved[0].num_epochs)
    if not config.epoch_digits:
        first = saved[0] if saved else config
        config = dataclasses.replace(config, epoch_digits=runs.epoch_digits(first.num_epochs))
    if saved is None and config.time_budget:
        planned = plan_epochs(config, tensors, n_steps, device, log)
        config = dataclasses.replace(config, num_epochs=planned, epoch_digits=runs.epoch_digits(planned))
        config.check_warmups(planned=True)
    return config


def restore(run, saved):
    """Put the checkpoint `saved` (checkpoint.load's) into the run: weights, Adam, random states, progress."""
    _, state, saved_tensors = saved
    runs.check_same_data(state, run.tensors.fingerprint, run.out, run.tensors.source, run.log)
    checkpoint.check_progress(state, saved_tensors, run.n_steps, run.out / checkpoint.FILENAME, run.device)
    run.model.load_state_dict(checkpoint.build_model(run.config, saved_tensors, run.out, state).state_dict())
    checkpoint.load_optimizer_state(run.optimizer, saved_tensors, run.out / checkpoint.FILENAME)
    progress = run.progress
    progress.epoch, progress.step, progress.history = state["epoch"], state["step"], state["history"]
    progress.seconds = state["seconds_in_epoch"]
    run.data_generator.set_state(saved_tensors["rng.data_epoch_start"])
    torch.set_rng_state(saved_tensors["rng.torch"])
    if run.device.type == "cuda" and "rng.cuda" in saved_tensors:
        torch.cuda.set_rng_state(saved_tensors["rng.cuda"])
    step_terms = saved_tensors["progress.step_terms"].to(run.device)
    if step_terms.shape[1] == len(TERMS) - 1:  # from before the loss had its own column: it was the -ELBO
        step_terms = torch.cat([step_terms, step_terms[:, [TERMS.index("neg_elbo")]]], dim=1)
    progress.step_terms = step_terms
    run.log(f"resuming {run.out} at epoch {progress.epoch + 1}, step {progress.step}")


def threads_may_move(config, device):
    """Whether a run of `config` on `device` may move among thread counts (run_thread_counts): not with
    --threads N, off the CPU, or in bfloat16."""
    return config.threads == 0 and device.type == "cpu" and config.precision == "fp32"


def run_thread_counts(run):
    """The thread counts the run may move among as the machine's load changes: those on which every product
    of its step gives the same bits (threads.invariant_counts); all alone where it may not move
    (threads_may_move). (The autograd step's products are torch's, on k draws of z per image
    with --objective iwae.)"""
    config, n_train, batch_size = run.config, len(run.tensors.train), run.config.batch_size
    if not threads_may_move(config, run.device):
        return [torch.get_num_threads()]
    rows = {n * k for n in (batch_size, n_train - batch_size * (run.n_steps - 1)) for k in (1, config.z_per_image)}
    return invariant_counts(run.model, rows, products_of_step(run))


def products_of_step(run):
    """The routine of the run's step's products: the fused step's own, or torch.mm, the autograd step's."""
    return getattr(run.step_function, "products", None) or products.Products(run.device, name="torch.mm")


def step_threads_probe(run, counts):
    """A function that times the products of this run's step on each of `counts` and returns the count on which
    they ran fastest (threads.fastest_step_threads)."""
    layers = product_layers(run.model, run.config.z_per_image)
    return functools.partial(fastest_step_threads, layers, run.config.batch_size, products_of_step(run), counts)


def step_threads(run, counts):
    """The thread count among `counts` on which the products of this run's step ran fastest (threads.py)."""
    threads = step_threads_probe(run, counts)()
    most = torch.get_num_threads()
    if threads < most:
        left_out = [count for count in thread_counts(most) if count not in counts]
        run.log(f"threads: {threads} of {most}, on which this model's products ran fastest"
                + (f" of the counts where they give the same bits (on {', '.join(map(str, left_out))} they round "
                   f"differently)" if left_out else ""))
    return threads


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
    with called_as_it_is(torch.optim.Optimizer.add_param_group):  # which Adam's constructor calls
        try:
            optimizer = torch.optim.Adam(model.parameters(), lr=config.learning_rate, eps=config.adam_eps,
                                         fused=True)
        except RuntimeError:  # a device without a fused Adam kernel
            optimizer = torch.optim.Adam(model.parameters(), lr=config.learning_rate, eps=config.adam_eps)
    return model, optimizer


# The attribute in which torch._disable_dynamo's wrapper keeps the function it calls (torch/_compile.py).
DYNAMO_DISABLE = "__dynamo_disable"


@contextlib.contextmanager
def called_as_it_is(method):
    """Within this block, `method`, a function of torch wrapped by torch._disable_dynamo, calls the function it
    wraps directly. The wrapper keeps torch.compile from tracing into the function, and at its first call it
    imports torch._dynamo to build the function it then calls, which delays the start of every training run
    about as much again as importing torch (docs/speed.md, start-up), for a compiler no step here uses.
    Outside torch.compile the two calls compute the same. Where `method` is not such a wrapper (another
    torch) or has built its function already, nothing changes; afterwards the wrapper is as it was, so that
    a program that compiles later gets torch's behaviour."""
    function = getattr(method, "__wrapped__", None)
    set_here = function is not None and getattr(function, DYNAMO_DISABLE, None) is None
    if set_here:
        setattr(function, DYNAMO_DISABLE, function)
    try:
        yield
    finally:
        if set_here:
            delattr(function, DYNAMO_DISABLE)


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


def replan_epochs(run, recent=10):
    """At the end of each epoch of a --time_budget run, its epochs planned again from the training time
    of its last `recent` epochs and the minutes left (the run with its checkpoint and config.json then
    holds the new plan).

    The timing before the first step is short, and on a shared machine other processes slow a run
    or leave it alone by turns, and the epochs of one run can differ twofold. A plan made once can leave a
    quarter of the budget unused, or stop the learning-rate schedule before its end. So the plan follows
    the run: it is cut by any epoch that no longer fits, and lengthened where at least 2% more fit; the
    schedule, which reads the plan at each step, moves by as much."""
    config, history = run.config, run.progress.history
    if not config.time_budget or not history or 1 < len(history) >= config.num_epochs:
        return run  # (a schedule run to its end is not taken up again)
    epochs, seconds = epochs_that_fit(config, history, recent)
    if epochs == config.num_epochs:
        return run
    done = len(history)
    if done == 1 or abs(epochs - config.num_epochs) >= 0.02 * config.num_epochs:  # (the epoch lines show the rest)
        run.log(f"time budget: epochs of {seconds:.2f} s of training, so {epochs} epochs fit the "
                f"{config.time_budget:g} minutes, not the {config.num_epochs} planned; planned {epochs} epochs")
    # the image names' digits as the plan needs, fixed once the first epoch's pictures are written
    digits = runs.epoch_digits(epochs) if done == 1 else max(config.epoch_digits, runs.epoch_digits(epochs))
    config = dataclasses.replace(config, num_epochs=epochs, epoch_digits=digits)
    path = run.out / "config.json"
    files.write_json(path, {**json.loads(path.read_text()), "num_epochs": epochs, "epoch_digits": config.epoch_digits})
    return dataclasses.replace(run, config=config)


def epochs_that_fit(config, history, recent=10):
    """The epochs a --time_budget run plans after the epochs of `history` (replan_epochs), and the mean
    training seconds of its last `recent` epochs it planned from; config.num_epochs where the plan stands."""
    done, left = len(history), 60 * config.time_budget - runs.training_seconds(history)
    seconds = sum(row["seconds"] for row in history[-recent:]) / len(history[-recent:])
    epochs = done + int(left / max(seconds, 1e-9)) if left > 0 else done
    if epochs >= config.num_epochs and epochs - config.num_epochs < max(1, 0.02 * config.num_epochs):
        return config.num_epochs, seconds  # fits, and not 2% more: the schedule is left alone
    if epochs < max(done, config.warmup_epochs, config.kl_warmup, 1):
        return config.num_epochs, seconds
    return epochs, seconds


# ---------------------------------------------------------------- an epoch

def run_steps(run, stop, governor):
    """Train the epoch under way from run.progress.step to its end; False where a signal stopped it
    between two steps (run.progress then says where, for the checkpoint)."""
    config, progress, tensors = run.config, run.progress, run.tensors
    progress.epoch_start_state = run.data_generator.get_state()
    order = torch.randperm(len(tensors.train), generator=run.data_generator, device=run.device)
    epoch_data = tensors.train
    if config.binarize == "dynamic":
        epoch_data = torch.bernoulli(tensors.train, generator=run.data_generator)
    batches = Batches(order, epoch_data, tensors.train_y if run.model.conditional else None, config.batch_size)
    if progress.step == 0:
        progress.step_terms = torch.zeros((run.n_steps, len(TERMS)), device=run.device)
    bar = tqdm(total=run.n_steps, initial=progress.step, desc=f"epoch {progress.epoch + 1}/{config.num_epochs}",
               disable=None, leave=False, unit="step")
    seconds_before, started = progress.seconds, time.perf_counter()
    while progress.step < run.n_steps:
        train_step(run, batches)
        governor()
        progress.step += 1
        bar.update(1)
        if progress.step % CHECK_EVERY == 0 or progress.step == run.n_steps:
            check_loss(run, bar)
        if stop.received is not None and progress.step < run.n_steps:
            bar.close()
            progress.seconds = seconds_before + time.perf_counter() - started
            return False
    bar.close()
    progress.seconds = seconds_before + time.perf_counter() - started
    return True


class Batches:
    """The epoch's batches, the training images (and labels, where given) in `order`, `batch_size` at a time.

    They are gathered GATHER_ROWS rows at a time: a gather's cost is mostly fixed (the call, and the wait
    for each row's first bytes from memory), so one gather for many small batches costs much less than one
    for each. The batch of a step is the same rows either way."""

    def __init__(self, order, images, labels, batch_size):
        self.order, self.images, self.labels, self.batch_size = order, images, labels, batch_size
        self.steps_per_gather = max(1, GATHER_ROWS // batch_size)
        self.first, self.gathered, self.gathered_labels = None, None, None  # the first step gathered, and its rows

    def __call__(self, step):
        """(images, labels) of the batch at `step` of the epoch; labels None where the run has none."""
        if self.first is None or not self.first <= step < self.first + self.steps_per_gather:
            rows = self.order[step * self.batch_size:(step + self.steps_per_gather) * self.batch_size]
            self.gathered = self.images.index_select(0, rows)
            self.gathered_labels = None if self.labels is None else self.labels.index_select(0, rows)
            self.first = step
        start = (step - self.first) * self.batch_size
        labels = None if self.labels is None else self.gathered_labels[start:start + self.batch_size]
        return self.gathered[start:start + self.batch_size], labels


def train_step(run, batches):
    """One step of Adam on the batch at run.progress.step of the epoch's `batches`; its results go into
    run.progress.step_terms."""
    config, epoch, step = run.config, run.progress.epoch, run.progress.step
    target, labels = batches(step)
    x = add_noise(target, config.noise_factor) if config.add_noise else target
    if config.kl_warmup:
        run.step_function.loss_options["kl_weight"] = kl_weight(config, epoch, step, run.n_steps)
    if config.lr_schedule != "constant" or config.warmup_epochs > 0:
        for group in run.optimizer.param_groups:  # a pure function of the position in the run: a resume gets the same
            group["lr"] = learning_rate(config, epoch, step, run.n_steps)
    run.progress.step_terms[step] = run.step_function(x, target, labels)  # batch means, columns TERMS


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


def check_loss(run, bar):
    """Stop with a TrainingError where the epoch's loss so far is not finite; else show its latest mean."""
    progress = run.progress
    losses = term(progress.step_terms[:progress.step], "loss")
    if not torch.isfinite(losses.sum()):
        bad = int(torch.nonzero(~torch.isfinite(losses))[0])
        bar.close()
        raise TrainingError(
            f"the loss became {losses[bad].item()} at epoch {progress.epoch + 1}, step {bad + 1}; "
            f"{nonfinite_cause(run.config, progress.step_terms[bad].tolist())}; the last good checkpoint"
            + (f" (epoch {progress.epoch}) is kept in {run.out}" if progress.epoch > 0 else " does not exist yet"))
    bar.set_postfix_str(f"-elbo {losses[-CHECK_EVERY:].mean().item():.2f}")


def epochs_left(run):
    """Whether the run has epochs to train: its num_epochs not done, its --time_budget not spent."""
    return run.progress.epoch < run.config.num_epochs and not runs.budget_spent(run.config, run.progress.history)


def evaluate_epoch(run):
    """The metrics row of the epoch just trained (evaluation.epoch_row), added to the history; the
    progress moves to the next epoch's start."""
    progress = run.progress
    # Batch means weighted by batch sizes (the last batch may be smaller): means over images.
    means = (progress.step_terms.double() * run.batch_sizes[:, None]).sum(0).div_(len(run.tensors.train)).tolist()
    row = epoch_row(run.model, run.config, run.tensors, dict(zip(TERMS, means)), progress.epoch + 1,
                    progress.seconds)
    progress.history.append(row)
    progress.epoch, progress.step, progress.seconds = progress.epoch + 1, 0, 0.0
    progress.epoch_start_state = run.data_generator.get_state()
    return row


def stop_here(run, stop, observers, where):
    """End the run on a signal, once the observers are told (the checkpoint observer writes it)."""
    for observer in observers:
        observer.on_interrupt(run)
    run.log(f"interrupted {where}; checkpoint written; resume with:\n  mnist-vae --resume {run.out}")
    raise Interrupted(128 + stop.received)


# ---------------------------------------------------------------- the end

def finish(run, stop):
    """Say where a time budget ended training, estimate the test log-likelihood (--eval_k) into
    evaluation.json, and return the last row, with the step that trained it."""
    config, progress = run.config, run.progress
    if progress.epoch < config.num_epochs:
        run.log(f"time budget of {config.time_budget:g} minutes spent after {progress.epoch} of the "
                f"{config.num_epochs} planned epochs; training stops here")
    row = progress.history[-1] if progress.history else None
    if config.eval_k > 0:
        row = estimate_log_likelihood(run, row, stop)
    return {**row, "step": run.step_name} if row else row


def estimate_log_likelihood(run, row, stop):
    """The importance-weighted estimate at config.eval_k, written to evaluation.json; `row` with it.

    A signal in the last epoch's end phase (`stop`), or during the estimate, stops here; the checkpoint
    holds the finished training, and --resume runs the estimate that is still missing."""
    config, model, tensors = run.config, run.model, run.tensors
    estimate = None
    if stop.received is None:
        # on all threads, and among the step's counts only where all are one of them: where they are those of one
        # thread's bits, nothing says the estimate's larger products round alike on all and on fewer
        most = torch.get_num_threads()
        counts = run.thread_counts if most in run.thread_counts else [most]
        with StopSignal() as stop, ThreadGovernor(config.threads, counts=counts) as governor:
            started = time.perf_counter()
            estimate = log_likelihood_estimate(model, tensors.test, config.eval_k,
                                               labels=tensors.test_y if model.conditional else None, stop=stop,
                                               governor=governor)
            estimate_seconds = time.perf_counter() - started
    if estimate is None:
        run.log(f"interrupted before the log-likelihood estimate was done; the trained model is saved; "
                f"finish the estimate with:\n  mnist-vae --resume {run.out}")
        raise Interrupted(128 + stop.received)
    nll, stderr = estimate
    stderr = stderr if math.isfinite(stderr) else None  # one test image: no standard error
    given = "_given_y" if model.conditional else ""
    elbo = f"test_{elbo_name(config)}"
    result = {elbo: row[elbo] if row else None, f"iw_nll{given}": nll, f"iw_nll{given}_stderr": stderr,
              "k": config.eval_k, "n_test": len(tensors.test), "likelihood": config.likelihood,
              "binarize": config.binarize, "seconds": estimate_seconds}
    files.write_json(run.out / "evaluation.json", result)
    run.log(f"test log-likelihood (importance weighted, k={config.eval_k}): NLL {nll:.3f}"
            + (f" ± {stderr:.3f}" if stderr is not None else " (one test image: no standard error)")
            + " nats per image" + (" (-log p(x|y), given the label)" if given else ""))
    return {**row, f"iw_nll{given}": nll, f"iw_nll{given}_stderr": stderr} if row else row


# ---------------------------------------------------------------- signals

class StopSignal:
    """Remembers SIGINT or SIGTERM so the loop can stop between two steps."""

    def __init__(self):
        self.received = None

    def __enter__(self):
        self.previous = catch_signals(self._handle)
        return self

    def _handle(self, signum, frame):
        if self.received is not None:  # a second Ctrl-C: stop at once
            raise KeyboardInterrupt
        self.received = signum

    def __exit__(self, *exc):
        restore_signals(self.previous)
