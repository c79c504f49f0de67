"""The training loop's observers: one a caller adds is told of every epoch with its row, after the run's
own (the checkpoint already holds the epoch), of a signal mid-epoch or as an epoch ends, and of the end of
training; loss_curves.png's drawings; the step results read by name; the batches; and Adam built without
torch's compiler."""

import signal
import subprocess
import sys
from dataclasses import replace
from types import SimpleNamespace

import pytest
import torch

from conftest import read_metrics, signal_at_call
from mnist_vae import checkpoint, loop, outputs
from mnist_vae.config import Config
from mnist_vae.errors import Interrupted
from mnist_vae.evaluation import TERMS, term
from mnist_vae.outputs import Checkpoint, EpochImages, EpochLog, Metrics, Observer, TensorBoard, default_observers

STEPS_PER_EPOCH = 8  # the tiny dataset's 256 training images in batches of 32


class Recording(Observer):
    """Writes down what it is told, and what the run's folder holds at that moment."""

    def __init__(self):
        self.told = []

    def on_epoch_end(self, run, row):
        _, state, _ = checkpoint.load(run.out)
        self.told.append(("epoch", row, state["epoch"], state["step"], list(run.progress.history)))

    def on_interrupt(self, run):
        self.told.append(("interrupt", run.progress.epoch, run.progress.step))

    def on_train_end(self, run):
        self.told.append(("end", run.progress.epoch))


def _config(tmp_path, data, **changes):
    return Config(data_dir=str(data), output=str(tmp_path / "run"), n_hidden=32, batch_size=32, dim_z=3,
                  n_test=64, PRR_n_img_x=4, PRR_n_img_y=4, seed=7, **changes)


def test_an_added_observer_is_told_once_per_epoch_with_its_row_then_the_end(tmp_path, tiny_dataset):
    observer = Recording()
    last = loop.train(_config(tmp_path, tiny_dataset, num_epochs=3), log=lambda *a: None, observers=[observer])
    epochs = [told for told in observer.told if told[0] == "epoch"]
    assert [told[0] for told in observer.told] == ["epoch", "epoch", "epoch", "end"]
    assert observer.told[-1] == ("end", 3)
    _, state, _ = checkpoint.load(tmp_path / "run")
    assert [row for _, row, *_ in epochs] == state["history"]  # the rows metrics.csv and the checkpoint hold
    assert [row["epoch"] for _, row, *_ in epochs] == [1, 2, 3]
    assert [int(row["epoch"]) for row in read_metrics(tmp_path / "run")] == [1, 2, 3]
    assert [(saved_epoch, saved_step) for _, _, saved_epoch, saved_step, _ in epochs] == [(1, 0), (2, 0), (3, 0)]
    assert [len(history) for *_, history in epochs] == [1, 2, 3]
    assert last == {**epochs[-1][1], "step": "fused"}


def test_an_observer_is_told_of_a_signal_mid_epoch_after_the_checkpoint(tmp_path, tiny_dataset, monkeypatch):
    observer, saved = Recording(), []

    class AfterCheckpoint(Observer):
        def on_interrupt(self, run):
            saved.append(checkpoint.load(run.out)[1]["step"])

    signal_at_call(monkeypatch, STEPS_PER_EPOCH + 3, [signal.SIGINT])  # step 3 of epoch 2
    with pytest.raises(Interrupted) as excinfo:
        loop.train(_config(tmp_path, tiny_dataset, num_epochs=3), log=lambda *a: None,
                   observers=[observer, AfterCheckpoint()])
    assert excinfo.value.exit_code == 128 + signal.SIGINT
    assert [told[0] for told in observer.told] == ["epoch", "interrupt"]
    assert observer.told[-1] == ("interrupt", 1, 3) and saved == [3]


def test_an_observer_is_told_of_a_signal_as_an_epoch_ends_and_the_checkpoint_is_not_written_again(
        tmp_path, tiny_dataset, monkeypatch):
    observer, saves = Recording(), []
    save = outputs.save_checkpoint
    monkeypatch.setattr(outputs, "save_checkpoint", lambda run: (saves.append(run.progress.epoch), save(run)))
    signal_at_call(monkeypatch, 2 * STEPS_PER_EPOCH, [signal.SIGINT])  # the last step of epoch 2
    with pytest.raises(Interrupted):
        loop.train(_config(tmp_path, tiny_dataset, num_epochs=3), log=lambda *a: None, observers=[observer])
    assert [told[0] for told in observer.told] == ["epoch", "epoch", "interrupt"]
    assert observer.told[-1] == ("interrupt", 2, 0) and saves == [1, 2]


def drawings(monkeypatch):
    """The number of metrics rows each drawing of loss_curves.png shows."""
    drawn = []
    draw = outputs.draw_loss_curves
    monkeypatch.setattr(outputs, "draw_loss_curves", lambda history, *a: (drawn.append(len(history)),
                                                                          draw(history, *a)))
    return drawn


