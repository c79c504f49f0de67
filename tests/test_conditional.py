"""The conditional VAE (its pictures, metrics, and the sample --class, classify and analogies commands),
the KL weight (--beta, --kl_warmup) and the IWAE objective: what they train and what they report."""

import json
import math

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import save_file

from conftest import assert_one_line_error, main, make_idx_dataset, read_metrics
from mnist_vae import checkpoint
from mnist_vae.data import class_index
from mnist_vae.config import Config
from mnist_vae.errors import UserError
from mnist_vae.model import VAE, ConditionalVAE, classify
from mnist_vae.step import AutogradTrainStep, kl_weight

TINY = ["--n_hidden", "32", "--batch_size", "32", "--dim_z", "2", "--PRR_n_img_x", "4", "--PRR_n_img_y", "3",
        "--PMLR_n_img_x", "3", "--PMLR_n_img_y", "2", "--PMLR_n_samples", "30", "--num_epochs", "2"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_idx_dataset(tmp_path_factory.mktemp("data"), n_train=256, n_test=64, seed=7)


@pytest.fixture(scope="module")
def run(tmp_path_factory, data):
    from mnist_vae import cli

    out = tmp_path_factory.mktemp("conditional") / "run"
    assert cli.main([*TINY, "--conditional", "--data_dir", str(data), "--output", str(out)]) == 0
    return out


@pytest.fixture(scope="module")
def digit(tmp_path_factory):
    path = tmp_path_factory.mktemp("images") / "one.png"
    ink = np.full((90, 70), 255, dtype=np.uint8)  # dark ink on white paper
    ink[10:80, 30:40] = 0
    Image.fromarray(ink).save(path)
    return path


def size(path):
    with Image.open(path) as image:
        return image.size


# ---------------------------------------------------------------- a conditional run

def test_conditional_run_writes_class_rows_analogies_and_a_manifold_per_class(run):
    assert size(run / "samples_epoch_02.jpg") == (4 * 28, 10 * 28)  # a row per class, PRR_n_img_x z's
    assert size(run / "analogies_epoch_02.jpg") == (11 * 28, 3 * 28)  # the image, then each class
    for c in range(10):
        assert size(run / f"PMLR_class{c}_epoch_02.jpg") == (3 * 28, 2 * 28)
    assert not (run / "PMLR_epoch_02.jpg").exists()
    assert (run / "PMLR_map_epoch_02.jpg").is_file()
    config = json.loads((run / "config.json").read_text())
    assert config["conditional"] is True and config["model"] == "cvae"


def test_conditional_metrics_name_what_they_bound(run):
    rows = read_metrics(run)
    assert "test_neg_elbo_given_y" in rows[0] and "train_neg_elbo_given_y" in rows[0]
    assert "test_neg_elbo" not in rows[0]  # never one column with -log p(x)
    for row in rows:
        assert 0 <= float(row["test_accuracy"]) <= 1
        assert float(row["test_neg_elbo_given_y"]) == pytest.approx(
            float(row["test_recon"]) + float(row["test_kl"]), abs=2e-3)


def test_conditional_samples_of_one_class_differ_between_classes(run, tmp_path, capsys):
    images = {}
    for name in ("7", "1"):
        result = main(capsys, "sample", run, "--class", name, "--n", "4", "--out", tmp_path / f"{name}.png")
        assert result.returncode == 0, result.stderr
        assert f"class {name}" in result.stdout
        images[name] = np.asarray(Image.open(tmp_path / f"{name}.png"), dtype=np.float32)
    assert np.abs(images["7"] - images["1"]).mean() > 0.5  # the label changes what is drawn


def test_class_names_and_numbers():
    assert class_index("7", "mnist") == 7
    assert class_index("sneaker", "fashion-mnist") == 7
    assert class_index("Ankle Boot", "fashion-mnist") == 9
    assert class_index("t-shirt", "fashion-mnist") == 0
    assert class_index("3", "fashion-mnist") == 3
    with pytest.raises(UserError, match="sneaker: mnist has no such class"):
        class_index("sneaker", "mnist")


def test_sample_bad_class_is_one_line(run, capsys):
    assert_one_line_error(main(capsys, "sample", run, "--class", "sneaker"), "--class sneaker", "0, 1, 2")


def test_classify_prints_a_class_and_probabilities(run, digit, capsys):
    result = main(capsys, "classify", run, digit, digit, "--k", "5")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.strip().splitlines()
    assert len(lines) == 2
    for line in lines:  # each image: its class, then p(y|x) for every class
        probabilities = [float(part.split(":")[1]) for part in line.split("  ")[1:]]
        assert len(probabilities) == 10 and sum(probabilities) == pytest.approx(1, abs=0.01)
        assert line.split(": ", 1)[1].startswith(f"{int(np.argmax(probabilities))} (p={max(probabilities):.3f})")


def test_analogies_with_and_without_a_label(run, digit, tmp_path, capsys):
    result = main(capsys, "analogies", run, digit, "--label", "3", "--out", tmp_path / "a.png")
    assert result.returncode == 0, result.stderr
    assert size(tmp_path / "a.png") == (11 * 28 + 10 * 2, 28)
    result = main(capsys, "analogies", run, digit, "--out", tmp_path / "b.png")
    assert result.returncode == 0 and "read as" in result.stdout


def test_commands_of_conditional_runs_refuse_other_runs(data, tmp_path, digit, capsys):
    out = tmp_path / "plain"
    assert main(capsys, *TINY, "--num_epochs", "1", "--data_dir", data, "--output", out).returncode == 0
    for args in (["classify", out, digit], ["analogies", out, digit], ["sample", out, "--class", "7"]):
        assert_one_line_error(main(capsys, *args), "--conditional")


def test_resume_refuses_to_change_what_the_model_is(run, capsys):
    for flag, value in (("--conditional", "False"), ("--beta", "2"), ("--objective", "iwae")):
        assert_one_line_error(main(capsys, "--resume", run, flag, value), flag, "contradicts")


def test_a_checkpoint_without_a_model_name_loads_as_the_seed_vae(data, tmp_path, capsys):
    out = tmp_path / "old"
    assert main(capsys, *TINY, "--num_epochs", "1", "--data_dir", data, "--output", out).returncode == 0
    path = out / checkpoint.FILENAME
    with safe_open(str(path), framework="pt") as f:
        metadata, tensors = f.metadata(), {name: f.get_tensor(name) for name in f.keys()}
    state = json.loads(metadata["state"])
    del state["model"]
    for name in ("conditional", "beta", "kl_warmup", "objective", "k_train", "step"):
        del state["config"][name]  # as written before these settings existed
    save_file(tensors, str(path), metadata={**metadata, "state": json.dumps(state)})
    config, state, tensors = checkpoint.load(out)
    assert state["model"] == "vae" and type(checkpoint.build_model(config, tensors)) is VAE


def test_the_conditional_model_classifies_by_its_elbo():
    """Images whose class is where their ink is: after a little training the model's best ELBO
    must name the class (chance is 0.1)."""
    generator = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 10, (640,), generator=generator)
    x = torch.rand((640, 784), generator=generator) * 0.1
    for c in range(10):
        x[labels == c, c * 78: c * 78 + 78] = 0.9
    torch.manual_seed(0)
    model = ConditionalVAE(dim_z=2, n_hidden=32, dropout=0.0)
    step = AutogradTrainStep(model, torch.optim.Adam(model.parameters(), lr=3e-3))
    for i in range(150):
        batch = torch.arange(i * 64, i * 64 + 64) % 640
        step(x[batch], x[batch], labels[batch])
    for k in (1, 20):
        accuracy = (classify(model, x[:200], k=k).argmax(1) == labels[:200]).float().mean().item()
        assert accuracy > 0.9, (k, accuracy)


