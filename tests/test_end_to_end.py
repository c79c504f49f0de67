"""Whole runs of the program: real MNIST through `python main.py`, Fashion-MNIST from the Debian
package through `mnist-vae`, and tiny runs for the output folder's safety, grid sizes and
repeatability. Each run is shared by several tests (module-scoped fixtures) to keep the suite fast."""

import json
import math
import re
import shutil

import numpy as np
import pytest
from PIL import Image

from conftest import MNIST_DIR as MNIST
from conftest import (FASHION_SYSTEM_DIR, assert_one_line_error, make_idx_dataset, read_metrics, run_cli, run_command,
                      snapshot)
from mnist_vae import cli
from mnist_vae.config import Config
from mnist_vae.data import read_idx

MNIST_ARGS = ["--dim_z", "2", "--num_epochs", "2", "--add_noise", "True", "--n_train", "512", "--n_test", "500",
              "--PMLR_n_samples", "300", "--data_dir", MNIST]
MNIST_FILES = ["input.jpg", "input_noise.jpg", "PRR_epoch_01.jpg", "PRR_epoch_02.jpg", "PMLR_epoch_01.jpg",
               "PMLR_epoch_02.jpg", "PMLR_map_epoch_01.jpg", "PMLR_map_epoch_02.jpg", "samples_epoch_01.jpg",
               "metrics.csv", "loss_curves.png", "config.json", "checkpoint.safetensors"]
NUMBER_COLUMNS = ["train_neg_elbo", "train_recon", "train_kl", "test_neg_elbo", "test_recon", "test_kl", "seconds"]


