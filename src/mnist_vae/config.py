"""Every setting of a run in one dataclass, with the old program's names and defaults, and the values each accepts."""

import argparse
import dataclasses
import math
from dataclasses import dataclass
from typing import Optional

from .errors import UserError


@dataclass
class Config:
    # The TensorFlow program's flags, names and defaults unchanged.
    dim_z: int = 4                  # latent dimension
    output: str = "results"         # folder for images, metrics and the checkpoint
    dataset: str = "mnist"          # mnist or fashion-mnist
    seed: int = 0
    add_noise: bool = False         # train as a denoising VAE
    noise_factor: float = 0.7       # std of the Gaussian noise added to inputs
    n_hidden: int = 500             # hidden units per MLP layer
    learning_rate: float = 1e-3     # Adam
    num_epochs: int = 40
    batch_size: int = 128
    PRR_n_img_x: int = 10           # reconstruction grid
    PRR_n_img_y: int = 10
    PMLR_n_img_x: int = 20          # manifold grid (dim_z 2)
    PMLR_n_img_y: int = 20
    PMLR_z_range: float = 2.0       # the manifold spans [-r, r]^2
    PMLR_n_samples: int = 5000      # test images in the latent map
    # New in mnist-vae.
    data_dir: Optional[str] = None  # folder with the four IDX files
    likelihood: str = "bernoulli"   # bernoulli or continuous_bernoulli
    binarize: str = "none"          # none, static or dynamic
    dropout: float = 0.1
    eval_k: int = 0                 # importance samples for the final log-likelihood; 0 = skip
    device: str = "auto"            # auto, cpu, cuda or mps
    n_train: int = 0                # use only the first n training images; 0 = all
    n_test: int = 0                 # use only the first n test images; 0 = all
    tensorboard: Optional[str] = None  # folder for TensorBoard logs
    conditional: bool = False       # a conditional VAE: q(z|x, y), p(x|z, y)
    beta: float = 1.0               # the KL's weight in the training loss (beta-VAE)
    kl_warmup: int = 0              # epochs over which that weight rises from 0 to beta
    objective: str = "elbo"         # elbo or iwae
    k_train: int = 1                # importance samples of the iwae objective
    step: str = "auto"              # auto, fused or autograd: how the training step is computed
    threads: int = 0                # torch's threads; 0: every core, fewer while other processes are busy
    precision: str = "fp32"         # fp32, or bf16: bfloat16 products, float32 weights, Adam and loss
    n_layers: int = 2               # hidden layers of each MLP, n_hidden units each
    activation: str = "elu_tanh"    # elu_tanh (the old program's ELU/tanh mix; alias seed), tanh, relu or elu
    model: str = ""                 # a name in model.MODELS; "": vae, or cvae with --conditional
    adam_eps: float = 1e-8          # Adam's epsilon (Burda et al. used 1e-4)
    lr_schedule: str = "constant"   # constant, paper (Burda et al.'s 3^i passes) or cosine
    warmup_epochs: float = 0.0      # raise the learning rate linearly from 0 over the first N epochs
    time_budget: float = 0.0        # minutes of training; plans num_epochs and stops there (0: none)
    gradient: str = "standard"      # standard or dreg: the gradient estimator of --objective iwae
    # Not a flag: the digits of the epoch in image file names, fixed when a run starts (0: not yet),
    # so that a run trained further keeps PRR_epoch_01.jpg beside PRR_epoch_02.jpg, not _003.
    epoch_digits: int = 0

    def __post_init__(self):
        for name, aliases in ALIASES.items():
            setattr(self, name, aliases.get(getattr(self, name), getattr(self, name)))

    def to_dict(self):
        return dataclasses.asdict(self)

    @property
    def z_per_image(self):
        """How many z the training loss draws for each image, and so the decoder's rows per image: k_train
        under --objective iwae, one under the ELBO."""
        return self.k_train if self.objective == "iwae" else 1

    def check(self):
        """Raise ValueError naming the first setting whose value no run can have (a hand-edited file)."""
        defaults = Config()
        for name, (check, _) in SETTINGS.items():
            value, default = getattr(self, name), getattr(defaults, name)
            if value is None and default is None:
                continue
            kind = {bool: bool, int: int, float: (int, float)}.get(type(default), str)
            try:
                if not isinstance(value, kind) or isinstance(value, bool) != (kind is bool):
                    raise argparse.ArgumentTypeError(f"expected {KIND_NAMES[type(default)]}")
                check(str(value))
            except argparse.ArgumentTypeError as e:
                raise SettingError(name, value, str(e)) from None

    def check_combination(self):
        """Raise UserError for settings that are each valid but contradict each other."""
        if self.k_train != 1 and self.objective != "iwae":
            raise UserError(f"--k_train {self.k_train} needs --objective iwae (the ELBO uses one z per image)")
        if self.gradient != "standard" and self.objective != "iwae":
            raise UserError(f"--gradient {self.gradient} needs --objective iwae (it estimates the gradient of the "
                            f"importance-weighted bound)")
        if self.gradient == "dreg" and self.model == "vae2" and self.dropout:
            raise UserError(f"--gradient dreg with --model vae2 needs --dropout 0 (its estimator evaluates q(z2|z1) "
                            f"twice, and dropout would draw a different mask each time)")
        if self.activation == "elu_tanh" and self.n_layers != 2:
            raise UserError(f"--n_layers {self.n_layers} needs --activation tanh, relu or elu (elu_tanh is the old "
                            f"program's two-layer MLP)")

    def check_warmups(self, planned=False):
        """Raise UserError for a warm-up longer than the run: the KL's weight would never reach beta, or the
        learning rate never reach its value (with a warm-up of 1e9 epochs the model never trains).
        `planned`: num_epochs was planned from --time_budget."""
        length = (f"the {self.num_epochs} epochs planned for --time_budget {self.time_budget:g}" if planned
                  else f"the run's {self.num_epochs} epochs")
        advice = "or a longer --time_budget" if planned else "or more --num_epochs"
        if self.kl_warmup > self.num_epochs:
            raise UserError(f"--kl_warmup {self.kl_warmup} is longer than {length}: the KL's weight would never "
                            f"reach --beta; choose --kl_warmup up to {self.num_epochs}, {advice}")
        if self.warmup_epochs > self.num_epochs:
            raise UserError(f"--warmup_epochs {self.warmup_epochs:g} is longer than {length}: the learning rate "
                            f"would never reach --learning_rate; choose --warmup_epochs up to {self.num_epochs}, "
                            f"{advice}")

    @classmethod
    def from_dict(cls, values):
        names = {field.name for field in dataclasses.fields(cls)}
        return cls(**{key: value for key, value in values.items() if key in names})