# ---------------------------------------------------------------- beta, warm-up, IWAE

def test_kl_weight_is_beta_after_a_linear_warm_up():
    config = Config(beta=2.0, kl_warmup=4)
    assert kl_weight(config, 0, 0, 10) == 0
    assert kl_weight(config, 1, 5, 10) == pytest.approx(2.0 * 1.5 / 4)
    assert kl_weight(config, 4, 0, 10) == kl_weight(config, 9, 3, 10) == 2.0
    assert kl_weight(Config(beta=0.5), 0, 0, 10) == 0.5


@pytest.mark.parametrize("model_class", [VAE, ConditionalVAE])
def test_beta_weights_the_kl_of_the_loss_and_not_the_reported_elbo(model_class):
    model = model_class(dim_z=3, n_hidden=16, dropout=0.0)
    x, labels = torch.rand(8, 784), torch.arange(8)
    torch.manual_seed(1)
    _, plain = model.loss(x, labels=labels)
    torch.manual_seed(1)
    loss, terms = model.loss(x, labels=labels, kl_weight=4.0)
    assert torch.equal(terms[:3], plain[:3])  # -ELBO, reconstruction, KL: the true ones
    assert loss.item() == pytest.approx(terms[1].item() + 4.0 * terms[2].item(), rel=1e-6)
    assert plain[3].item() == pytest.approx(plain[0].item(), rel=1e-6)


