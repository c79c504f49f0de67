"""What a new user meets: two runs in one folder, writes that fail (a full tmpfs, a read-only
folder, a name too long), impossible settings, damaged datasets and checkpoints (property-based, with
hypothesis), users' images as drawing apps make them, runs that can always be continued or replaced,
Ctrl-C at the end of a run, and small things. Every failure is one line, and nothing on disk is lost.

Runs go through mnist_vae.cli.main in-process; the lock is tested across real processes."""

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import save_file

from conftest import ROOT, assert_one_line_error, main, make_idx_dataset, signal_at_call, snapshot, write_idx
from mnist_vae import checkpoint, evaluation
from mnist_vae import loop as train_module

RUN_ARGS = ["--n_hidden", "32", "--batch_size", "32", "--dim_z", "3", "--PRR_n_img_x", "4", "--PRR_n_img_y", "4",
            "--seed", "5"]
STEPS_PER_EPOCH = 8  # 256 training images in batches of 32


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_idx_dataset(tmp_path_factory.mktemp("data"), n_train=256, n_test=250, seed=11)


@pytest.fixture(scope="module")
def other_data(tmp_path_factory):
    return make_idx_dataset(tmp_path_factory.mktemp("other-data"), n_train=256, n_test=250, seed=12)


@pytest.fixture(scope="module")
def trained(tmp_path_factory, data):
    """A finished 2-epoch run, with a user's own file in its folder."""
    from mnist_vae import cli

    out = tmp_path_factory.mktemp("trained") / "run"
    assert cli.main([*RUN_ARGS, "--num_epochs", "2", "--data_dir", str(data), "--output", str(out)]) == 0
    (out / "notes.txt").write_text("mine")
    return out


@pytest.fixture(scope="module")
def digit(tmp_path_factory):
    path = tmp_path_factory.mktemp("digit") / "digit.png"
    image = np.zeros((60, 40), dtype=np.uint8)
    image[10:50, 18:24] = 255
    Image.fromarray(image, mode="L").save(path)
    return path


def temp_files(folder):
    return [p.name for p in Path(folder).iterdir() if p.name.endswith(".tmp")]


# ================================================================ 1. two runs, one folder

@contextlib.contextmanager
def held_by_another_process(folder):
    """A child process holding the lock of `folder` until the block ends (then it is killed)."""
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: take the lock, say so, wait to be killed
        try:
            from mnist_vae import runs

            os.close(read)
            runs.hold(folder, create=True)
            os.write(write, b"1")
            time.sleep(120)
        finally:
            os._exit(0)
    os.close(write)
    try:
        assert os.read(read, 1) == b"1"
        yield pid
    finally:
        os.close(read)
        os.kill(pid, signal.SIGKILL)  # as a crash would: no clean-up in the child
        os.waitpid(pid, 0)


def test_a_folder_in_use_is_refused_at_once_naming_the_process(tmp_path, data, capsys):
    out = tmp_path / "run"
    with held_by_another_process(out) as pid:
        started = time.monotonic()
        result = main(capsys, *RUN_ARGS, "--num_epochs", "1", "--data_dir", data, "--output", out)
        assert_one_line_error(result, str(out), f"process {pid}")
        assert time.monotonic() - started < 10  # at once: not after the other run, however busy the machine
        assert not (out / "config.json").exists() and not (out / checkpoint.FILENAME).exists()
    # The holder died without cleaning up: its lock file is left, and blocks nothing.
    from mnist_vae import runs

    assert (out / runs.LOCK_NAME).exists()
    result = main(capsys, *RUN_ARGS, "--num_epochs", "1", "--data_dir", data, "--output", out)
    assert result.returncode == 0, result.stderr
    assert not (out / runs.LOCK_NAME).exists()  # a clean end removes it