class SettingError(ValueError):
    """A value no run can have: the setting's name, the value, and what the setting accepts."""

    def __init__(self, name, value, reason):
        super().__init__(f"{name}={value!r}: {reason}")
        self.name, self.value, self.reason = name, value, reason


def bad_value_line(name, value, reason):
    """The one line a bad value gets, through the command line's flag and the API's keyword alike."""
    return f"--{name}={value}: {reason}"


# ---------------------------------------------------------------- the values a setting accepts
# Each check takes the text of a flag and returns its value, or raises ArgumentTypeError
# saying what it accepts: argparse prints that message as the flag's one-line error.

KIND_NAMES = {bool: "True or False", int: "a whole number", float: "a number", str: "text", type(None): "text"}
DATASET_NAMES = ("mnist", "fashion-mnist")

TRUE_WORDS, FALSE_WORDS = ("true", "1", "yes", "y", "on"), ("false", "0", "no", "n", "off")


def boolean(text):
    word = str(text).strip().lower()
    if word in TRUE_WORDS:
        return True
    if word in FALSE_WORDS:
        return False
    raise argparse.ArgumentTypeError(f"expected True or False (also true/false, 1/0, yes/no), got {text!r}")


def integer(low=None, high=None):
    def check(text):
        try:
            value = int(text)
        except ValueError:
            value = None
        if value is None or (low is not None and value < low) or (high is not None and value > high):
            bounds = (f"from {low} to {high}" if high is not None else f"of at least {low}" if low is not None
                      else "")
            raise argparse.ArgumentTypeError(f"expected a whole number {bounds}, got {text!r}".replace("  ", " "))
        return value
    return check