def test_iwae_with_one_sample_is_the_elbo_in_value_and_gradient():
    """K = 1: the same z, so the same reconstruction term; the KL is sampled in the bound and closed-form
    in the ELBO, equal in expectation: over 4000 draws the losses and gradients agree."""
    torch.manual_seed(0)
    model = VAE(dim_z=2, n_hidden=16, dropout=0.0)
    x = torch.rand(4, 784).repeat(1000, 1)  # the batch mean is a mean over 1000 draws per image
    grads = {}
    for objective in ("elbo", "iwae"):
        torch.manual_seed(5)
        model.zero_grad()
        loss, terms = model.loss(x, objective=objective, k=1)
        loss.backward()
        grads[objective] = (loss.item(), terms, [p.grad.clone() for p in model.parameters()])
    (elbo_loss, elbo_terms, elbo_grads), (iw_loss, iw_terms, iw_grads) = grads["elbo"], grads["iwae"]
    assert torch.equal(elbo_terms[:3], iw_terms[:3])  # same draws: the same reported ELBO
    assert iw_loss == pytest.approx(elbo_loss, abs=0.05)
    for g_elbo, g_iw in zip(elbo_grads, iw_grads):
        assert torch.allclose(g_iw, g_elbo, rtol=0.05, atol=0.02 * g_elbo.abs().max().item())


def test_iwae_bound_tightens_with_k():
    torch.manual_seed(0)
    model = VAE(dim_z=2, n_hidden=16, dropout=0.0)
    x = torch.rand(4, 784).repeat(500, 1)
    losses = {}
    for k in (1, 5, 50):
        torch.manual_seed(2)
        losses[k] = model.loss(x, objective="iwae", k=k)[0].item()
    assert losses[1] > losses[5] > losses[50], losses


def test_beta_warm_up_and_iwae_run_and_report_true_elbos(data, tmp_path, capsys):
    out = tmp_path / "iwae"
    result = main(capsys, *TINY, "--beta", "2", "--kl_warmup", "1", "--objective", "iwae", "--k_train", "3",
                  "--eval_k", "5", "--data_dir", data, "--output", out)
    assert result.returncode == 0, result.stderr
    assert "training step: autograd" not in result.stdout  # the fused step trains all three
    assert json.loads((out / "config.json").read_text())["training_step"] == "fused"
    rows = read_metrics(out)
    for row in rows:
        elbo = float(row["test_neg_elbo"])
        assert elbo == pytest.approx(float(row["test_recon"]) + float(row["test_kl"]), abs=2e-3)
        assert float(row["test_neg_iw_bound"]) < elbo  # the 3-sample bound is the tighter one
        assert float(row["train_loss"]) != float(row["train_neg_elbo"])
    evaluation = json.loads((out / "evaluation.json").read_text())
    assert math.isfinite(evaluation["iw_nll"])


def test_k_train_without_iwae_is_one_line(data, tmp_path, capsys):
    result = main(capsys, *TINY, "--k_train", "5", "--data_dir", data, "--output", tmp_path / "x")
    assert_one_line_error(result, "--k_train 5 needs --objective iwae")
    assert not (tmp_path / "x").exists()
