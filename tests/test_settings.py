"""The settings behind the literature's models: the MLP's depth and activation, Adam's epsilon,
the learning-rate schedules with warm-up, and the time budget; each through the model seam and the step that
fits it, each surviving --resume bit for bit, and checkpoints from before them loading as the old program's model."""

import json
import math
import re
import signal

import pytest
import torch
from torch import nn

from conftest import assert_one_line_error, main, make_idx_dataset, read_metrics, signal_at_call
from mnist_vae import checkpoint, limits, runs, step
from mnist_vae.fast import fused
from mnist_vae import loop as train_module
from mnist_vae.config import Config, resume_conflict
from mnist_vae.layers import Dropout, Tanh
from mnist_vae.model import VAE, build

STEPS_PER_EPOCH = 8  # 256 training images in batches of 32
TINY = ["--n_hidden", "16", "--batch_size", "32", "--dim_z", "3", "--PRR_n_img_x", "4", "--PRR_n_img_y", "4",
        "--binarize", "dynamic", "--seed", "3"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_idx_dataset(tmp_path_factory.mktemp("data"), n_train=256, n_test=64, seed=2)


# ---------------------------------------------------------------- the MLPs

def test_the_default_settings_build_the_seeds_mlp_on_the_fused_step():
    config = Config(n_hidden=16, dim_z=3)
    torch.manual_seed(0)
    model = build(config)
    torch.manual_seed(0)
    seed = VAE(3, 16, 0.1, "bernoulli")  # as the seed built it, before the new settings existed
    assert [type(m) for m in model.encoder] == [nn.Linear, nn.ELU, Dropout, nn.Linear, Tanh, Dropout, nn.Linear]
    for (name, a), b in zip(model.state_dict().items(), seed.state_dict().values()):
        assert torch.equal(a, b), name
    # Adam's epsilon and a schedule change nothing the fused step computes: it reads both from the optimizer.
    assert fused.supports(model, Config(n_hidden=16, dim_z=3, adam_eps=1e-4, lr_schedule="paper", warmup_epochs=1))


@pytest.mark.parametrize("activation, module", [("tanh", Tanh), ("relu", nn.ReLU), ("elu", nn.ELU)])
def test_an_mlp_of_one_activation_goes_to_the_fused_step(activation, module):
    config = Config(n_hidden=16, dim_z=5, n_layers=3, activation=activation, dropout=0.0)
    model = build(config)
    assert sum(isinstance(m, module) for m in model.encoder) == 3 == sum(isinstance(m, module) for m in model.decoder)
    assert [m.out_features for m in model.encoder if isinstance(m, nn.Linear)] == [16, 16, 16, 10]
    assert [m.out_features for m in model.decoder if isinstance(m, nn.Linear)] == [16, 16, 16, 784]
    assert not any(isinstance(m, (Dropout, nn.Dropout)) for m in model.modules())  # dropout 0: no dropout layers
    assert sum(p.numel() for p in model.parameters()) == limits.parameters(5, 16, 3)
    # tanh and dropout as the fused step computes them, so that it trains these MLPs as autograd does
    assert fused.unsupported(model, config) is None
    optimizer = torch.optim.Adam(model.parameters())
    assert isinstance(step.make_step(model, optimizer, config), fused.FusedTrainStep)
    with_dropout = build(Config(n_hidden=16, dim_z=5, activation="relu", dropout=0.2))
    assert [type(m) for m in with_dropout.encoder] == [nn.Linear, nn.ReLU, Dropout] * 2 + [nn.Linear]


def test_paper_architecture_trains_and_its_checkpoint_loads(data, tmp_path, capsys):
    out = tmp_path / "run"
    result = main(capsys, *TINY, "--activation", "tanh", "--dropout", "0", "--adam_eps", "1e-4", "--num_epochs", "2",
                  "--data_dir", data, "--output", out)
    assert result.returncode == 0, result.stderr
    assert "training step: autograd" not in result.stdout
    config, _, tensors = checkpoint.load(out)
    assert (config.activation, config.adam_eps, config.n_layers) == ("tanh", 1e-4, 2)
    model = checkpoint.build_model(config, tensors, out)
    assert isinstance(model.encoder[1], Tanh)
    assert json.loads((out / "config.json").read_text())["training_step"] == "fused"


def test_seed_activation_with_other_depth_is_one_line(tmp_path, capsys):
    result = main(capsys, "--n_layers", "3", "--output", tmp_path / "x")
    assert_one_line_error(result, "--n_layers 3", "--activation")
    assert not (tmp_path / "x").exists()


def test_a_checkpoint_from_before_these_settings_loads_as_the_seeds(data, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(capsys, *TINY, "--num_epochs", "1", "--data_dir", data, "--output", out).returncode == 0
    metadata, tensors = checkpoint.read_file(out / checkpoint.FILENAME)
    state = json.loads(metadata["state"])
    for name in ("n_layers", "activation", "adam_eps", "lr_schedule", "warmup_epochs", "time_budget"):
        del state["config"][name]
    from safetensors.torch import save_file

    save_file(tensors, str(out / checkpoint.FILENAME), metadata={**metadata, "state": json.dumps(state)})
    config, _, _ = checkpoint.load(out)
    assert (config.n_layers, config.activation, config.adam_eps, config.lr_schedule, config.time_budget) == \
        (2, "elu_tanh", 1e-8, "constant", 0.0)
    result = main(capsys, "--resume", out, "--num_epochs", "2")  # an old run may still be trained further
    assert result.returncode == 0, result.stderr
    assert "training step: autograd" not in result.stdout and len(read_metrics(out)) == 2


def test_seed_is_the_old_name_of_the_old_programs_mlp():
    assert Config(activation="seed").activation == "elu_tanh" == Config().activation
    assert Config.from_dict({"activation": "seed"}).activation == "elu_tanh"  # a run made before the rename
    assert resume_conflict(Config(), {"activation": "seed"}, "run") is None
    assert "--activation tanh contradicts" in resume_conflict(Config(), {"activation": "tanh"}, "run")


def test_the_decoder_runs_on_k_train_draws_per_image_under_iwae_only():
    assert Config(objective="iwae", k_train=5).z_per_image == 5
    assert Config().z_per_image == 1
    assert Config(k_train=5).z_per_image == 1  # the ELBO draws one z, whatever k_train says (a hand-made Config)


# ---------------------------------------------------------------- the learning-rate schedules

def test_paper_schedule_at_the_papers_length_is_burda_et_al_s():
    config = Config(lr_schedule="paper", num_epochs=3280, learning_rate=1e-3)
    starts = [0, 1, 4, 13, 40, 121, 364, 1093]  # pass i starts after 1 + 3 + ... + 3^(i-1) epochs
    for i, start in enumerate(starts):
        assert step.learning_rate(config, start, 0, 100) == pytest.approx(1e-3 * 10 ** (-i / 7), rel=1e-12)
        if start:
            assert step.learning_rate(config, start - 1, 99, 100) == pytest.approx(1e-3 * 10 ** (-(i - 1) / 7))
    assert step.learning_rate(config, 3279, 99, 100) == pytest.approx(1e-4)


def test_paper_schedule_scales_to_a_shorter_run():
    # A tenth of the paper's length: pass i ends after a tenth of 1 + 3 + ... + 3^i epochs,
    # at 0.1, 0.4, 1.3, 4, 12.1, 36.4 and 109.3 epochs.
    config = Config(lr_schedule="paper", num_epochs=328, learning_rate=1e-3)
    for (epoch, step_in), i in [((0, 5), 0), ((0, 20), 1), ((1, 0), 2), ((3, 0), 3), ((10, 0), 4), ((30, 0), 5),
                                ((100, 0), 6), ((300, 0), 7), ((327, 99), 7)]:
        assert step.learning_rate(config, epoch, step_in, 100) == pytest.approx(1e-3 * 10 ** (-i / 7), rel=1e-12)


def test_cosine_schedule_with_warm_up():
    config = Config(lr_schedule="cosine", num_epochs=11, warmup_epochs=1, learning_rate=0.01)
    assert step.learning_rate(config, 0, 0, 10) == pytest.approx(0.001)  # the first of ten warm-up steps
    assert step.learning_rate(config, 0, 9, 10) == pytest.approx(0.01)
    assert step.learning_rate(config, 1, 0, 10) == pytest.approx(0.01)
    assert step.learning_rate(config, 6, 0, 10) == pytest.approx(0.005)  # half way through the cosine
    assert step.learning_rate(config, 10, 9, 10) == pytest.approx(0.01 * 0.5 * (1 + math.cos(math.pi * 0.99)))
    constant = Config(learning_rate=0.01)
    assert step.learning_rate(constant, 5, 3, 10) == 0.01
    assert step.learning_rate(Config(learning_rate=0.01, warmup_epochs=2), 0, 4, 10) == pytest.approx(0.0025)


def test_the_loop_gives_adam_the_scheduled_rate_on_the_autograd_step(data, tmp_path, capsys, monkeypatch):
    rates = []
    real = step.AutogradTrainStep.__call__

    def recording(self, *batch):
        rates.append(self.optimizer.param_groups[0]["lr"])
        return real(self, *batch)

    monkeypatch.setattr(step.AutogradTrainStep, "__call__", recording)
    result = main(capsys, *TINY, "--step", "autograd", "--lr_schedule", "cosine", "--warmup_epochs", "0.5",
                  "--num_epochs", "2", "--data_dir", data, "--output", tmp_path / "run")
    assert result.returncode == 0, result.stderr
    config = checkpoint.load(tmp_path / "run")[0]
    expected = [step.learning_rate(config, e, s, STEPS_PER_EPOCH) for e in range(2) for s in range(STEPS_PER_EPOCH)]
    assert rates == expected and len(set(rates)) > STEPS_PER_EPOCH  # warm-up, then the cosine


SCHEDULED = [*TINY, "--lr_schedule", "paper", "--warmup_epochs", "0.5", "--adam_eps", "1e-4"]


def test_a_scheduled_run_interrupted_mid_epoch_resumes_bit_for_bit(data, tmp_path, capsys, monkeypatch):
    a, b = tmp_path / "A", tmp_path / "B"
    assert main(capsys, *SCHEDULED, "--num_epochs", "3", "--data_dir", data, "--output", a).returncode == 0
    with monkeypatch.context() as mp:
        signal_at_call(mp, STEPS_PER_EPOCH + 3, [signal.SIGINT])  # epoch 2, step 3: on the fused step
        result = main(capsys, *SCHEDULED, "--num_epochs", "3", "--data_dir", data, "--output", b)
    assert result.returncode == 130
    assert checkpoint.load(b)[1]["step"] > 0
    result = main(capsys, "--resume", b)
    assert result.returncode == 0, result.stderr
    drop = lambda rows: [{k: v for k, v in row.items() if k != "seconds"} for row in rows]  # noqa: E731
    assert drop(read_metrics(a)) == drop(read_metrics(b))
    tensors_a, tensors_b = checkpoint.load(a)[2], checkpoint.load(b)[2]
    for name in tensors_a:
        assert torch.equal(tensors_a[name], tensors_b[name]), name
    # A constant rate trains another model: the schedule was applied.
    c = tmp_path / "C"
    assert main(capsys, *TINY, "--adam_eps", "1e-4", "--num_epochs", "3", "--data_dir", data,
                "--output", c).returncode == 0
    assert not torch.equal(checkpoint.load(c)[2]["model.encoder.0.weight"], tensors_a["model.encoder.0.weight"])


def test_a_scheduled_run_keeps_its_length(data, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(capsys, *SCHEDULED, "--num_epochs", "1", "--data_dir", data, "--output", out).returncode == 0
    result = main(capsys, "--resume", out, "--num_epochs", "2")
    assert_one_line_error(result, "--num_epochs 2", "--lr_schedule paper")
    result = main(capsys, "--resume", out)
    assert result.returncode == 0 and "finished all 1 epochs" in result.stdout


# ---------------------------------------------------------------- the time budget

def test_budget_spent_counts_training_seconds_across_calls():
    config = Config(time_budget=0.5)  # 30 s
    history = [{"seconds": 10.0}, {"seconds": 15.0}]
    assert not runs.budget_spent(config, history)
    assert runs.budget_spent(config, history + [{"seconds": 5.0}])
    assert not runs.budget_spent(Config(), history * 100)  # no budget
    assert runs.training_done(config, {"epoch": 3, "history": history + [{"seconds": 5.0}]})
    assert not runs.training_done(config, {"epoch": 2, "history": history})


def test_planning_the_epochs_leaves_the_random_state_alone(data):
    config = Config(n_hidden=16, dim_z=3, batch_size=32, time_budget=0.01, data_dir=str(data))
    tensors = train_module.load_tensors(config, torch.device("cpu"), log=lambda *a: None)
    torch.manual_seed(5)
    before = torch.get_rng_state()
    lines = []
    epochs = train_module.plan_epochs(config, tensors, STEPS_PER_EPOCH, torch.device("cpu"), log=lines.append)
    assert torch.equal(torch.get_rng_state(), before)
    assert epochs >= 1 and f"planned {epochs} epochs" in lines[0]


def test_a_budget_run_plans_its_epochs_and_stops_when_they_are_spent(data, tmp_path, capsys, monkeypatch):
    out = tmp_path / "run"
    budget = 0.001  # minutes: 0.06 s of training, a handful of these epochs
    monkeypatch.setattr(train_module, "plan_epochs", lambda *args, **kwargs: 500)  # a plan far too long
    monkeypatch.setattr(train_module, "replan_epochs", lambda run: run)  # and kept after the first epoch
    result = main(capsys, *SCHEDULED, "--time_budget", str(budget), "--data_dir", data, "--output", out)
    assert result.returncode == 0, result.stderr
    config, state, _ = checkpoint.load(out)
    assert config.num_epochs == 500 and config.epoch_digits == 3  # the plan, kept for --resume
    seconds = [row["seconds"] for row in state["history"]]
    assert 1 <= state["epoch"] < 500 and sum(seconds) >= 60 * budget > sum(seconds[:-1])
    assert f"spent after {state['epoch']} of the 500 planned epochs" in result.stdout
    assert (out / f"PRR_epoch_{state['epoch']:03d}.jpg").is_file()
    result = main(capsys, "--resume", out)  # done: nothing more to train
    assert result.returncode == 0 and "spent its time budget" in result.stdout
    assert checkpoint.load(out)[1]["epoch"] == state["epoch"]


@pytest.mark.parametrize("plan", [500, 1])
def test_a_budget_run_plans_again_from_its_epochs(data, tmp_path, capsys, monkeypatch, plan):
    """A timing before the first step that was far too slow (500 epochs planned) or too fast (1): the epochs'
    own seconds make the plan the run keeps, in its checkpoint, config.json and image names, and the run
    ends with its schedule, its budget spent."""
    out = tmp_path / "run"
    budget = 0.001 if plan > 1 else 0.002  # minutes: a few of these epochs, or a dozen or more
    monkeypatch.setattr(train_module, "plan_epochs", lambda *args, **kwargs: plan)
    result = main(capsys, *TINY, "--time_budget", str(budget), "--data_dir", data, "--output", out)
    assert result.returncode == 0, result.stderr
    config, state, _ = checkpoint.load(out)
    first = max(1, int(60 * budget / state["history"][0]["seconds"]))
    assert f"so {first} epochs fit the {budget:g} minutes, not the {plan} planned" in result.stdout
    assert config.num_epochs == state["epoch"] != plan
    assert re.search(rf"epoch +{state['epoch']}/{state['epoch']} ", result.stdout)  # its last epoch, as planned
    assert json.loads((out / "config.json").read_text())["num_epochs"] == config.num_epochs
    assert (out / f"PRR_epoch_{state['epoch']:0{config.epoch_digits}d}.jpg").is_file()


def test_the_plan_follows_the_epochs_seconds():
    """Cut by an epoch that no longer fits, lengthened only where 2% more fit, from the recent epochs."""
    def plan(num_epochs, seconds):  # a budget of one minute
        config = Config(time_budget=1.0, num_epochs=num_epochs)
        return train_module.epochs_that_fit(config, [{"seconds": s} for s in seconds])[0]

    assert plan(60, [1.0] * 10) == 60  # 50 s left, 50 epochs more: as planned
    assert plan(60, [2.0] * 10) == 30  # 40 s left at 2 s
    assert plan(60, [0.5] * 10) == 120  # 55 s left at 0.5 s
    assert plan(60, [0.98] * 10) == 60  # 61 fit: not 2% more, the schedule left alone
    assert plan(40, [1.0] * 10 + [2.0] * 10) == 35  # the last ten epochs' 2 s, not the mean of all
    assert plan(10, [7.0] * 9) == 9  # the budget spent: what is done is the plan


def test_a_budget_run_plans_from_a_timing(data, tmp_path, capsys):
    out = tmp_path / "run"
    result = main(capsys, *TINY, "--time_budget", "0.002", "--data_dir", data, "--output", out)
    assert result.returncode == 0, result.stderr
    planned = checkpoint.load(out)[0].num_epochs
    timing = [line for line in result.stdout.splitlines() if line.startswith("time budget 0.002 min: ")]
    assert len(timing) == 1 and re.search(r"planned \d+ epochs", timing[0]), result.stdout
    # the plan then follows the epochs' seconds; a cut of under 2% is not logged, but every epoch line shows it
    epochs = re.findall(r"^epoch +\d+/(\d+) ", result.stdout, re.MULTILINE)
    assert epochs and int(epochs[-1]) == planned, result.stdout
    assert json.loads((out / "config.json").read_text())["num_epochs"] == planned


def test_num_epochs_and_a_budget_together_are_one_line(tmp_path, capsys):
    result = main(capsys, "--num_epochs", "3", "--time_budget", "5", "--output", tmp_path / "x")
    assert_one_line_error(result, "--num_epochs and --time_budget")
    assert not (tmp_path / "x").exists()