@pytest.mark.parametrize("command", ["resume", "sample", "reconstruct", "overwrite"])
def test_commands_that_write_into_a_run_in_use_are_refused(run_copy, digit, tmp_path, capsys, command):
    args = {"resume": ["--resume", run_copy, "--num_epochs", "3"],
            "sample": ["sample", run_copy, "--n", "4"],
            "reconstruct": ["reconstruct", run_copy, digit],
            "overwrite": [*RUN_ARGS, "--num_epochs", "1", "--output", run_copy, "--overwrite"]}[command]
    before = snapshot(run_copy)
    with held_by_another_process(run_copy) as pid:
        before = snapshot(run_copy)
        result = main(capsys, *args)
        assert_one_line_error(result, f"process {pid}", "in use")
        assert snapshot(run_copy) == before
    # Reading a run in use is fine, and so is writing the picture elsewhere.
    with held_by_another_process(run_copy):
        result = main(capsys, "sample", run_copy, "--n", "4", "--out", tmp_path / "s.png")
        assert result.returncode == 0, result.stderr
        assert main(capsys, "evaluate", run_copy, "--k", "0").returncode == 0


def test_two_trainings_started_into_one_folder(tmp_path, data):
    """Two runs into one folder: `mnist-vae --output r --num_epochs 2 & sleep 0.3; mnist-vae --output r --dim_z 2`."""
    out = tmp_path / "r"
    env = {**os.environ, "XDG_CACHE_HOME": str(tmp_path / "cache")}
    common = [sys.executable, str(ROOT / "main.py"), "--n_hidden", "32", "--batch_size", "32", "--PRR_n_img_x", "4",
              "--PRR_n_img_y", "4", "--data_dir", str(data), "--output", str(out)]
    first = subprocess.Popen([*common, "--num_epochs", "2"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True, env=env)
    try:
        time.sleep(0.3)
        second = subprocess.run([*common, "--dim_z", "2", "--num_epochs", "1"], capture_output=True, text=True,
                                env=env, timeout=120)
        out_first, err_first = first.communicate(timeout=300)
    finally:
        if first.poll() is None:
            first.kill()
            first.wait()
    assert_one_line_error(second, str(out), f"process {first.pid}")
    assert first.returncode == 0, err_first
    config, state, _ = checkpoint.load(out)
    assert config.dim_z == 4 and state["epoch"] == 2  # the first run's, undisturbed


# ================================================================ 2. atomic writes, one-line write errors

def runs_lock_name():
    from mnist_vae import runs

    return runs.LOCK_NAME


@pytest.fixture
def tmpfs(tmp_path):
    """A real 2 MB tmpfs (root only), unmounted afterwards."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    mount = tmp_path / "tmpfs"
    mount.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mount)],
                      capture_output=True).returncode != 0:
        pytest.skip("cannot mount a tmpfs here")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], capture_output=True)


def fill(folder, leave=0):
    """Fill the file system of `folder` up, leaving about `leave` bytes."""
    with open(folder / "filler", "wb") as f:
        with contextlib.suppress(OSError):
            while True:
                free = os.statvfs(folder).f_bavail * os.statvfs(folder).f_frsize
                if free <= leave:
                    break
                f.write(b"\0" * min(1 << 16, max(free - leave, 4096)))
                f.flush()


def remount_read_only(mount):
    subprocess.run(["mount", "-o", "remount,ro", str(mount)], check=True, capture_output=True)


@pytest.mark.parametrize("leave", [0, 12 << 10, 40 << 10], ids=["full", "12 KB left", "40 KB left"])
def test_full_disk_at_the_start_of_a_run_leaves_no_partial_file(tmpfs, data, capsys, leave):
    out = tmpfs / "run"
    out.mkdir()
    fill(tmpfs, leave=leave)
    result = main(capsys, *RUN_ARGS, "--num_epochs", "1", "--data_dir", data, "--output", out)
    assert_one_line_error(result, str(out), "No space left")
    assert not temp_files(out)
    assert all(p.stat().st_size > 0 for p in out.iterdir()), list(out.iterdir())
    assert not (out / checkpoint.FILENAME).exists() and not (out / runs_lock_name()).exists()
    # With space again, a rerun starts the run: the folder was left holding no run.
    (tmpfs / "filler").unlink()
    result = main(capsys, *RUN_ARGS, "--num_epochs", "1", "--data_dir", data, "--output", out)
    assert result.returncode == 0, result.stderr


def test_full_disk_keeps_an_existing_output_file(tmpfs, trained, capsys):
    target = tmpfs / "existing.png"
    Image.new("L", (50, 50), 200).save(target)
    good = target.read_bytes()
    fill(tmpfs, leave=0)
    result = main(capsys, "sample", trained, "--n", "100", "--out", target)
    assert_one_line_error(result, str(target), "No space left", "free some space")
    assert target.read_bytes() == good
    assert not temp_files(tmpfs)


WRITING_COMMANDS = {
    "sample": lambda run, image, out: ["sample", run, "--n", "4", *out],
    "reconstruct": lambda run, image, out: ["reconstruct", run, image, *out],
    "denoise": lambda run, image, out: ["denoise", run, image, *out],
    "interpolate": lambda run, image, out: ["interpolate", run, "--from", image, "--to", image, *out],
}


@pytest.mark.parametrize("command", list(WRITING_COMMANDS))
def test_read_only_run_folder_and_out(tmpfs, trained, digit, capsys, command):
    run = tmpfs / "run"
    shutil.copytree(trained, run)
    (tmpfs / "pictures").mkdir()
    remount_read_only(tmpfs)
    before = snapshot(tmpfs)
    result = main(capsys, *WRITING_COMMANDS[command](run, digit, []))  # into the run folder
    assert_one_line_error(result, str(run), "read-only")
    out = tmpfs / "pictures" / "out.png"
    result = main(capsys, *WRITING_COMMANDS[command](run, digit, ["--out", out]))
    assert_one_line_error(result, str(out), "read-only")
    assert snapshot(tmpfs) == before


def test_read_only_output_folder_for_training(tmpfs, data, capsys):
    (tmpfs / "old").mkdir()
    remount_read_only(tmpfs)
    for out in (tmpfs / "old", tmpfs / "new"):
        result = main(capsys, *RUN_ARGS, "--num_epochs", "1", "--data_dir", data, "--output", out)
        assert_one_line_error(result, str(out), "read-only")


LONG = "x" * 300


@pytest.mark.parametrize("command", list(WRITING_COMMANDS))
def test_name_too_long_for_out(trained, digit, tmp_path, capsys, command):
    before = snapshot(trained)
    result = main(capsys, *WRITING_COMMANDS[command](trained, digit, ["--out", tmp_path / (LONG + ".png")]))
    assert_one_line_error(result, "too long")
    assert snapshot(trained) == before and not list(tmp_path.iterdir())


@pytest.mark.parametrize("where", ["output", "output/sub"])
def test_name_too_long_for_output(tmp_path, data, capsys, where):
    out = tmp_path / LONG if where == "output" else tmp_path / LONG / "sub"
    result = main(capsys, *RUN_ARGS, "--num_epochs", "1", "--data_dir", data, "--output", out)
    assert_one_line_error(result, "too long")
    assert not list(tmp_path.iterdir())


def test_a_path_through_a_file_is_one_line(trained, tmp_path, data, capsys):
    (tmp_path / "afile").write_text("mine")
    result = main(capsys, *RUN_ARGS, "--num_epochs", "1", "--data_dir", data, "--output", tmp_path / "afile" / "run")
    assert_one_line_error(result, str(tmp_path / "afile" / "run"), "a file")
    result = main(capsys, "sample", trained, "--n", "4", "--out", tmp_path / "afile" / "s.png")
    assert_one_line_error(result, str(tmp_path / "afile" / "s.png"))
    assert (tmp_path / "afile").read_text() == "mine"


def test_the_atomic_temporary_name_fits_beside_a_long_name(tmp_path):
    from mnist_vae import files

    target = tmp_path / ("y" * 250 + ".json")  # a legal name; the temporary one must be too
    files.write_json(target, {"a": 1})
    assert json.loads(target.read_text()) == {"a": 1}


def test_download_into_a_read_only_cache_is_one_line(tmpfs, monkeypatch):
    from mnist_vae import data as data_module

    remount_read_only(tmpfs)
    with pytest.raises(data_module.UserError) as excinfo:
        data_module.download_dataset("mnist", tmpfs / "cache", mirrors=["http://127.0.0.1:9/"], log=lambda *a: None)
    assert "read-only" in str(excinfo.value) and len(str(excinfo.value).splitlines()) == 1


# ================================================================ 3. impossible settings, refused up front

@pytest.mark.parametrize("flags, needle", [(["--n_hidden", "1000000000"], "--n_hidden"),
                                           (["--dim_z", "100000000"], "--dim_z"),
                                           (["--dim_z", "2", "--PMLR_n_img_x", "3000"], "65500"),
                                           (["--PRR_n_img_y", "2400"], "65500")])
def test_impossible_settings_exit_2_before_training(tmp_path, data, capsys, monkeypatch, flags, needle):
    trained_steps = []
    monkeypatch.setattr(train_module, "load_tensors", lambda *a, **k: trained_steps.append(1) or 1 / 0)
    out = tmp_path / "run"
    result = main(capsys, "--num_epochs", "1", "--data_dir", data, "--output", out, *flags)
    assert_one_line_error(result, needle, code=2)
    assert not trained_steps and not out.exists()


def test_too_many_images_for_a_jpeg_is_refused(trained, digit, tmp_path, capsys):
    result = main(capsys, "reconstruct", trained, *[digit] * 2200, "--out", tmp_path / "r.jpg")
    assert_one_line_error(result, "65500", code=2)
    assert not list(tmp_path.iterdir())


# ================================================================ 4. damaged datasets (property-based)

from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

PROPERTY = settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck), database=None)


def idx(array):
    array = np.ascontiguousarray(array, dtype=np.uint8)
    return bytes([0, 0, 8, array.ndim]) + b"".join(int(n).to_bytes(4, "big") for n in array.shape) + array.tobytes()


GOOD_IMAGES = idx(np.random.default_rng(0).integers(0, 256, (3, 28, 28)))
GOOD_LABELS = idx(np.array([1, 2, 3]))


@st.composite
def mutated(draw, good):
    """Bytes made from `good`: cut, with bytes changed, inserted or removed, or arbitrary."""
    kind = draw(st.sampled_from(["arbitrary", "cut", "change", "insert", "header"]))
    raw = bytearray(good)
    if kind == "arbitrary":
        return draw(st.binary(max_size=3000))
    if kind == "cut":
        return bytes(raw[: draw(st.integers(0, len(raw)))])
    if kind == "header":  # any dimensions, counts and types
        head = draw(st.binary(min_size=4, max_size=24))
        return head + bytes(raw[len(head):])
    for _ in range(draw(st.integers(1, 8))):
        at = draw(st.integers(0, max(0, len(raw) - 1)))
        if kind == "change" and raw:
            raw[at] = draw(st.integers(0, 255))
        else:
            raw[at:at] = draw(st.binary(min_size=1, max_size=16))
    return bytes(raw)


@st.composite
def idx_file(draw, good):
    """A possibly damaged IDX file: raw, gzipped, or gzipped and then damaged (a corrupt deflate stream)."""
    import gzip

    way = draw(st.sampled_from(["raw", "gz", "damaged gz"]))
    if way == "raw":
        return draw(mutated(good))
    if way == "gz":
        return gzip.compress(draw(mutated(good)), mtime=0)
    return draw(mutated(gzip.compress(good, mtime=0)))


@PROPERTY
@given(content=idx_file(GOOD_IMAGES))
def test_read_idx_gives_an_array_or_one_line(tmp_path_factory, content):
    from mnist_vae import data as data_module

    path = tmp_path_factory.mktemp("idx") / "file-idx3-ubyte"
    path.write_bytes(content)
    try:
        array = data_module.read_idx(path)
    except data_module.DataError as e:
        assert len(str(e).splitlines()) == 1 and str(path) in str(e)
    else:
        assert array.dtype == np.uint8


@PROPERTY
@given(which=st.sampled_from(list(range(4))), content=st.data())
def test_load_dataset_gives_a_usable_dataset_or_one_line(tmp_path_factory, which, content):
    from mnist_vae import data as data_module

    folder = tmp_path_factory.mktemp("dataset")
    good = [GOOD_IMAGES, GOOD_LABELS, GOOD_IMAGES, GOOD_LABELS]
    good[which] = content.draw(idx_file(good[which]))
    for stem, raw in zip(data_module.FILES.values(), good):
        (folder / stem).write_bytes(raw)
    try:
        dataset = data_module.load_dataset("mnist", folder, log=lambda *a: None)
    except data_module.DataError as e:
        assert len(str(e).splitlines()) == 1
    else:
        for images, labels in ((dataset.train_images, dataset.train_labels),
                               (dataset.test_images, dataset.test_labels)):
            assert images.shape[1:] == (28, 28) and len(images) == len(labels) >= 1
            assert labels.max() <= 9


def test_corrupt_deflate_stream_is_one_line(tmp_path):
    import gzip

    from mnist_vae import data as data_module

    raw = bytearray(gzip.compress(GOOD_IMAGES * 3, mtime=0))
    raw[20:30] = b"\xff" * 10  # inside the deflate stream
    path = tmp_path / "train-images-idx3-ubyte.gz"
    path.write_bytes(bytes(raw))
    with pytest.raises(data_module.DataError, match="corrupt"):
        data_module.read_idx(path)


def test_a_dataset_of_no_images_is_one_line(tmp_path, capsys):
    folder = make_idx_dataset(tmp_path / "d", n_train=20, n_test=10)
    write_idx(folder / "train-images-idx3-ubyte.gz", np.zeros((0, 28, 28)))
    write_idx(folder / "train-labels-idx1-ubyte.gz", np.zeros((0,)))
    result = main(capsys, *RUN_ARGS, "--num_epochs", "1", "--data_dir", folder, "--output", tmp_path / "run")
    assert_one_line_error(result, "no images")
    assert not (tmp_path / "run").exists()  # §9: no empty output folder left behind


# ================================================================ 5. users' images as people make them

def stroke():
    mask = np.zeros((120, 90), dtype=bool)
    mask[20:100, 40:52] = True
    mask[20:32, 25:52] = True
    return mask


def test_black_ink_on_a_transparent_background(tmp_path):
    from mnist_vae.images import load_user_image

    rgba = np.zeros(stroke().shape + (4,), dtype=np.uint8)  # transparent black everywhere...
    rgba[stroke(), 3] = 255  # ...and opaque black ink: what a canvas exports
    Image.fromarray(rgba, "RGBA").save(tmp_path / "canvas.png")
    reference = np.where(stroke(), 255, 0).astype(np.uint8)
    Image.fromarray(reference, "L").save(tmp_path / "reference.png")
    np.testing.assert_allclose(load_user_image(tmp_path / "canvas.png"), load_user_image(tmp_path / "reference.png"),
                               atol=0.02)


def test_sixteen_bit_grey(tmp_path):
    from mnist_vae.images import load_user_image

    Image.fromarray(np.where(stroke(), 0, 60000).astype(np.uint16)).save(tmp_path / "grey16.png")
    with Image.open(tmp_path / "grey16.png") as image:
        assert image.mode.startswith("I")
    Image.fromarray(np.where(stroke(), 0, 255).astype(np.uint8), "L").save(tmp_path / "reference.png")
    np.testing.assert_allclose(load_user_image(tmp_path / "grey16.png"), load_user_image(tmp_path / "reference.png"),
                               atol=0.02)


def test_an_absurdly_large_image_is_one_line(tmp_path):
    from mnist_vae.data import DataError
    from mnist_vae.images import load_user_image

    path = tmp_path / "huge.png"
    Image.new("1", (20000, 20000), 1).save(path)  # a small file, 400 megapixels
    assert path.stat().st_size < 1_000_000
    with pytest.raises(DataError, match="megapixels"):
        load_user_image(path)


def test_a_large_image_is_decoded_downscaled(tmp_path):
    path = tmp_path / "large.png"
    image = Image.new("1", (10000, 10000), 1)
    image.paste(0, (4000, 2000, 6000, 8000))
    image.save(path)
    if not Path("/proc/self/status").exists():
        pytest.skip("needs Linux's /proc to measure peak memory")
    # VmHWM, not ru_maxrss: that one keeps the peak of the pytest process that forked this one.
    code = ("import sys; from mnist_vae.images import load_user_image; x = load_user_image(sys.argv[1]); "
            "assert x.shape == (784,) and x.max() > 0.9; "
            "print([line.split()[1] for line in open('/proc/self/status') if line.startswith('VmHWM')][0])")
    result = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert int(result.stdout) < 400_000  # kB: it took 1.1 GB decoded whole


# ================================================================ 6. runs that can always be continued or replaced

def test_a_run_that_failed_before_its_first_checkpoint_can_be_rerun(tmp_path, data, capsys):
    out = tmp_path / "run"
    result = main(capsys, *RUN_ARGS, "--num_epochs", "1", "--learning_rate", "1e20", "--data_dir", data,
                  "--output", out)
    assert_one_line_error(result, "learning rate")
    assert (out / "config.json").exists() and not (out / checkpoint.FILENAME).exists()
    (out / "notes.txt").write_text("mine")
    result = main(capsys, *RUN_ARGS, "--num_epochs", "1", "--data_dir", data, "--output", out)
    assert result.returncode == 0, result.stderr
    assert checkpoint.load(out)[1]["epoch"] == 1 and (out / "notes.txt").read_text() == "mine"


def test_overwrite_removes_the_old_runs_files_and_nothing_else(run_copy, data, capsys):
    (run_copy / "evaluation.json").write_text("{}")
    (run_copy / "samples.png").write_bytes(b"old picture")
    (run_copy / ".PRR_epoch_02.jpg.12345.tmp").write_bytes(b"left by a killed run")
    (run_copy / "my_epoch_02.jpg").write_bytes(b"the user's")
    result = main(capsys, *RUN_ARGS, "--num_epochs", "1", "--data_dir", data, "--output", run_copy, "--overwrite")
    assert result.returncode == 0, result.stderr
    names = sorted(p.name for p in run_copy.iterdir())
    assert names == sorted(["PRR_epoch_01.jpg", "samples_epoch_01.jpg", "checkpoint.safetensors", "config.json",
                            "input.jpg", "loss_curves.png", "metrics.csv", "notes.txt", "my_epoch_02.jpg"])
    assert (run_copy / "notes.txt").read_text() == "mine"


def test_a_failed_overwrite_leaves_no_mix_of_old_and_new(run_copy, data, capsys):
    result = main(capsys, *RUN_ARGS, "--num_epochs", "1", "--learning_rate", "1e20", "--data_dir", data,
                  "--output", run_copy, "--overwrite")
    assert_one_line_error(result, "learning rate")
    assert not (run_copy / checkpoint.FILENAME).exists()  # the old run is gone, not half-replaced
    assert not (run_copy / "PRR_epoch_02.jpg").exists() and (run_copy / "notes.txt").read_text() == "mine"
    result = main(capsys, *RUN_ARGS, "--num_epochs", "1", "--data_dir", data, "--output", run_copy)
    assert result.returncode == 0, result.stderr


def test_resume_on_other_data_is_refused(run_copy, other_data, capsys):
    before = snapshot(run_copy)
    result = main(capsys, "--resume", run_copy, "--num_epochs", "3", "--data_dir", other_data)
    assert_one_line_error(result, "data", str(other_data), "--data_dir")
    assert snapshot(run_copy) == before


def test_resume_of_a_run_without_a_fingerprint_says_it_cannot_check(run_copy, capsys):
    with safe_open(str(run_copy / checkpoint.FILENAME), framework="pt") as f:
        metadata, tensors = f.metadata(), {name: f.get_tensor(name) for name in f.keys()}
    state = json.loads(metadata["state"])
    del state["data_fingerprint"]
    save_file(tensors, str(run_copy / checkpoint.FILENAME), metadata={**metadata, "state": json.dumps(state)})
    result = main(capsys, "--resume", run_copy, "--num_epochs", "3")
    assert result.returncode == 0, result.stderr
    assert "cannot check" in result.stdout


def test_training_a_run_further_keeps_its_file_names(tmp_path, data, capsys, monkeypatch):
    out = tmp_path / "run"
    with monkeypatch.context() as mp:
        signal_at_call(mp, STEPS_PER_EPOCH, [signal.SIGINT])  # stop after epoch 1 of 100
        result = main(capsys, *RUN_ARGS, "--num_epochs", "100", "--data_dir", data, "--output", out)
    assert result.returncode == 130
    result = main(capsys, "--resume", out, "--num_epochs", "2")
    assert result.returncode == 0, result.stderr
    assert sorted(p.name for p in out.glob("PRR_epoch_*")) == ["PRR_epoch_001.jpg", "PRR_epoch_002.jpg"]


# ================================================================ 7. Ctrl-C is always honoured

def test_ctrl_c_in_the_last_epochs_end_phase_skips_the_estimate_and_resume_does_it(tmp_path, data, capsys,
                                                                                  monkeypatch):
    out = tmp_path / "run"
    with monkeypatch.context() as mp:
        signal_at_call(mp, 2 * STEPS_PER_EPOCH, [signal.SIGINT])  # the last step of the last epoch
        result = main(capsys, *RUN_ARGS, "--num_epochs", "2", "--eval_k", "5", "--data_dir", data, "--output", out)
    assert result.returncode == 130
    assert f"--resume {out}" in result.stdout + result.stderr
    assert checkpoint.load(out)[1]["epoch"] == 2 and not (out / "evaluation.json").exists()
    result = main(capsys, "--resume", out)
    assert result.returncode == 0, result.stderr
    assert json.loads((out / "evaluation.json").read_text())["k"] == 5


def test_ctrl_c_during_the_estimate_stops_it_and_resume_finishes_it(tmp_path, data, capsys, monkeypatch):
    out = tmp_path / "run"
    real = evaluation.importance_weighted_log_likelihood

    def interrupted(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGINT)
        return real(*args, **kwargs)

    with monkeypatch.context() as mp:
        mp.setattr(evaluation, "importance_weighted_log_likelihood", interrupted)
        result = main(capsys, *RUN_ARGS, "--num_epochs", "1", "--eval_k", "5", "--data_dir", data, "--output", out)
    assert result.returncode == 130
    assert "Traceback" not in result.stderr and f"--resume {out}" in result.stdout
    assert not (out / "evaluation.json").exists()
    result = main(capsys, "--resume", out)
    assert result.returncode == 0, result.stderr
    assert (out / "evaluation.json").exists()


# ================================================================ 8. checkpoints hold only what this program writes

def edited(run, folder, change_state=None, change_tensors=None, state_text=None):
    folder.mkdir(exist_ok=True)
    with safe_open(str(run / checkpoint.FILENAME), framework="pt") as f:
        metadata, tensors = f.metadata(), {name: f.get_tensor(name) for name in f.keys()}
    state = json.loads(metadata["state"])
    if change_state:
        change_state(state)
    if change_tensors:
        change_tensors(tensors)
    save_file(tensors, str(folder / checkpoint.FILENAME),
              metadata={**metadata, "state": state_text if state_text is not None else json.dumps(state)})
    return folder


def nested(depth):
    return "[" * depth + "]" * depth


HAND_MADE = {
    "deeply nested state": (None, None, '{"config": ' + nested(100000) + "}", "cannot be read"),
    "deeply nested history": (lambda s: s.update(history=json.loads(nested(500))), None, None, "metrics"),
    "no torch random state": (None, lambda t: t.pop("rng.torch"), None, "rng.torch"),
    "random state as floats": (None, lambda t: t.update({"rng.data_epoch_start": torch.zeros(5)}), None,
                               "rng.data_epoch_start"),
    "no progress": (None, lambda t: t.pop("progress.step_terms"), None, "progress.step_terms"),
    "step as text": (lambda s: s.update(step="3"), None, None, "cannot be read"),
    "negative epoch": (lambda s: s.update(epoch=-2), None, None, "epoch -2"),
    "epoch past num_epochs": (lambda s: s.update(epoch=7), None, None, "epoch 7"),
    "NaN weights": (None, lambda t: t["model.decoder.0.weight"].fill_(float("nan")), None, "not finite"),
    "NaN Adam moment": (None, lambda t: t["optimizer.0.exp_avg_sq"].fill_(float("nan")), None, "optimizer"),
    "seconds as a list": (lambda s: s.update(seconds_in_epoch=[1]), None, None, "seconds_in_epoch"),
    "a foreign tensor": (None, lambda t: t.update({"payload": torch.zeros(3)}), None, "payload"),
}


@pytest.mark.parametrize("case", list(HAND_MADE))
@pytest.mark.parametrize("command", ["sample", "resume"])
def test_hand_made_checkpoints_are_one_line(trained, tmp_path, capsys, case, command):
    change_state, change_tensors, state_text, needle = HAND_MADE[case]
    folder = edited(trained, tmp_path / "bad", change_state, change_tensors, state_text)
    before = snapshot(folder)
    args = ["sample", folder, "--n", "4"] if command == "sample" else ["--resume", folder, "--num_epochs", "3"]
    result = main(capsys, *args)
    assert_one_line_error(result, needle)
    assert snapshot(folder) == before


def test_a_step_past_the_epoch_is_refused_on_resume(trained, tmp_path, capsys):
    def mid_epoch(state):
        state.update(epoch=1, step=STEPS_PER_EPOCH + 5, history=state["history"][:1])

    folder = edited(trained, tmp_path / "bad", mid_epoch)
    result = main(capsys, "--resume", folder, "--num_epochs", "3")
    assert_one_line_error(result, f"step {STEPS_PER_EPOCH + 5}")


# No subnormal floats: training in this process flushes them to zero, which hypothesis refuses to work with.
JSON = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_subnormal=False) | st.text(max_size=5),
                    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
                    max_leaves=10)
STATE_KEYS = ["config", "epoch", "step", "history", "seconds_in_epoch", "data_source", "data_fingerprint"]


@st.composite
def damaged_checkpoint(draw, raw, state):
    kind = draw(st.sampled_from(["bytes", "state", "config"]))
    if kind == "bytes":
        return draw(mutated(raw)), None
    state = json.loads(json.dumps(state))
    if kind == "state":
        key = draw(st.sampled_from(STATE_KEYS))
        if draw(st.booleans()):
            state.pop(key, None)
        else:
            state[key] = draw(JSON)
    else:
        state["config"][draw(st.sampled_from(sorted(state["config"])))] = draw(JSON)
    return None, json.dumps(state)


class Blob(bytes):
    """Bytes that hypothesis shows by their length, not their contents (a whole checkpoint)."""

    def __repr__(self):
        return f"<{len(self)} bytes>"


@pytest.fixture(scope="module")
def pristine(trained):
    raw = Blob((trained / checkpoint.FILENAME).read_bytes())
    with safe_open(str(trained / checkpoint.FILENAME), framework="pt") as f:
        metadata, tensors = f.metadata(), {name: f.get_tensor(name) for name in f.keys()}
    return SimpleNamespace(raw=raw, metadata=metadata, tensors=tensors, state=json.loads(metadata["state"]))


@PROPERTY
@given(content=st.data())
def test_checkpoint_loader_gives_a_run_or_one_line(pristine, tmp_path_factory, content):
    raw, state_text = content.draw(damaged_checkpoint(pristine.raw, pristine.state))
    folder = tmp_path_factory.mktemp("ckpt")
    if raw is not None:
        (folder / checkpoint.FILENAME).write_bytes(raw)
    else:
        save_file(pristine.tensors, str(folder / checkpoint.FILENAME),
                  metadata={**pristine.metadata, "state": state_text})
    try:
        config, state, tensors = checkpoint.load(folder)
        model = checkpoint.build_model(config, tensors)
        _, optimizer = train_module.make_model(config, torch.device("cpu"))
        checkpoint.load_optimizer_state(optimizer, tensors)
        checkpoint.check_progress(state, tensors, STEPS_PER_EPOCH, folder)
    except checkpoint.CheckpointError as e:
        assert len(str(e).splitlines()) == 1
    else:  # what loads is usable: finite weights, a state training can go on from
        assert all(torch.isfinite(p).all() for p in model.parameters())
        assert 0 <= state["epoch"] <= config.num_epochs and len(state["history"]) == state["epoch"]


# ================================================================ 9. small things

def test_weight_mismatch_message_keeps_its_detail(trained, tmp_path, capsys):
    def extra_weight(tensors):
        tensors["model.decoder.9.weight"] = torch.zeros(3)

    folder = edited(trained, tmp_path / "bad", change_tensors=extra_weight)
    result = main(capsys, "sample", folder)
    assert_one_line_error(result, "decoder.9.weight")


def test_idx_sizes_in_messages_do_not_overflow(tmp_path):
    from mnist_vae import data as data_module

    path = tmp_path / "big-idx3-ubyte"
    path.write_bytes(bytes([0, 0, 8, 3]) + (2**32 - 1).to_bytes(4, "big") * 3)
    with pytest.raises(data_module.DataError) as excinfo:
        data_module.read_idx(path)
    assert str((2**32 - 1) ** 3) in str(excinfo.value)


def test_evaluate_on_one_test_image_prints_no_nan(trained, capsys):
    result = main(capsys, "evaluate", trained, "--k", "5", "--n_test", "1")
    assert result.returncode == 0, result.stderr
    assert "nan" not in result.stdout.lower() and "no standard error" in result.stdout


def test_a_run_that_fails_on_its_data_leaves_no_empty_folder(tmp_path, capsys):
    out = tmp_path / "new" / "run"
    result = main(capsys, *RUN_ARGS, "--data_dir", tmp_path / "nowhere", "--output", out)
    assert_one_line_error(result, "--data_dir")
    assert not (tmp_path / "new").exists()