def number(low=0.0, low_open=True, high=None, high_open=True):
    def check(text):
        try:
            value = float(text)
        except ValueError:
            value = math.nan
        ok = (math.isfinite(value) and (value > low if low_open else value >= low)
              and (high is None or (value < high if high_open else value <= high)))
        if not ok:
            bounds = f"{'>' if low_open else '≥'} {low:g}"
            if high is not None:
                bounds += f" and {'<' if high_open else '≤'} {high:g}"
            raise argparse.ArgumentTypeError(f"expected a number {bounds}, got {text!r}")
        return value
    return check


def choice(*names):
    def check(text):
        if text not in names:
            raise argparse.ArgumentTypeError(f"expected one of {', '.join(names)}, got {text!r}")
        return text
    return check


def text(value):
    if not value:
        raise argparse.ArgumentTypeError("expected a non-empty path")
    return value


def identifier(value):
    """A name such as a model's: letters, digits and underscores, or empty for the default."""
    if value and not value.replace("_", "").replace("-", "").isalnum():
        raise argparse.ArgumentTypeError(f"expected a name of letters, digits and underscores, got {value!r}")
    return value


def words(what):
    """A check for text that is not a path (a class, run names): refuses an empty or blank value, saying
    what it expects."""
    def check(value):
        if not value.strip():
            raise argparse.ArgumentTypeError(f"expected {what}, got {value!r}")
        return value
    return check


# Every setting of Config: the check of its value, and what it means (the flag's help).
SETTINGS = {
    "dim_z": (integer(1), "dimension of the latent vector z"),
    "output": (text, "folder for images, metrics and the checkpoint (created if missing)"),
    "dataset": (choice(*DATASET_NAMES), "mnist or fashion-mnist"),
    "seed": (integer(0, 2**63 - 1), "random seed; the same seed on the same machine gives the same run"),
    "add_noise": (boolean, "train as a denoising VAE: Gaussian noise on every input batch"),
    "noise_factor": (number(0.0, low_open=False), "standard deviation of that noise"),
    "n_hidden": (integer(1), "hidden units in each MLP layer"),
    "learning_rate": (number(0.0), "learning rate of the Adam optimizer"),
    "num_epochs": (integer(1), "number of epochs to train"),
    "batch_size": (integer(1), "images per training batch"),
    "PRR_n_img_x": (integer(1), "reconstruction grid: images across"),
    "PRR_n_img_y": (integer(1), "reconstruction grid: images down"),
    "PMLR_n_img_x": (integer(1), "manifold grid (dim_z 2): images across"),
    "PMLR_n_img_y": (integer(1), "manifold grid (dim_z 2): images down"),
    "PMLR_z_range": (number(0.0), "the manifold image spans [-r, r] in both latent axes"),
    "PMLR_n_samples": (integer(1, 10000), "test images in the latent map (dim_z 2)"),
    "data_dir": (text, "folder holding the four IDX files (.gz or raw) of the dataset"),
    "likelihood": (choice("bernoulli", "continuous_bernoulli"), "pixel likelihood p(x|z)"),
    "binarize": (choice("none", "static", "dynamic"),
                 "none: grey levels; static: binarized once; dynamic: resampled every epoch"),
    "dropout": (number(0.0, low_open=False, high=1.0), "dropout rate in the MLPs while training"),
    "eval_k": (integer(0), "after training, estimate log p(x) with K importance samples (0: skip)"),
    "device": (choice("auto", "cpu", "cuda", "mps"), "where to train: auto picks cuda, then mps, then cpu"),
    "n_train": (integer(0), "train on the first N training images only (0: all)"),
    "n_test": (integer(0), "evaluate on the first N test images only (0: all)"),
    "tensorboard": (text, "also log scalars and images for TensorBoard into this folder"),
    "conditional": (boolean, "a conditional VAE: encoder and decoder see the image's label, so you choose "
                             "the class it generates"),
    "beta": (number(0.0, low_open=False), "weight of the KL in the training loss (beta-VAE); metrics stay the true ELBO"),
    "kl_warmup": (integer(0), "raise the KL's weight linearly from 0 to --beta over the first N epochs"),
    "objective": (choice("elbo", "iwae"), "training objective: the ELBO, or the importance-weighted bound"),
    "k_train": (integer(1, 1000), "importance samples per image of --objective iwae (1 is the ELBO)"),
    "step": (choice("auto", "fused", "autograd"), "training step: auto uses the fused one where it computes "
                                                  "the same as autograd"),
    "threads": (integer(0), "CPU threads: 0 uses every core and fewer while other processes take some "
                            "(results are the same); N fixes N"),
    "precision": (choice("fp32", "bf16"), "fp32, or bf16: mixed precision, bfloat16 matrix products with float32 "
                                          "weights, Adam, loss and evaluation (where the hardware has bfloat16)"),
    "n_layers": (integer(1, 100), "hidden layers in each MLP (encoder and decoder), --n_hidden units each"),
    "activation": (choice("elu_tanh", "seed", "tanh", "relu", "elu"),
                   "the MLPs' activation; elu_tanh (or seed): the old program's ELU and tanh mix (two layers)"),
    "adam_eps": (number(0.0), "epsilon of the Adam optimizer"),
    "lr_schedule": (choice("constant", "paper", "cosine"),
                    "learning rate over the run: constant; paper: Burda et al.'s passes of 3^i epochs at "
                    "10^(-i/7) times it, scaled to --num_epochs; cosine: decay to 0"),
    "warmup_epochs": (number(0.0, low_open=False), "raise the learning rate linearly from 0 over the first N "
                                                   "epochs, step by step"),
    "model": (identifier, "the model to train, by its name in mnist_vae.model.MODELS (default: vae, or cvae with "
                    "--conditional); a model class registered there by the user trains the same way"),
    "time_budget": (number(0.0, low_open=False), "minutes of training: --num_epochs is planned from a timing of "
                                                 "the first steps, and training stops when they are spent (0: none)"),
    "gradient": (choice("standard", "dreg"), "gradient of --objective iwae: standard, or dreg (Tucker et al.'s "
                                             "doubly reparameterised estimator: the same objective, a lower-variance "
                                             "gradient for the encoder)"),
}


