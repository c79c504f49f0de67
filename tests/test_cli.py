"""The command line: every flag check is a one-line error with exit status 2, the boolean forms,
dash spellings, the old program's defaults, and --help."""

import pytest

from conftest import assert_one_line_error, run_cli, run_command
from mnist_vae import arguments, cli, loop
from mnist_vae.config import Config


@pytest.fixture(autouse=True)
def no_training(monkeypatch, tmp_path):
    """A flag wrongly accepted must not start a real run in these tests: fail instead."""
    monkeypatch.chdir(tmp_path)

    def refuse(*args, **kwargs):
        raise AssertionError("the arguments were accepted and training started")

    monkeypatch.setattr(loop, "train", refuse)


def error_of(args, capsys):
    """Run cli.main in-process; return (exit status, the lines on stderr)."""
    with pytest.raises(SystemExit) as excinfo:
        cli.main(list(args), prog="mnist-vae")
    captured = capsys.readouterr()
    assert captured.out == ""
    lines = [line for line in captured.err.splitlines() if line.strip()]
    return excinfo.value.code, lines


BAD_VALUES = [
    ("dim_z", "0"), ("dim_z", "-3"),
    ("batch_size", "0"), ("batch_size", "-1"),
    ("learning_rate", "0"), ("learning_rate", "-0.001"),
    ("PRR_n_img_x", "0"), ("PRR_n_img_y", "0"), ("PMLR_n_img_x", "0"), ("PMLR_n_img_y", "-2"),
    ("PMLR_z_range", "0"), ("PMLR_z_range", "-1.5"),
    ("PMLR_n_samples", "0"), ("PMLR_n_samples", "10001"),
    ("dataset", "cifar10"), ("dataset", "MNIST"),
    # not numbers
    ("dim_z", "two"), ("dim_z", "2.5"), ("num_epochs", "1e3"), ("seed", "x"), ("n_hidden", ""),
    ("PRR_n_img_x", "ten"), ("PMLR_n_samples", "5k"),
    ("learning_rate", "fast"), ("noise_factor", "0,7"), ("PMLR_z_range", ""),
    # not finite
    ("learning_rate", "nan"), ("learning_rate", "inf"), ("noise_factor", "NaN"), ("noise_factor", "inf"),
    ("PMLR_z_range", "inf"), ("PMLR_z_range", "-inf"),
    # not a boolean word
    ("add_noise", "maybe"), ("add_noise", "2"), ("add_noise", "Truee"),
]


@pytest.mark.parametrize("name,value", BAD_VALUES)
def test_bad_value_is_one_line_exit_2(name, value, capsys):
    # "-inf" would be taken for a flag after a space; the = form passes it as the value.
    code, lines = error_of([f"--{name}={value}"] if value.startswith("-") else [f"--{name}", value], capsys)
    assert code == 2
    assert len(lines) == 1, lines
    assert lines[0].startswith("mnist-vae: error:")
    assert f"--{name}" in lines[0]
    assert repr(value) in lines[0]  # the offending value is quoted back


@pytest.mark.parametrize("name,value", BAD_VALUES[::7])
def test_bad_value_among_good_ones(name, value, capsys):
    """The one bad flag is named even when others around it are fine."""
    code, lines = error_of(["--num_epochs", "3", f"--{name}", value, "--batch_size", "64"], capsys)
    assert code == 2 and len(lines) == 1 and f"--{name}" in lines[0]


@pytest.mark.parametrize("args,needle", [
    (["--no_such_flag", "1"], "--no_such_flag"),
    (["--dim_z"], "--dim_z"),  # the value is missing
])
def test_unknown_or_incomplete_flag(args, needle, capsys):
    code, lines = error_of(args, capsys)
    assert code == 2 and len(lines) == 1 and needle in lines[0]


@pytest.mark.parametrize("args,flag", [
    (["--dim_z", "0"], "--dim_z"),
    (["--PMLR_n_samples", "10001"], "--PMLR_n_samples"),
    (["--learning_rate", "nan"], "--learning_rate"),
    (["--dataset", "cifar10"], "--dataset"),
])
def test_bad_value_subprocess(args, flag):
    assert_one_line_error(run_cli(*args), flag, code=2)


