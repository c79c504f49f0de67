"""Every setting of a run in one dataclass, with the old program's names and defaults."""

import dataclasses
import json
from dataclasses import dataclass
from typing import Optional


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

    def to_dict(self):
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values):
        names = {field.name for field in dataclasses.fields(cls)}
        return cls(**{key: value for key, value in values.items() if key in names})


class UserError(Exception):
    """A mistake or a problem the user can fix: reported as one line, no traceback."""

    exit_code = 1


class Interrupted(Exception):
    """Training stopped by a signal after writing a checkpoint; exit with `exit_code` (128 + signal)."""

    def __init__(self, exit_code):
        super().__init__(exit_code)
        self.exit_code = exit_code


# Settings that change what the trained model is; --resume refuses to change them.
MODEL_DEFINING = (
    "dim_z", "dataset", "seed", "add_noise", "noise_factor", "n_hidden", "learning_rate",
    "batch_size", "likelihood", "binarize", "dropout", "n_train", "n_test",
)


def write_json(path, values):
    with open(path, "w") as f:
        json.dump(values, f, indent=2)
        f.write("\n")
