"""Checkpoints: what checkpoint.safetensors holds, that it is never pickled, atomic writes and a full
disk, --resume (after an epoch, mid-epoch, refused flags), Ctrl-C and SIGTERM, and a non-finite loss.

One tiny run (module-scoped) is shared by most tests; runs go through mnist_vae.cli.main in-process,
and only the signal tests start a subprocess."""

import errno
import json
import os
import pickle
import re
import shutil
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from conftest import (ROOT, FullDisk, assert_one_line_error, main, make_idx_dataset, read_metrics, signal_at_call,
                      snapshot)
from mnist_vae import checkpoint, cli, files
from mnist_vae.fast import fused
from mnist_vae import loop as train_module
from mnist_vae.config import Config

STEPS_PER_EPOCH = 8  # 256 training images in batches of 32
RUN_ARGS = ["--n_hidden", "32", "--batch_size", "32", "--dim_z", "3", "--PRR_n_img_x", "4", "--PRR_n_img_y", "4",
            "--add_noise", "True", "--binarize", "dynamic", "--seed", "7"]
FINAL_IMAGES = ["PRR_epoch_01.jpg", "PRR_epoch_02.jpg", "PRR_epoch_03.jpg", "samples_epoch_02.jpg",
                "samples_epoch_03.jpg", "input.jpg", "input_noise.jpg"]








def without_seconds(rows):
    return [{key: value for key, value in row.items() if key != "seconds"} for row in rows]


def temp_files(folder):
    return [p.name for p in Path(folder).iterdir() if p.name.endswith(".tmp")]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_idx_dataset(tmp_path_factory.mktemp("data"), n_train=256, n_test=64, seed=1)


@pytest.fixture(scope="module")
def run_a(tmp_path_factory, data):
    """Run A: 3 epochs uninterrupted; keeps the trained model and optimizer, and every checkpoint saved."""
    out = tmp_path_factory.mktemp("runs") / "A"
    kept, saves = {}, []
    real_make_model, real_save = train_module.make_model, checkpoint.save

    def make_model(config, device):
        kept["model"], kept["optimizer"] = real_make_model(config, device)
        return kept["model"], kept["optimizer"]

    def save(run_dir, model, optimizer, state, extra_tensors):
        real_save(run_dir, model, optimizer, state, extra_tensors)
        saves.append((state["epoch"], state["step"], checkpoint.load(run_dir)[1]["epoch"]))

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(train_module, "make_model", make_model)
        mp.setattr(checkpoint, "save", save)
        code = cli.main([*RUN_ARGS, "--num_epochs", "3", "--data_dir", str(data), "--output", str(out)])
    assert code == 0
    return SimpleNamespace(out=out, saves=saves, **kept)


