"""Bad input and failures as a new user meets them, second round: pictures on a full disk, --overwrite and
the lock for every file and folder the program writes, limits on every size that comes in, text and paths of
every kind, the right data, and messages that say what is true. Every failure is one line, and nothing on
disk is lost or half-written. (The export's own cases are in test_export.py, the explore page's in
src/mnist_vae/explore/tests.)

Runs go through mnist_vae.cli.main in-process where they can, and through real processes where the test is
about a process (encodings, signals)."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import mnist_vae
from conftest import ROOT, SilentlyShort, assert_one_line_error, main, make_idx_dataset, run_cli, run_command, snapshot
from mnist_vae import files, limits, plots
from mnist_vae import loop as train_module
from mnist_vae.config import Config
from test_robustness import (data, digit, edited, fill, held_by_another_process,  # noqa: F401 (data, digit,
                             tmpfs)  # and tmpfs: fixtures)

RUN_ARGS = ["--n_hidden", "32", "--batch_size", "32", "--dim_z", "2", "--PRR_n_img_x", "4", "--PRR_n_img_y", "4",
            "--seed", "5"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory, data):
    """A finished 1-epoch dim_z 2 run."""
    from mnist_vae import cli

    out = tmp_path_factory.mktemp("trained") / "run"
    assert cli.main([*RUN_ARGS, "--num_epochs", "1", "--data_dir", str(data), "--output", str(out)]) == 0
    return out


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


# ================================================================ 3. limits everywhere a size comes in

def test_more_threads_than_the_machine_can_run_are_refused_in_one_line(tmp_path, data):
    """--threads 100000 ended in a segmentation fault, --threads 30000 in libgomp's errors."""
    out = tmp_path / "run"
    result = run_cli(*RUN_ARGS, "--num_epochs", "1", "--data_dir", data, "--output", out, "--threads", "100000")
    assert_one_line_error(result, "--threads 100000", str(limits.thread_limit()), code=2)
    assert not out.exists()


def test_a_checkpoint_holding_too_many_threads_resumes_with_one_line(run_copy, tmp_path):
    run = edited(run_copy, tmp_path / "edited", lambda state: state["config"].update(threads=100000))
    for name in ("config.json", "input.jpg"):
        shutil.copy(run_copy / name, run / name)
    before = snapshot(run)
    result = run_cli("--resume", run, "--num_epochs", "2")
    assert_one_line_error(result, f"--resume {run}", "--threads 100000", "--threads 0", code=2)
    assert snapshot(run) == before
    result = run_cli("--resume", run, "--num_epochs", "2", "--threads", "1")  # what the line advises
    assert result.returncode == 0, result.stderr


@pytest.fixture
def little_memory(monkeypatch):
    """A machine with 50 MB of memory available."""
    monkeypatch.setattr(limits, "available_memory", lambda: 50_000_000)


@pytest.mark.parametrize("call", ["sample", "interpolate", "decode"])
def test_the_api_checks_memory_before_decoding(trained, little_memory, call):
    """model.sample(10**9) was killed by the kernel; interpolate(steps=10**9) and decode of 10**8 rows raised
    torch's allocator error. Here 50,000 images need more than the 50 MB available."""
    model = mnist_vae.load(trained)
    n = 50_000
    with pytest.raises(ValueError) as excinfo:
        if call == "sample":
            model.sample(n)
        elif call == "interpolate":
            model.interpolate(np.zeros((28, 28)), np.ones((28, 28)), steps=n)
        else:
            model.decode(np.zeros((n, 2), dtype=np.float32))
    message = str(excinfo.value)
    assert "\n" not in message and str(n) in message and "50 MB is available" in message
    assert len(model.sample(4, seed=0)) == 4  # a size that fits is fine


def test_the_training_memory_check_counts_the_importance_samples(tmp_path, data, capsys, monkeypatch):
    """--objective iwae --k_train 1000 --batch_size 2000 passed the check and died allocating 6.3 GB, leaving
    config.json and input.jpg."""
    monkeypatch.setattr(limits, "available_memory", lambda: 8_000_000_000)
    loaded = []
    monkeypatch.setattr(train_module, "load_tensors", lambda *a, **k: loaded.append(1) or 1 / 0)
    out = tmp_path / "run"
    result = main(capsys, "--objective", "iwae", "--k_train", "1000", "--batch_size", "2000", "--num_epochs", "1",
                  "--data_dir", data, "--output", out)
    assert_one_line_error(result, "--k_train", "8.0 GB is available", code=2)
    assert not loaded and not out.exists()
    # The same settings with one sample per image fit.
    assert sum(limits.training_memory(Config(batch_size=2000)).values()) < 8e9


