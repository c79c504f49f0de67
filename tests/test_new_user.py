"""Bad input and failures as a new user meets them, second round: pictures on a full disk, --overwrite and
the lock for every file and folder the program writes, limits on every size that comes in, text and paths of
every kind, the right data, and messages that say what is true. Every failure is one line, and nothing on
disk is lost or half-written. (The export's own cases are in test_export.py, the explore page's in
src/mnist_vae/explore/tests.)

Runs go through mnist_vae.cli.main in-process where they can, and through real processes where the test is
about a process (encodings, signals)."""

import errno
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import assert_one_line_error, main, make_idx_dataset, snapshot
from mnist_vae import files, plots
from test_robustness import fill, held_by_another_process, tmpfs  # noqa: F401 (tmpfs is a fixture)

RUN_ARGS = ["--n_hidden", "32", "--batch_size", "32", "--dim_z", "2", "--PRR_n_img_x", "4", "--PRR_n_img_y", "4",
            "--seed", "5"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_idx_dataset(tmp_path_factory.mktemp("data"), n_train=256, n_test=250, seed=11)


@pytest.fixture(scope="module")
def trained(tmp_path_factory, data):
    """A finished 1-epoch dim_z 2 run."""
    from mnist_vae import cli

    out = tmp_path_factory.mktemp("trained") / "run"
    assert cli.main([*RUN_ARGS, "--num_epochs", "1", "--data_dir", str(data), "--output", str(out)]) == 0
    return out


@pytest.fixture
def run_copy(trained, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(trained, copy)
    return copy


def whole_pictures(folder):
    """Every picture in `folder` decodes to its last byte."""
    for path in Path(folder).iterdir():
        if path.suffix in (".jpg", ".png"):
            with Image.open(path) as image:
                image.load()  # raises on a truncated file
    return True


# ================================================================ 2. every file whole, every folder one run's

@pytest.mark.parametrize("leave", [150 << 10, 180 << 10, 230 << 10])
def test_a_full_disk_while_writing_pictures_leaves_each_whole_and_names_the_one_that_failed(tmpfs, data, capsys,
                                                                                           leave):
    """The 2-D manifold picture (about 175 KB) once stayed truncated under its name on a full disk, and the
    error named the next file."""
    out = tmpfs / "run"
    fill(tmpfs, leave=leave)
    result = main(capsys, *RUN_ARGS, "--num_epochs", "1", "--data_dir", data, "--output", out)
    assert_one_line_error(result, "No space left")
    failed = Path(result.stderr.split("cannot write ")[1].split(" (")[0])
    assert failed.parent == out and not failed.exists()  # it names the file that failed, which is not there
    assert whole_pictures(out)
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp")]


class SilentlyShort:
    """A file whose writes keep half of the data and report success, as a write on a full disk once did."""

    def __init__(self, path, mode="r", *args, **kwargs):
        self.f = open(path, mode, *args, **kwargs)

    def write(self, data):
        self.f.write(data[: len(data) // 2])
        return len(data)

    def __getattr__(self, name):
        return getattr(self.f, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.f.close()


def test_a_short_write_nothing_reported_never_reaches_the_name(tmp_path, monkeypatch):
    target = tmp_path / "samples.png"
    target.write_bytes(b"the old picture")
    monkeypatch.setattr(files, "open", SilentlyShort, raising=False)
    with pytest.raises(files.WriteError) as excinfo:
        plots.save_grid(np.random.default_rng(0).random((16, 784)), 4, 4, target)
    assert str(target) in str(excinfo.value) and "\n" not in str(excinfo.value)
    assert target.read_bytes() == b"the old picture"
    with pytest.raises(files.WriteError, match="loss_curves.png"):
        plots.save_loss_curves([{"epoch": 1, **{f"{s}_{k}": 1.0 for s in ("train", "test")
                                               for k in ("neg_elbo", "recon", "kl")}}], tmp_path / "loss_curves.png")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["samples.png"]


def test_overwrite_removes_every_file_and_folder_the_program_wrote_and_nothing_else(run_copy, data, capsys):
    for name in ("explore.html", "analogies.png"):
        (run_copy / name).write_text("old")
    (run_copy / "onnx").mkdir()
    for name in ("encoder.onnx", "decoder.onnx", "model.json"):
        (run_copy / "onnx" / name).write_text("the old run's")
    leftover = run_copy / ".onnx.4242.tmp"  # an export's temporary folder, left by a killed process
    leftover.mkdir()
    (leftover / "encoder.onnx").write_text("half an export")
    mine = run_copy / "mine"
    mine.mkdir()
    (mine / "model.json").write_text("mine")
    (run_copy / "notes.txt").write_text("mine")
    result = main(capsys, *RUN_ARGS, "--num_epochs", "1", "--data_dir", data, "--output", run_copy, "--overwrite")
    assert result.returncode == 0, result.stderr
    assert not (run_copy / "onnx").exists() and not leftover.exists()
    assert not (run_copy / "explore.html").exists() and not (run_copy / "analogies.png").exists()
    assert (mine / "model.json").read_text() == "mine" and (run_copy / "notes.txt").read_text() == "mine"


def test_overwrite_keeps_a_users_own_file_in_the_onnx_folder(run_copy, data, capsys):
    (run_copy / "onnx").mkdir()
    (run_copy / "onnx" / "encoder.onnx").write_text("the old run's")
    (run_copy / "onnx" / "README.txt").write_text("mine")
    result = main(capsys, *RUN_ARGS, "--num_epochs", "1", "--data_dir", data, "--output", run_copy, "--overwrite")
    assert result.returncode == 0, result.stderr
    assert sorted(p.name for p in (run_copy / "onnx").iterdir()) == ["README.txt"]


def export_missing():
    from mnist_vae import export

    return bool(export.missing_packages())


@pytest.mark.parametrize("command", ["export", "explore"])
def test_export_and_explore_into_a_run_in_training_are_refused(run_copy, capsys, command):
    if command == "export" and export_missing():
        pytest.skip("the [export] extra is not installed")
    with held_by_another_process(run_copy) as pid:
        before = snapshot(run_copy)
        result = main(capsys, command, run_copy)
        assert_one_line_error(result, f"process {pid}", "in use", str(run_copy))
        assert snapshot(run_copy) == before
    # Written elsewhere, a run in use is only read: fine.
    with held_by_another_process(run_copy):
        out = run_copy.parent / ("page.html" if command == "explore" else "onnx")
        result = main(capsys, command, run_copy, "--out", out)
        assert result.returncode == 0, result.stderr