@pytest.fixture
def run_copy(run_a, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(run_a.out, copy)
    return copy


# ---------------------------------------------------------------- what the file holds

def test_a_checkpoint_at_the_end_of_every_epoch(run_a):
    assert run_a.saves == [(1, 0, 1), (2, 0, 2), (3, 0, 3)]
    assert (run_a.out / checkpoint.FILENAME).is_file()
    assert not temp_files(run_a.out)


def test_checkpoint_holds_model_adam_epoch_rng_and_config(run_a, data):
    config, state, tensors = checkpoint.load(run_a.out)
    expected = Config(n_hidden=32, batch_size=32, dim_z=3, PRR_n_img_x=4, PRR_n_img_y=4, add_noise=True,
                      binarize="dynamic", seed=7, num_epochs=3, data_dir=str(data), output=str(run_a.out),
                      epoch_digits=2)
    assert config == expected
    assert state["config"] == expected.to_dict()
    assert state["epoch"] == 3 and state["step"] == 0
    assert [row["epoch"] for row in state["history"]] == [1, 2, 3]
    csv_rows = read_metrics(run_a.out)
    assert [f"{row['test_neg_elbo']:.4f}" for row in state["history"]] == [r["test_neg_elbo"] for r in csv_rows]
    # The model's weights, exactly.
    for name, value in run_a.model.state_dict().items():
        assert torch.equal(tensors[f"model.{name}"], value), name
    # Adam's moments and step counts, for every parameter.
    params = run_a.optimizer.param_groups[0]["params"]
    for index, parameter in enumerate(params):
        saved = run_a.optimizer.state[parameter]
        assert set(saved) == {"step", "exp_avg", "exp_avg_sq"}
        for key, value in saved.items():
            assert torch.equal(tensors[f"optimizer.{index}.{key}"], value.cpu()), (index, key)
    assert float(tensors["optimizer.0.step"]) == 3 * STEPS_PER_EPOCH
    # The random generators.
    assert tensors["rng.torch"].dtype == torch.uint8 and tensors["rng.data_epoch_start"].dtype == torch.uint8


def test_loaded_model_gives_the_same_outputs(run_a):
    config, _, tensors = checkpoint.load(run_a.out)
    loaded = checkpoint.build_model(config, tensors).eval()
    trained = run_a.model.eval()
    x = torch.rand((20, 784), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        for a, b in zip(loaded.encode(x), trained.encode(x)):
            assert torch.equal(a, b)
        z = torch.randn((20, 3), generator=torch.Generator().manual_seed(1))
        assert torch.equal(loaded.decode(z), trained.decode(z))
        eps = torch.randn((20, 3), generator=torch.Generator().manual_seed(2))
        for a, b in zip(loaded(x, eps=eps), trained(x, eps=eps)):
            assert torch.equal(a, b)
    # The optimizer state goes back into a fresh Adam unchanged.
    _, optimizer = train_module.make_model(config, torch.device("cpu"))
    checkpoint.load_optimizer_state(optimizer, tensors)
    for fresh, kept in zip(optimizer.param_groups[0]["params"], run_a.optimizer.param_groups[0]["params"]):
        for key in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(optimizer.state[fresh][key], run_a.optimizer.state[kept][key])


def test_file_is_safetensors_with_json_header_not_pickle(run_a):
    raw = (run_a.out / checkpoint.FILENAME).read_bytes()
    assert not raw.startswith(b"PK") and not raw.startswith(b"\x80")  # neither torch.save's zip nor a pickle
    (header_length,) = struct.unpack("<Q", raw[:8])
    header_bytes = raw[8: 8 + header_length]
    assert header_bytes.startswith(b"{")
    header = json.loads(header_bytes)
    assert b"\x80\x04" not in header_bytes and b"\x80\x05" not in header_bytes and b"\x80\x02" not in header_bytes
    metadata = header.pop("__metadata__")
    assert metadata["format"] == checkpoint.FORMAT
    assert all(isinstance(value, str) for value in metadata.values())
    assert json.loads(metadata["state"])["epoch"] == 3
    # Every byte after the header belongs to a declared tensor: there is no other payload.
    sizes = {"F32": 4, "F64": 8, "I64": 8, "U8": 1, "I32": 4, "BF16": 2, "F16": 2}
    covered = 0
    for name, info in sorted(header.items(), key=lambda item: item[1]["data_offsets"]):
        start, end = info["data_offsets"]
        assert start == covered, name
        count = 1
        for n in info["shape"]:
            count *= n
        assert end - start == count * sizes[info["dtype"]], name
        covered = end
    assert 8 + header_length + covered == len(raw)
    assert any(name.startswith("model.") for name in header)
    assert any(name.startswith("optimizer.") for name in header)


def test_loading_never_unpickles(run_a, monkeypatch, tmp_path, capsys):
    def forbidden(*args, **kwargs):
        raise AssertionError("a checkpoint was unpickled")

    monkeypatch.setattr(pickle, "loads", forbidden)
    monkeypatch.setattr(pickle, "load", forbidden)
    monkeypatch.setattr(pickle, "Unpickler", forbidden)
    monkeypatch.setattr(torch, "load", forbidden)
    config, state, tensors = checkpoint.load(run_a.out)
    checkpoint.build_model(config, tensors)
    result = main(capsys, "sample", run_a.out, "--n", "4", "--out", tmp_path / "s.png")
    assert result.returncode == 0, result.stderr
    with pytest.raises(AssertionError):  # the patch is live: it would have caught an unpickling
        pickle.loads(pickle.dumps(1))


# ---------------------------------------------------------------- atomic writes and a full disk

def test_atomic_write_goes_through_a_synced_temp_file_in_the_same_folder(tmp_path, monkeypatch):
    target = tmp_path / checkpoint.FILENAME
    target.write_bytes(b"old")
    events = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        events.append(("fsync", fd))
        return real_fsync(fd)

    def replace(src, dst):
        events.append(("replace", Path(src), Path(dst)))
        assert target.read_bytes() == b"old"  # the old file is whole until the rename
        assert Path(src).read_bytes() == b"new contents"
        return real_replace(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    files.write_bytes(target, b"new contents")
    assert target.read_bytes() == b"new contents"
    kinds = [event[0] for event in events]
    assert "replace" in kinds and "fsync" in kinds[: kinds.index("replace")]  # synced before the rename
    _, src, dst = events[kinds.index("replace")]
    assert src.parent == tmp_path and src != dst and dst == target
    assert sorted(p.name for p in tmp_path.iterdir()) == [checkpoint.FILENAME]


def full_disk_for_checkpoints(path, mode="r", *args, **kwargs):
    """open() where only the checkpoint's writes meet a full disk."""
    if checkpoint.FILENAME in str(path) and "w" in mode:
        return FullDisk(path, mode)
    return open(path, mode, *args, **kwargs)


def no_space_in_fsync_of_checkpoints(fd, real_fsync=os.fsync):
    """os.fsync where syncing the checkpoint's file meets a full disk."""
    if checkpoint.FILENAME in os.readlink(f"/proc/self/fd/{fd}"):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    return real_fsync(fd)


@pytest.mark.parametrize("where", ["write", "fsync"])
def test_full_disk_during_a_checkpoint_keeps_the_previous_one(run_copy, monkeypatch, capsys, where):
    before = (run_copy / checkpoint.FILENAME).read_bytes()
    input_jpg = (run_copy / "input.jpg").read_bytes()
    (run_copy / "notes.txt").write_text("mine")
    with monkeypatch.context() as mp:
        if where == "write":
            mp.setattr(files, "open", full_disk_for_checkpoints, raising=False)
        else:
            mp.setattr(os, "fsync", no_space_in_fsync_of_checkpoints)
        result = main(capsys, "--resume", run_copy, "--num_epochs", "4")
    assert_one_line_error(result, str(run_copy / checkpoint.FILENAME), "No space left on device",
                          "previous checkpoint")
    assert (run_copy / checkpoint.FILENAME).read_bytes() == before
    assert checkpoint.load(run_copy)[1]["epoch"] == 3
    assert not temp_files(run_copy)
    assert (run_copy / "notes.txt").read_text() == "mine" and (run_copy / "input.jpg").read_bytes() == input_jpg
    # With space again, the run goes on from the intact checkpoint.
    result = main(capsys, "--resume", run_copy, "--num_epochs", "4")
    assert result.returncode == 0, result.stderr
    assert checkpoint.load(run_copy)[1]["epoch"] == 4
    assert [row["epoch"] for row in read_metrics(run_copy)] == ["1", "2", "3", "4"]


def test_atomic_write_on_full_disk_leaves_old_file_and_no_temp(tmp_path, monkeypatch):
    target = tmp_path / checkpoint.FILENAME
    target.write_bytes(b"previous checkpoint")
    monkeypatch.setattr(files, "open", FullDisk, raising=False)
    with pytest.raises(files.WriteError, match="No space left"):
        files.write_bytes(target, b"x" * 10000)
    assert target.read_bytes() == b"previous checkpoint"
    assert sorted(p.name for p in tmp_path.iterdir()) == [checkpoint.FILENAME]


# ---------------------------------------------------------------- --resume gives the uninterrupted run

def assert_same_run(a, b):
    assert without_seconds(read_metrics(a)) == without_seconds(read_metrics(b))
    assert len(read_metrics(b)) == 3
    for name in FINAL_IMAGES:
        assert (a / name).read_bytes() == (b / name).read_bytes(), name
    _, state_a, tensors_a = checkpoint.load(a)
    _, state_b, tensors_b = checkpoint.load(b)
    assert state_a["epoch"] == state_b["epoch"] == 3
    assert set(tensors_a) == set(tensors_b)
    for name in tensors_a:
        assert torch.equal(tensors_a[name], tensors_b[name]), name


def test_resume_after_epoch_1_equals_the_uninterrupted_run(run_a, data, tmp_path, capsys):
    b = tmp_path / "B"
    result = main(capsys, *RUN_ARGS, "--num_epochs", "1", "--data_dir", data, "--output", b)
    assert result.returncode == 0, result.stderr
    assert checkpoint.load(b)[1]["epoch"] == 1
    result = main(capsys, "--resume", b, "--num_epochs", "3")
    assert result.returncode == 0, result.stderr
    assert "resuming" in result.stdout and "epoch 2" in result.stdout
    assert len(re.findall(r"^epoch [23]/3 ", result.stdout, re.M)) == 2  # only the missing epochs were trained
    assert not re.search(r"^epoch 1/3 ", result.stdout, re.M)
    assert_same_run(run_a.out, b)


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_interrupted_mid_epoch_then_resumed_equals_the_uninterrupted_run(run_a, data, tmp_path, capsys,
                                                                          monkeypatch, sig):
    b = tmp_path / "B"
    previous = signal.getsignal(sig)
    with monkeypatch.context() as mp:
        signal_at_call(mp, STEPS_PER_EPOCH + 3, [sig])  # epoch 2, step 3
        result = main(capsys, *RUN_ARGS, "--num_epochs", "3", "--data_dir", data, "--output", b)
    assert result.returncode == 128 + sig
    assert f"mnist-vae --resume {b}" in result.stdout + result.stderr
    assert signal.getsignal(sig) is previous  # the training's handler is gone again
    _, state, _ = checkpoint.load(b)
    assert state["epoch"] == 1 and 1 <= state["step"] < STEPS_PER_EPOCH
    assert len(read_metrics(b)) == 1
    result = main(capsys, "--resume", b)
    assert result.returncode == 0, result.stderr
    assert f"step {state['step']}" in result.stdout
    assert_same_run(run_a.out, b)


def test_interrupted_after_an_epoch_stops_there(data, tmp_path, capsys, monkeypatch):
    b = tmp_path / "B"
    with monkeypatch.context() as mp:
        signal_at_call(mp, STEPS_PER_EPOCH, [signal.SIGINT])  # the last step of epoch 1
        result = main(capsys, *RUN_ARGS, "--num_epochs", "3", "--data_dir", data, "--output", b)
    assert result.returncode == 130
    assert "--resume" in result.stdout + result.stderr
    _, state, _ = checkpoint.load(b)
    assert (state["epoch"], state["step"]) == (1, 0)
    assert [row["epoch"] for row in read_metrics(b)] == ["1"]


def test_second_ctrl_c_stops_at_once_and_keeps_the_last_checkpoint(data, tmp_path, capsys, monkeypatch):
    b = tmp_path / "B"
    with monkeypatch.context() as mp:
        signal_at_call(mp, STEPS_PER_EPOCH + 2, [signal.SIGINT, signal.SIGINT])
        result = main(capsys, *RUN_ARGS, "--num_epochs", "3", "--data_dir", data, "--output", b)
    assert result.returncode == 130
    assert "Traceback" not in result.stderr
    assert checkpoint.load(b)[1]["epoch"] == 1
    assert not temp_files(b)


def test_resume_of_a_finished_run_changes_nothing(run_copy, capsys):
    before = snapshot(run_copy)
    result = main(capsys, "--resume", run_copy)
    assert result.returncode == 0
    assert "finished all 3 epochs" in result.stdout and "--num_epochs" in result.stdout
    assert snapshot(run_copy) == before


@pytest.mark.parametrize("flag, value", [("--dim_z", "5"), ("--n_hidden", "64"), ("--learning_rate", "0.01"),
                                         ("--seed", "8"), ("--likelihood", "continuous_bernoulli"),
                                         ("--batch_size", "16"), ("--add_noise", "False")])
def test_resume_refuses_flags_that_contradict_the_run(run_copy, capsys, flag, value):
    before = snapshot(run_copy)
    result = main(capsys, "--resume", run_copy, "--num_epochs", "4", flag, value)
    assert_one_line_error(result, flag, "contradicts")
    assert snapshot(run_copy) == before


def test_resume_accepts_flags_that_agree_and_refuses_another_output(run_copy, tmp_path, capsys):
    before = snapshot(run_copy)
    result = main(capsys, "--resume", run_copy, "--output", tmp_path / "elsewhere")
    assert_one_line_error(result, "--output")
    assert snapshot(run_copy) == before and not (tmp_path / "elsewhere").exists()
    result = main(capsys, "--resume", run_copy, "--dim_z", "3", "--n_hidden", "32", "--num_epochs", "4")
    assert result.returncode == 0, result.stderr
    assert checkpoint.load(run_copy)[1]["epoch"] == 4


# ---------------------------------------------------------------- a non-finite loss

def test_huge_learning_rate_stops_with_a_clear_message(data, tmp_path, capsys):
    out = tmp_path / "nan"
    result = main(capsys, *RUN_ARGS, "--num_epochs", "3", "--learning_rate", "1e20", "--data_dir", data,
                  "--output", out)
    assert_one_line_error(result, "epoch 1", "learning rate", "--learning_rate")
    assert re.search(r"epoch 1, step \d+", result.stderr)
    assert "nan" in result.stderr.lower() or "inf" in result.stderr.lower()
    assert not (out / checkpoint.FILENAME).exists()  # no epoch finished: nothing to keep


def test_non_finite_loss_keeps_the_last_good_checkpoint(data, tmp_path, capsys, monkeypatch):
    out = tmp_path / "nan"
    calls = {"n": 0}

    class Step(fused.FusedTrainStep):
        def __call__(self, x, target=None, labels=None):
            calls["n"] += 1
            if calls["n"] > STEPS_PER_EPOCH + 2:  # from epoch 2, step 3 on, the data turn into NaN
                x = torch.full_like(x, float("nan"))
                target = x
            return super().__call__(x, target, labels)

    monkeypatch.setattr(fused, "FusedTrainStep", Step)  # what step.make_step builds
    result = main(capsys, *RUN_ARGS, "--num_epochs", "3", "--data_dir", data, "--output", out)
    assert_one_line_error(result, "epoch 2, step 3", "learning rate", "epoch 1", str(out))
    config, state, tensors = checkpoint.load(out)
    assert state["epoch"] == 1 and state["step"] == 0
    model = checkpoint.build_model(config, tensors)
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert not temp_files(out)


# ---------------------------------------------------------------- Ctrl-C and SIGTERM in a real process

@pytest.fixture(scope="module")
def signal_data(tmp_path_factory):
    return make_idx_dataset(tmp_path_factory.mktemp("signal-data"), n_train=1024, n_test=64, seed=2)


class RunProcess:
    """A 99-epoch training of `signal_data` into tmp_path/run, run by main.py in a process of its own (a context
    manager that kills it where the test did not end it), with `preexec_fn` before it starts."""

    def __init__(self, data, tmp_path, preexec_fn=None):
        self.tmp_path, self.out = tmp_path, tmp_path / "run"
        self.args = [*RUN_ARGS, "--num_epochs", "99", "--data_dir", data, "--output", self.out]
        self.preexec_fn = preexec_fn

    def __enter__(self):
        tmp_path = self.tmp_path
        with open(tmp_path / "stdout", "w") as stdout, open(tmp_path / "stderr", "w") as stderr:
            self.process = subprocess.Popen(
                [sys.executable, str(ROOT / "main.py"), *map(str, self.args)], stdout=stdout, stderr=stderr,
                env={**os.environ, "XDG_CACHE_HOME": str(tmp_path / "cache")}, preexec_fn=self.preexec_fn)
        return self

    def __exit__(self, *exc):
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()

    def output(self):
        return (self.tmp_path / "stdout").read_text() + (self.tmp_path / "stderr").read_text()

    def epochs(self):
        """The epochs it has printed so far."""
        return sum(line.startswith("epoch ") for line in (self.tmp_path / "stdout").read_text().splitlines())

    def wait_for(self, condition, what):
        deadline = time.monotonic() + 60
        while not condition():
            assert self.process.poll() is None, (self.tmp_path / "stderr").read_text()
            assert time.monotonic() < deadline, f"{what} not within 60 s"
            time.sleep(0.02)

    def wait_for_checkpoint(self):
        self.wait_for(lambda: (self.out / checkpoint.FILENAME).exists(), "a checkpoint")

    def stop(self, sig):
        """Send `sig`; the exit status."""
        self.process.send_signal(sig)
        return self.process.wait(timeout=30)


def test_a_run_started_ignoring_ctrl_c_goes_on_through_it_and_still_stops_on_sigterm(signal_data, tmp_path):
    """As a shell without job control starts `mnist-vae ... &`: SIGINT ignored from the start, which the run
    keeps ignoring (the terminal's Ctrl-C is meant for the foreground), while SIGTERM still stops it cleanly."""
    with RunProcess(signal_data, tmp_path, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN)) as run:
        run.wait_for_checkpoint()
        run.process.send_signal(signal.SIGINT)
        seen = run.epochs()
        run.wait_for(lambda: run.epochs() >= seen + 2, "two more epochs after SIGINT")
        returncode = run.stop(signal.SIGTERM)
    output = run.output()
    assert returncode == 143, output
    assert "Traceback" not in output and f"--resume {run.out}" in output
    _, state, _ = checkpoint.load(run.out)
    assert seen + 2 <= state["epoch"] < 99


@pytest.mark.parametrize("sig, code", [pytest.param(signal.SIGINT, 130, id="SIGINT"),
                                       pytest.param(signal.SIGTERM, 143, id="SIGTERM")])
def test_signal_writes_a_checkpoint_and_says_how_to_resume(signal_data, tmp_path, capsys, sig, code):
    with RunProcess(signal_data, tmp_path) as run:
        run.wait_for_checkpoint()
        returncode = run.stop(sig)
    output, out = run.output(), run.out
    assert returncode == code, output
    assert "Traceback" not in output
    assert f"--resume {out}" in output
    _, state, _ = checkpoint.load(out)
    assert 1 <= state["epoch"] < 99
    assert not temp_files(out)
    # Resuming completes: one more epoch than the checkpoint holds.
    target = state["epoch"] + 1
    result = main(capsys, "--resume", out, "--num_epochs", target)
    assert result.returncode == 0, result.stderr
    _, state, _ = checkpoint.load(out)
    assert state["epoch"] == target and state["step"] == 0
    assert [int(row["epoch"]) for row in read_metrics(out)] == list(range(1, target + 1))