# Other names a setting's values are known by: the old program's MLP was once called "seed".
ALIASES = {"activation": {"seed": "elu_tanh"}}

# Settings that change what the trained model is; --resume refuses to change them.
MODEL_DEFINING = (
    "dim_z", "dataset", "seed", "add_noise", "noise_factor", "n_hidden", "learning_rate",
    "batch_size", "likelihood", "binarize", "dropout", "n_train", "n_test",
    "conditional", "beta", "kl_warmup", "objective", "k_train", "precision",
    "n_layers", "activation", "model", "adam_eps", "lr_schedule", "warmup_epochs", "time_budget", "gradient",
)


def fixed_length(config):
    """Why the run's number of epochs was fixed when it started (its learning rate follows a schedule
    over them, or they were planned from a time budget); None if a resume may train further."""
    if config.time_budget:
        return f"planned from --time_budget {config.time_budget:g}"
    if config.lr_schedule != "constant":
        return f"the span of its --lr_schedule {config.lr_schedule}"
    return None


def resume_conflict(saved, given, run_dir):
    """What forbids resuming the run in `run_dir`, of config `saved`, with the settings `given` (a dict):
    one line, or None."""
    for name in MODEL_DEFINING:
        if name in given and ALIASES.get(name, {}).get(given[name], given[name]) != getattr(saved, name):
            return (f"--{name} {given[name]} contradicts the run in {run_dir}, which has {name}="
                    f"{getattr(saved, name)}; drop the flag to resume, or start a new run with another --output")
    if "num_epochs" in given and given["num_epochs"] != saved.num_epochs and fixed_length(saved):
        return (f"--num_epochs {given['num_epochs']}: the run's {saved.num_epochs} epochs are "
                f"{fixed_length(saved)}, fixed when it started; drop --num_epochs to resume, or start a new run")
    return None