# ================================================================ 5. text and paths of every kind

ASCII_OUTPUT = {"PYTHONIOENCODING=ascii": {"PYTHONIOENCODING": "ascii"},
                "LANG=C": {"LANG": "C", "LC_ALL": "C", "PYTHONUTF8": "0", "PYTHONIOENCODING": ""}}


@pytest.mark.parametrize("environment", list(ASCII_OUTPUT))
def test_output_never_fails_on_its_encoding(environment, trained, tmp_path):
    """`evaluate` died on "±" after computing the whole estimate, `explore` on a non-ASCII folder name."""
    env = ASCII_OUTPUT[environment]
    result = run_command("evaluate", trained, "--k", "2", "--n_test", "5", env=env)
    assert result.returncode == 0 and "Traceback" not in result.stderr, result.stderr
    assert "\\xb1" in result.stdout  # ± as an escape the terminal can show
    run = tmp_path / "zwölf Läufe"
    shutil.copytree(trained, run)
    result = run_command("explore", run, env=env)
    assert result.returncode == 0 and "Traceback" not in result.stderr, result.stderr
    assert (run / "explore.html").is_file()
    # The name as an escape, or (under LANG=C, where Python reads its bytes as surrogates) as its bytes.
    assert "zw\\xf6lf" in result.stdout or str(run / "explore.html") in result.stdout
    result = run_command("sample", tmp_path / "nothing", env=env)  # and an error, through stderr
    assert_one_line_error(result, "nothing")


def run_with_bytes(*args):
    """main.py ARGS in a subprocess, its output read as bytes are (a name that is not UTF-8 comes back as is)."""
    return subprocess.run([sys.executable, str(ROOT / "main.py"), *map(os.fspath, args)], capture_output=True,
                          text=True, errors="surrogateescape", timeout=300)