def test_loss_curves_are_drawn_after_the_first_epoch_then_every_30_seconds_and_at_the_end(
        tmp_path, tiny_dataset, monkeypatch):
    drawn = drawings(monkeypatch)
    loop.train(_config(tmp_path, tiny_dataset, num_epochs=4), log=lambda *a: None)
    assert drawn == [1, 4]  # tiny epochs: the first, then the end's
    assert (tmp_path / "run" / "loss_curves.png").stat().st_size > 10000
    assert len(read_metrics(tmp_path / "run")) == 4  # metrics.csv: every epoch
    clock = iter(range(0, 1000, 20))  # 20 s between one look at the clock and the next
    monkeypatch.setattr(outputs, "time", SimpleNamespace(monotonic=lambda: next(clock)))  # outputs.py's clock alone
    drawn.clear()
    loop.train(replace(_config(tmp_path, tiny_dataset, num_epochs=5), output=str(tmp_path / "slow")),
               log=lambda *a: None)
    assert drawn == [1, 3, 5]  # epoch 2 came 20 s after the drawing, epoch 3 40 s; then the end


@pytest.mark.parametrize("step", [STEPS_PER_EPOCH + 3, 2 * STEPS_PER_EPOCH])  # mid-epoch 2, and as it ends
def test_a_signal_draws_the_loss_curves_of_the_epochs_done(tmp_path, tiny_dataset, monkeypatch, step):
    drawn = drawings(monkeypatch)
    signal_at_call(monkeypatch, step, [signal.SIGINT])
    with pytest.raises(Interrupted):
        loop.train(_config(tmp_path, tiny_dataset, num_epochs=3), log=lambda *a: None)
    assert drawn == [1] + [2] * (step == 2 * STEPS_PER_EPOCH)


def test_the_default_observers_in_their_order(monkeypatch):
    kinds = [type(observer) for observer in default_observers(Config())]
    assert kinds == [EpochLog, EpochImages, Metrics, Checkpoint]
    monkeypatch.setattr(outputs, "tensorboard", lambda config: "a writer")  # no logs written: the order only
    observers = default_observers(Config(tensorboard="board"))
    assert [type(observer) for observer in observers] == [EpochLog, EpochImages, Metrics, TensorBoard, Checkpoint]
    assert observers[3].board == "a writer"


def test_step_results_are_read_by_name():
    terms = torch.arange(12.0).reshape(3, len(TERMS))  # three steps' results
    assert TERMS == ("neg_elbo", "recon", "kl", "loss")  # the layout of progress.step_terms in checkpoints
    assert torch.equal(term(terms, "loss"), torch.tensor([3.0, 7.0, 11.0]))
    assert term(terms[1], "kl").item() == 6.0


@pytest.mark.parametrize("batch_size, gather_rows", [(32, 1024), (7, 20), (5, 5), (64, 10)])
def test_batches_are_the_rows_of_the_order_whatever_is_gathered_at_once(monkeypatch, batch_size, gather_rows):
    """Each step's batch is images[order[step b:(step + 1) b]] with its labels, whichever step is asked for first:
    an epoch from its start, a resume in the middle of a gathered chunk, the last batch short."""
    monkeypatch.setattr(loop, "GATHER_ROWS", gather_rows)
    n = 101
    images, labels = torch.rand(n, 784), torch.arange(n)
    order = torch.randperm(n, generator=torch.Generator().manual_seed(0))
    steps = -(-n // batch_size)
    for first in (0, 1, steps // 2, steps - 1):
        batches = loop.Batches(order, images, labels, batch_size)
        for step in range(first, steps):
            x, y = batches(step)
            rows = order[step * batch_size:(step + 1) * batch_size]
            assert torch.equal(x, images[rows]) and torch.equal(y, labels[rows])
            assert x.is_contiguous()
    x, y = loop.Batches(order, images, None, batch_size)(steps - 1)
    assert y is None and len(x) == n - (steps - 1) * batch_size


def test_building_adam_imports_no_compiler_and_leaves_torchs_wrapper_as_it_was():
    """make_model's Adam is torch's fused Adam, built without torch._dynamo's import (a second of every run's
    start); the wrapper that would import it is left as torch made it, in a process of its own where nothing
    else has imported it yet, and in this one, where it may have built its function already."""
    script = ("import sys, torch\n"
              "from mnist_vae.config import Config\n"
              "from mnist_vae.loop import DYNAMO_DISABLE, make_model\n"
              "model, optimizer = make_model(Config(n_hidden=8), torch.device('cpu'))\n"
              "wrapped = torch.optim.Optimizer.add_param_group.__wrapped__\n"
              "print(type(optimizer).__name__, optimizer.defaults['fused'], 'torch._dynamo' in sys.modules,\n"
              "      hasattr(wrapped, DYNAMO_DISABLE))\n")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["Adam", "True", "False", "False"]
    torch.optim.Adam([torch.zeros(1, requires_grad=True)])  # torch's wrapper builds its function, as it does
    wrapped = torch.optim.Optimizer.add_param_group.__wrapped__
    built = getattr(wrapped, loop.DYNAMO_DISABLE)
    assert built is not wrapped
    model, optimizer = loop.make_model(Config(n_hidden=8), torch.device("cpu"))
    assert getattr(wrapped, loop.DYNAMO_DISABLE) is built
    assert optimizer.param_groups[0]["params"] == list(model.parameters())