def test_train_subcommand_fails_the_same_way(capsys):
    plain = run_command("--dim_z", "0")
    explicit = run_command("train", "--dim_z", "0")
    assert_one_line_error(plain, "--dim_z", code=2)
    assert_one_line_error(explicit, "--dim_z", code=2)
    assert plain.stderr.replace("mnist-vae train", "mnist-vae") == explicit.stderr.replace("mnist-vae train",
                                                                                          "mnist-vae")
    code, lines = error_of(["train", "--dim_z", "0"], capsys)
    assert code == 2 and len(lines) == 1 and "--dim_z" in lines[0]


# ---------------------------------------------------------------- values accepted


def parse(*args):
    return arguments.train_parser("x").parse_args(list(args))


@pytest.mark.parametrize("word,meaning", [
    ("True", True), ("False", False), ("true", True), ("false", False), ("1", True), ("0", False),
    ("yes", True), ("no", False), ("YES", True), ("No", False),
])
def test_boolean_words(word, meaning):
    assert parse("--add_noise", word).add_noise is meaning
    assert parse("--add-noise", word).add_noise is meaning


def test_bare_boolean_flag():
    assert parse("--add_noise").add_noise is True
    args = parse("--add_noise", "--dim_z", "3")
    assert args.add_noise is True and args.dim_z == 3
    assert not hasattr(parse(), "add_noise")  # absent: left to the Config default (False)
    assert Config(**vars(parse("--add_noise"))).add_noise is True


def test_range_ends_are_accepted():
    assert parse("--PMLR_n_samples", "1").PMLR_n_samples == 1
    assert parse("--PMLR_n_samples", "10000").PMLR_n_samples == 10000
    assert parse("--dim_z", "1", "--batch_size", "1").dim_z == 1
    assert parse("--learning_rate", "1e-9").learning_rate == 1e-9
    assert parse("--noise_factor", "0").noise_factor == 0.0
    assert parse("--PMLR_z_range", "0.01").PMLR_z_range == 0.01
    for flag in ("PRR_n_img_x", "PRR_n_img_y", "PMLR_n_img_x", "PMLR_n_img_y"):
        assert getattr(parse(f"--{flag}", "1"), flag) == 1
    assert parse("--dataset", "fashion-mnist").dataset == "fashion-mnist"


def test_dash_spellings_mean_the_same():
    dashed = parse("--dim-z", "3", "--num-epochs", "2", "--PRR-n-img-x", "5", "--learning-rate", "0.01",
                   "--data-dir", "somewhere")
    underscored = parse("--dim_z", "3", "--num_epochs", "2", "--PRR_n_img_x", "5", "--learning_rate", "0.01",
                        "--data_dir", "somewhere")
    assert vars(dashed) == vars(underscored) == {"dim_z": 3, "num_epochs": 2, "PRR_n_img_x": 5,
                                                 "learning_rate": 0.01, "data_dir": "somewhere"}


def test_defaults_of_the_old_program():
    given = vars(parse())
    given.pop("resume", None), given.pop("overwrite", None)
    config = Config(**given)
    expected = {
        "dim_z": 4, "output": "results", "dataset": "mnist", "seed": 0, "add_noise": False,
        "noise_factor": 0.7, "n_hidden": 500, "learning_rate": 1e-3, "num_epochs": 40, "batch_size": 128,
        "PRR_n_img_x": 10, "PRR_n_img_y": 10, "PMLR_n_img_x": 20, "PMLR_n_img_y": 20,
        "PMLR_z_range": 2.0, "PMLR_n_samples": 5000, "data_dir": None,
    }
    for name, value in expected.items():
        assert getattr(config, name) == value and type(getattr(config, name)) is type(value), name


def test_given_values_reach_the_config():
    config = Config(**vars(parse("--dim_z", "7", "--add_noise", "yes", "--noise_factor", "0.25",
                                 "--PMLR_z_range", "3", "--output", "runs/a")))
    assert (config.dim_z, config.add_noise, config.noise_factor, config.PMLR_z_range, config.output) == (
        7, True, 0.25, 3.0, "runs/a")
    assert config.num_epochs == 40 and config.batch_size == 128


# ---------------------------------------------------------------- --help


@pytest.mark.parametrize("how", ["main.py", "mnist-vae", "mnist-vae train"])
def test_help(how):
    if how == "main.py":
        result = run_cli("--help")
    elif how == "mnist-vae":
        result = run_command("--help")
    else:
        result = run_command("train", "--help")
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    assert "--dim_z" in result.stdout and "--PMLR_n_samples" in result.stdout and "--add_noise" in result.stdout
    assert "usage:" in result.stdout
    assert ("main.py" if how == "main.py" else "mnist-vae") in result.stdout.splitlines()[0]