def test_a_run_in_a_folder_whose_name_is_not_utf8_works_everywhere(tmp_path, data, capsysbinary):
    """A folder named b"bad\\xff" made every command call its good checkpoint "truncated or corrupt". The
    training and `sample`, which prints the name, run as processes given the name's bytes; the other commands
    in this process, given the name as Python decodes such an argument."""
    run = tmp_path / os.fsdecode(b"bad\xff") / os.fsdecode(b"r\xffn")
    result = run_with_bytes(*RUN_ARGS, "--num_epochs", "1", "--data_dir", data, "--output", run)
    assert result.returncode == 0, result.stderr
    commands = [["sample", run, "--n", "4"], ["evaluate", run, "--k", "2"], ["explore", run],
                ["--resume", run, "--num_epochs", "2"]]
    if not export_missing():
        commands.append(["export", run])
    results = [run_with_bytes(*command) if command[0] == "sample" else main(capsysbinary, *command)
               for command in commands]
    for command, result in zip(commands, results):
        assert result.returncode == 0 and "corrupt" not in result.stderr, (command, result.stderr)
        assert "Traceback" not in result.stderr, result.stderr
    assert f"wrote 4 samples to {run / 'samples.png'}" in results[0].stdout
    assert mnist_vae.load(run).epoch == 2 and (run / "samples.png").is_file()
    page = (run / "explore.html").read_text(encoding="utf-8")  # the name with U+FFFD where the byte was
    assert "mnist-vae explore: r\ufffdn" in page
    with open(os.fsencode(run / "samples.png"), "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_a_hand_edited_checkpoint_with_three_layers_of_the_seeds_mlp_is_one_line(run_copy, tmp_path, capsys):
    run = edited(run_copy, tmp_path / "edited", lambda state: state["config"].update(n_layers=3))
    for command in (["sample", run, "--n", "4"], ["evaluate", run, "--k", "0"], ["--resume", run]):
        result = main(capsys, *command)
        assert_one_line_error(result, "n_layers 3", "changed by hand")
    with pytest.raises(ValueError, match="n_layers 3"):
        mnist_vae.load(run)


# ================================================================ 6. the right data, or a clear word

def test_evaluate_on_other_data_is_refused_or_said(trained, tmp_path, capsys):
    """`evaluate RUN --data_dir FASHION` scored an MNIST model on Fashion images without a word."""
    other = make_idx_dataset(tmp_path / "other", n_train=256, n_test=250, seed=12)
    result = main(capsys, "evaluate", trained, "--k", "0", "--data_dir", other)
    assert_one_line_error(result, f"evaluate {trained}", str(other), "not those the run was trained on",
                          "--other_data")
    result = main(capsys, "evaluate", trained, "--k", "0", "--data_dir", other, "--other_data")
    assert result.returncode == 0, result.stderr
    assert "note: evaluating" in result.stdout and "other data" in result.stdout
    # The run's own data, named or not, and a part of its test set: no word.
    for extra in ([], ["--data_dir", mnist_vae.load(trained).config.data_dir], ["--n_test", "10"]):
        result = main(capsys, "evaluate", trained, "--k", "0", *extra)
        assert result.returncode == 0 and "note" not in result.stdout, result.stderr


def test_the_api_evaluates_other_data_only_when_asked(trained, tmp_path):
    other = make_idx_dataset(tmp_path / "other", n_train=256, n_test=250, seed=12)
    model = mnist_vae.load(trained)
    with pytest.raises(ValueError, match="other_data=True"):
        model.evaluate(k=0, data_dir=str(other))
    assert model.evaluate(k=0, data_dir=str(other), other_data=True)["other_data"] is True
    assert model.evaluate(k=0)["other_data"] is False


def real_dataset_dir(name):
    from conftest import FASHION_SYSTEM_DIR, MNIST_DIR, SHARED_DATA

    for folder in ((MNIST_DIR,) if name == "mnist" else (SHARED_DATA / name, FASHION_SYSTEM_DIR)):
        if all((folder / f"{stem}.gz").is_file() or (folder / stem).is_file() for stem in DATA_FILES.values()):
            return folder
    pytest.skip(f"{name} is not on this machine")


from mnist_vae.data import FILES as DATA_FILES  # noqa: E402


def mixed_folder(folder, sources):
    """A folder of links to the IDX files of other folders: {file key: (folder, file key)}."""
    folder.mkdir()
    for key, (source, source_key) in sources.items():
        stem = DATA_FILES[source_key]
        name = f"{stem}.gz" if (source / f"{stem}.gz").is_file() else stem
        (folder / (DATA_FILES[key] + name[len(stem):])).symlink_to(source / name)
    return folder


def load_error(name, folder):
    from mnist_vae import data

    with pytest.raises(data.DataError) as excinfo:
        data.load_dataset(name, data_dir=folder, log=lambda line: None)
    assert "\n" not in str(excinfo.value)
    return str(excinfo.value)


def test_another_datasets_files_are_named_as_that_dataset_and_refused(tmp_path, data, capsys):
    fashion = real_dataset_dir("fashion-mnist")
    message = load_error("mnist", fashion)
    assert "is Fashion-MNIST's training images, not MNIST's" in message and "--dataset fashion-mnist" in message
    assert "is MNIST's" in load_error("fashion-mnist", real_dataset_dir("mnist"))
    out = tmp_path / "run"
    result = main(capsys, *RUN_ARGS, "--num_epochs", "1", "--data_dir", fashion, "--output", out)
    assert_one_line_error(result, "Fashion-MNIST's", "--dataset fashion-mnist")
    assert not out.exists()


@pytest.mark.parametrize("mix", ["Fashion labels", "Fashion test files"])
def test_a_folder_mixing_two_datasets_is_refused(tmp_path, mix):
    mnist, fashion = real_dataset_dir("mnist"), real_dataset_dir("fashion-mnist")
    sources = {key: (mnist, key) for key in DATA_FILES}
    for key in DATA_FILES:
        if (mix == "Fashion labels" and key.endswith("labels")) or (mix == "Fashion test files" and
                                                                  key.startswith("test")):
            sources[key] = (fashion, key)
    message = load_error("mnist", mixed_folder(tmp_path / "mixed", sources))
    assert "mixes MNIST's and Fashion-MNIST's files" in message, message


def test_a_file_under_another_files_name_is_refused(tmp_path):
    mnist = real_dataset_dir("mnist")
    sources = {key: (mnist, key) for key in DATA_FILES}
    sources["train_images"], sources["test_images"] = (mnist, "test_images"), (mnist, "train_images")
    message = load_error("mnist", mixed_folder(tmp_path / "swapped", sources))
    assert "holds MNIST's test images, not its training images" in message, message


def test_a_gz_beside_a_raw_file_with_other_contents_is_refused_naming_both(tmp_path):
    folder = make_idx_dataset(tmp_path / "two", n_train=30, n_test=12, seed=1)  # .gz files
    make_idx_dataset(tmp_path / "raw", n_train=30, n_test=12, seed=2, gz=False)
    shutil.copy(tmp_path / "raw" / "t10k-labels-idx1-ubyte", folder / "t10k-labels-idx1-ubyte")
    message = load_error("mnist", folder)
    assert str(folder / "t10k-labels-idx1-ubyte.gz") in message and str(folder / "t10k-labels-idx1-ubyte") + " " \
        in message and "different data" in message
    # The same data twice is fine.
    shutil.copy(tmp_path / "raw" / "t10k-labels-idx1-ubyte", folder / "t10k-labels-idx1-ubyte")
    same = make_idx_dataset(tmp_path / "same", n_train=30, n_test=12, seed=1, gz=False)
    for path in same.iterdir():
        shutil.copy(path, folder / path.name)
    from mnist_vae import data as data_module

    assert len(data_module.load_dataset("mnist", data_dir=folder, log=lambda line: None).test_labels) == 12


# ================================================================ 7. messages that say what is true

@pytest.fixture(scope="module")
def conditional_run(tmp_path_factory):
    from test_export import make_run

    return make_run(tmp_path_factory.mktemp("conditional") / "run", dim_z=2, conditional=True)


def test_analogies_of_more_images_than_a_jpeg_holds_are_refused_up_front(conditional_run, digit, tmp_path, capsys):
    """2200 rows to a .jpg printed libjpeg's complaint, then blamed the disk."""
    result = main(capsys, "analogies", conditional_run, *[digit] * 2200, "--label", "1", "--out", tmp_path / "a.jpg")
    assert_one_line_error(result, "2200 images", "65500", code=2)
    assert "disk" not in result.stderr and not list(tmp_path.iterdir())


def test_analogies_names_its_own_option(conditional_run, digit, capsys):
    result = main(capsys, "analogies", conditional_run, digit, "--label", "11")
    assert_one_line_error(result, "--label 11", "no such class")
    assert "--class" not in result.stderr


@pytest.mark.parametrize("args, expected", [
    (["sample", "RUN", "--class", ""], "expected a class"),
    (["sample", "RUN", "--class", "  "], "expected a class"),
    (["analogies", "RUN", "DIGIT", "--label", ""], "expected a class"),
    (["reproduce", "--runs", ""], "expected run names"),
])
def test_empty_text_says_what_is_expected(conditional_run, digit, capsys, args, expected):
    args = [{"RUN": conditional_run, "DIGIT": digit}.get(arg, arg) for arg in args]
    result = main(capsys, *args)
    assert_one_line_error(result, expected, code=2)
    assert "path" not in result.stderr


@pytest.mark.parametrize("flags, named", [(["--beta", "1e300"], "--beta 1e+300"),
                                          (["--learning_rate", "1e30"], "--learning_rate 1e+30")])
def test_a_non_finite_loss_names_the_setting_that_made_it(tmp_path, data, capsys, flags, named):
    """--beta 1e300 made the loss infinite, and the message blamed the learning rate."""
    result = main(capsys, *RUN_ARGS, "--num_epochs", "1", "--data_dir", data, "--output", tmp_path / "run", *flags)
    assert_one_line_error(result, "the loss became", named)
    if "--beta" in flags:
        assert "learning rate" not in result.stderr and "learning_rate" not in result.stderr


@pytest.mark.parametrize("flags, named", [(["--kl_warmup", "10", "--num_epochs", "2"], "--kl_warmup 10"),
                                          (["--warmup_epochs", "1e9", "--num_epochs", "2"], "--warmup_epochs 1e+09"),
                                          (["--warmup_epochs", "1e9", "--time_budget", "0.05"],
                                           "planned for --time_budget")])
def test_a_warm_up_longer_than_the_run_is_refused(tmp_path, data, capsys, flags, named):
    out = tmp_path / "run"
    result = main(capsys, *RUN_ARGS, "--data_dir", data, "--output", out, *flags)
    assert_one_line_error(result, named, "longer than")
    assert not out.exists()


def test_a_warm_up_as_long_as_the_run_is_fine():
    Config(kl_warmup=2, warmup_epochs=2.0, num_epochs=2).check_warmups()


@pytest.mark.parametrize("call", ["encode", "reconstruct", "decode", "add_noise", "elbo"])
def test_tensors_on_the_meta_device_are_a_value_error(call):
    import torch

    model = mnist_vae.load("pretrained")
    given = torch.zeros((3, 2) if call == "decode" else (3, 28, 28), device="meta")
    with pytest.raises((ValueError, TypeError)) as excinfo:
        getattr(model, call)(given)
    assert "meta" in str(excinfo.value) and "\n" not in str(excinfo.value)


def test_train_checks_log_up_front_and_a_failing_log_leaves_no_folder(tmp_path, data):
    out = tmp_path / "run"
    with pytest.raises(TypeError, match="log must be a function"):
        mnist_vae.train(output=out, num_epochs=1, data_dir=str(data), log=5)
    assert not out.exists()

    def broken(line):
        raise RuntimeError("the callback's own error")

    with pytest.raises(RuntimeError, match="the callback's own error"):
        mnist_vae.train(output=out, num_epochs=1, n_hidden=16, data_dir=str(data), log=broken)
    assert not out.exists()  # as a run that fails on its data leaves it