def place_strays(folder):
    """Files of the user's own in `folder`, which no run may touch."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "notes.txt").write_text("my notes\n")
    (folder / "results.csv").write_bytes(bytes(range(256)))
    (folder / ".hidden").write_text("dot file")
    (folder / "sub").mkdir()
    (folder / "sub" / "input.jpg").write_bytes(b"not the run's input.jpg")
    return snapshot(folder)


def pixels(path):
    return np.asarray(Image.open(path), dtype=np.float32)


def epoch_lines(stdout, num_epochs):
    return [line for line in stdout.splitlines() if re.match(rf"epoch +\d+/{num_epochs}  ", line)]


# ---------------------------------------------------------------- real MNIST through main.py

@pytest.fixture(scope="module")
def mnist_run(tmp_path_factory):
    base = tmp_path_factory.mktemp("mnist")
    out = base / "OUT"
    strays = place_strays(out)
    result = run_cli(*MNIST_ARGS, "--output", out, env={"XDG_CACHE_HOME": str(base / "cache")})
    assert result.returncode == 0, result.stderr
    return {"out": out, "result": result, "strays": strays}


def test_mnist_run_writes_every_file(mnist_run):
    out = mnist_run["out"]
    for name in MNIST_FILES:
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    assert not list(out.glob("*.tmp")) and not list(out.glob(".*.tmp"))


def test_mnist_run_image_sizes(mnist_run):
    out = mnist_run["out"]
    for name in ["input.jpg", "input_noise.jpg", "PRR_epoch_01.jpg", "PRR_epoch_02.jpg", "samples_epoch_01.jpg"]:
        with Image.open(out / name) as image:
            assert image.format == "JPEG" and image.size == (280, 280), name
    for name in ["PMLR_epoch_01.jpg", "PMLR_epoch_02.jpg"]:
        with Image.open(out / name) as image:
            assert image.format == "JPEG" and image.size == (560, 560), name
    for name in ["PMLR_map_epoch_01.jpg", "PMLR_map_epoch_02.jpg"]:
        with Image.open(out / name) as image:
            assert image.format == "JPEG" and min(image.size) >= 200
    with Image.open(out / "loss_curves.png") as image:
        assert image.format == "PNG"
    # The reconstructions show something: not a flat grey square.
    assert pixels(out / "PRR_epoch_02.jpg").std() > 10


def test_mnist_input_grid_is_the_first_test_images(mnist_run):
    """input.jpg tiles the first 100 test images row by row, 10 across."""
    test_images = read_idx(MNIST / "t10k-images-idx3-ubyte.gz")[:100].astype(np.float32)
    tiled = test_images.reshape(10, 10, 28, 28).transpose(0, 2, 1, 3).reshape(280, 280)
    assert np.abs(pixels(mnist_run["out"] / "input.jpg") - tiled).mean() < 3


def test_mnist_noisy_input_differs(mnist_run):
    clean = pixels(mnist_run["out"] / "input.jpg")
    noisy = pixels(mnist_run["out"] / "input_noise.jpg")
    assert np.abs(clean - noisy).mean() > 40  # noise of std 0.7 on [0, 1] pixels
    # The digits are still there under the noise.
    assert np.corrcoef(clean.ravel(), noisy.ravel())[0, 1] > 0.2


def test_mnist_config_json(mnist_run):
    out = mnist_run["out"]
    saved = json.loads((out / "config.json").read_text())
    assert set(Config().to_dict()) <= set(saved)
    expected = {**Config().to_dict(), "dim_z": 2, "num_epochs": 2, "add_noise": True, "n_train": 512,
                "n_test": 500, "PMLR_n_samples": 300, "data_dir": str(MNIST), "output": str(out),
                "epoch_digits": 2}
    expected.pop("device")  # config.json records the device the run used, not "auto"
    expected["model"] = "vae"  # and the model it trained, which the default --model leaves to --conditional
    assert saved["device"] in ("cpu", "cuda", "mps")
    for name, value in expected.items():
        assert saved[name] == value, name
    assert saved["add_noise"] is True
    assert saved["data_source"] == f"--data_dir {MNIST}"


def test_mnist_metrics_csv(mnist_run):
    rows = read_metrics(mnist_run["out"])
    assert [row["epoch"] for row in rows] == ["1", "2"]
    for row in rows:
        values = {name: float(row[name]) for name in NUMBER_COLUMNS}
        assert all(math.isfinite(value) for value in values.values()), row
        assert values["train_kl"] >= 0 and values["test_kl"] >= 0
        assert values["train_neg_elbo"] == pytest.approx(values["train_recon"] + values["train_kl"], abs=2e-3)
        assert values["test_neg_elbo"] == pytest.approx(values["test_recon"] + values["test_kl"], abs=2e-3)
        assert 0 < values["test_neg_elbo"] < 784 * math.log(2) * 1.5
        assert row["likelihood"] == "bernoulli" and row["binarize"] == "none"
    assert float(rows[1]["test_neg_elbo"]) < float(rows[0]["test_neg_elbo"])  # it learns


def test_mnist_stdout_one_line_per_epoch(mnist_run):
    stdout = mnist_run["result"].stdout
    lines = epoch_lines(stdout, 2)
    assert [line.split()[1] for line in lines] == ["1/2", "2/2"]
    rows = read_metrics(mnist_run["out"])
    for line, row in zip(lines, rows):
        assert "train -elbo" in line and "test -elbo" in line
        shown = float(re.search(r"test -elbo +([-\d.]+)", line).group(1))
        assert shown == pytest.approx(float(row["test_neg_elbo"]), abs=1.5e-3)
    assert f"--data_dir {MNIST}" in stdout
    assert "Traceback" not in mnist_run["result"].stderr


def test_mnist_checkpoint_loads(mnist_run):
    from mnist_vae import checkpoint

    config, state, tensors = checkpoint.load(mnist_run["out"])
    assert state["epoch"] == 2 and config.dim_z == 2 and config.add_noise is True
    assert len(state["history"]) == 2


def test_mnist_stray_files_survive(mnist_run):
    now = snapshot(mnist_run["out"])
    for name, content in mnist_run["strays"].items():
        assert now[name] == content, name


def test_second_run_refused_then_overwrite(mnist_run, tmp_path, tiny_dataset, capsys):
    out = tmp_path / "OUT"
    shutil.copytree(mnist_run["out"], out)
    before = snapshot(out)

    refused = run_cli(*MNIST_ARGS, "--output", out)
    assert_one_line_error(refused, "--resume", "--overwrite", str(out))
    assert snapshot(out) == before

    # With --overwrite it works (in-process, with small settings, to be quick).
    args = ["--output", str(out), "--overwrite", "--data_dir", str(tiny_dataset), "--n_hidden", "64",
            "--num_epochs", "1", "--dim_z", "3", "--batch_size", "64"]
    assert cli.main(args, prog="mnist-vae") == 0
    printed = capsys.readouterr().out
    assert len(epoch_lines(printed, 1)) == 1
    saved = json.loads((out / "config.json").read_text())
    assert saved["dim_z"] == 3 and saved["n_hidden"] == 64 and saved["data_dir"] == str(tiny_dataset)
    assert [row["epoch"] for row in read_metrics(out)] == ["1"]
    assert (out / "PRR_epoch_01.jpg").read_bytes() != before["PRR_epoch_01.jpg"]
    assert (out / "checkpoint.safetensors").read_bytes() != before["checkpoint.safetensors"]
    now = snapshot(out)
    for name, content in mnist_run["strays"].items():
        assert now[name] == content, name


# ---------------------------------------------------------------- Fashion-MNIST from the system folder

@pytest.mark.skipif(not (FASHION_SYSTEM_DIR / "train-images-idx3-ubyte.gz").is_file(),
                    reason="Debian's dataset-fashion-mnist is not installed")
def test_fashion_mnist_from_system_folder(tmp_path):
    out = tmp_path / "fashion"
    result = run_command("--dataset", "fashion-mnist", "--dim_z", "2", "--num_epochs", "1", "--n_train", "512",
                         "--n_test", "500", "--PMLR_n_samples", "300", "--n_hidden", "64", "--output", out)
    assert result.returncode == 0, result.stderr
    assert f"system folder {FASHION_SYSTEM_DIR}" in result.stdout
    assert json.loads((out / "config.json").read_text())["data_source"] == f"system folder {FASHION_SYSTEM_DIR}"
    assert len(epoch_lines(result.stdout, 1)) == 1
    for name in ["PMLR_map_epoch_01.jpg", "PMLR_epoch_01.jpg", "PRR_epoch_01.jpg", "metrics.csv"]:
        assert (out / name).is_file(), name
    assert not (out / "input_noise.jpg").exists()
    # The inputs are Fashion-MNIST's first test images, not MNIST's.
    test_images = read_idx(FASHION_SYSTEM_DIR / "t10k-images-idx3-ubyte.gz")[:100].astype(np.float32)
    tiled = test_images.reshape(10, 10, 28, 28).transpose(0, 2, 1, 3).reshape(280, 280)
    assert np.abs(pixels(out / "input.jpg") - tiled).mean() < 3


# ---------------------------------------------------------------- tiny runs: --output ., grids, repeatability

TINY_ARGS = ["--n_hidden", "64", "--dim_z", "3", "--num_epochs", "2", "--batch_size", "64",
             "--PRR_n_img_x", "4", "--PRR_n_img_y", "3", "--seed", "5"]


@pytest.fixture(scope="module")
def tiny_runs(tmp_path_factory):
    """The same tiny run twice: in a subprocess with `--output .` in a folder of other files, and in-process."""
    base = tmp_path_factory.mktemp("tiny")
    dataset = make_idx_dataset(base / "data", n_train=256, n_test=64, seed=3)
    here = base / "here"
    strays = place_strays(here)
    first = run_cli(*TINY_ARGS, "--data_dir", dataset, "--output", ".", cwd=here,
                    env={"XDG_CACHE_HOME": str(base / "cache")})
    assert first.returncode == 0, first.stderr
    second = base / "second"
    assert cli.main([*TINY_ARGS, "--data_dir", str(dataset), "--output", str(second)], prog="mnist-vae") == 0
    return {"first": here, "second": second, "strays": strays, "result": first}


def test_output_dot_keeps_other_files(tiny_runs):
    now = snapshot(tiny_runs["first"])
    for name, content in tiny_runs["strays"].items():
        assert now[name] == content, name
    assert (tiny_runs["first"] / "checkpoint.safetensors").is_file()
    assert json.loads((tiny_runs["first"] / "config.json").read_text())["output"] == "."


def test_grid_flags_set_image_sizes(tiny_runs):
    for name in ["input.jpg", "PRR_epoch_01.jpg", "PRR_epoch_02.jpg", "samples_epoch_02.jpg"]:
        with Image.open(tiny_runs["first"] / name) as image:
            assert image.size == (112, 84), name
    assert not list(tiny_runs["first"].glob("PMLR*"))  # dim_z 3: no manifold pictures


def test_no_noise_no_noisy_input(tiny_runs):
    assert (tiny_runs["first"] / "input.jpg").is_file()
    assert not (tiny_runs["first"] / "input_noise.jpg").exists()
    assert not (tiny_runs["second"] / "input_noise.jpg").exists()


def test_same_seed_same_results(tiny_runs):
    first, second = read_metrics(tiny_runs["first"]), read_metrics(tiny_runs["second"])
    assert len(first) == len(second) == 2
    for a, b in zip(first, second):
        assert {k: v for k, v in a.items() if k != "seconds"} == {k: v for k, v in b.items() if k != "seconds"}
    assert first[0]["train_neg_elbo"] != first[1]["train_neg_elbo"]  # it did train
    for name in ["PRR_epoch_01.jpg", "PRR_epoch_02.jpg", "samples_epoch_02.jpg", "input.jpg"]:
        assert (tiny_runs["first"] / name).read_bytes() == (tiny_runs["second"] / name).read_bytes(), name
