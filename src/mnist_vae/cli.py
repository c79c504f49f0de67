"""The command line: the old program's flags for training, and subcommands for trained models.

Heavy modules (torch, matplotlib) are imported inside the commands, so that
`--help` and flag errors answer at once.
"""

import argparse
import dataclasses
import math
import sys
from pathlib import Path

from .config import MODEL_DEFINING, SETTINGS, Config, Interrupted, UserError, boolean, choice, integer, text


class Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line and exit status 2."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message}\n")


def _flag(parser, name, check, help_text, **kwargs):
    spellings = [f"--{name}"] + ([f"--{name.replace('_', '-')}"] if "_" in name else [])
    parser.add_argument(*spellings, dest=name, type=check, help=help_text, **kwargs)


def train_parser(prog):
    defaults = Config()
    parser = Parser(
        prog=prog, argument_default=argparse.SUPPRESS,
        description="Train a variational auto-encoder on MNIST or Fashion-MNIST and write its pictures, "
                    "metrics and checkpoint into --output.",
        epilog="other commands: evaluate, sample, reconstruct, denoise, interpolate, explore, bench, reproduce "
               f"({prog} COMMAND --help)")
    for name, (check, help_text) in SETTINGS.items():
        default = getattr(defaults, name)
        extra = {"nargs": "?", "const": True, "metavar": "BOOL"} if check is boolean else {}
        _flag(parser, name, check, f"{help_text} (default: {default})", **extra)
    parser.add_argument("--resume", metavar="RUN_DIR", type=text,
                        help="continue the interrupted or finished run in RUN_DIR")
    parser.add_argument("--overwrite", nargs="?", const=True, type=boolean, metavar="BOOL",
                        help="write over the files of an earlier run in --output")
    return parser


# ---------------------------------------------------------------- commands

def command_train(prog, args):
    given = vars(train_parser(prog).parse_args(args))
    resume, overwrite = given.pop("resume", None), given.pop("overwrite", False)
    from . import checkpoint

    if resume is not None:
        saved, state, _ = checkpoint.load(resume)
        for name in MODEL_DEFINING:
            if name in given and given[name] != getattr(saved, name):
                raise UserError(f"--{name} {given[name]} contradicts the run in {resume}, which has "
                                f"{name}={getattr(saved, name)}; drop the flag to resume, or start a new run "
                                f"with another --output")
        if "output" in given and Path(given["output"]).resolve() != Path(resume).resolve():
            raise UserError(f"--output {given['output']} differs from --resume {resume}; a resumed run "
                            f"writes into its own folder, so drop --output")
        config = dataclasses.replace(saved, **{**given, "output": resume})
        if state["epoch"] >= config.num_epochs:
            print(f"{resume} has finished all {state['epoch']} epochs; to train further, "
                  f"pass --num_epochs with more than {state['epoch']}")
            return 0
    else:
        config = Config(**given)
    if config.tensorboard:
        try:
            import torch.utils.tensorboard  # noqa: F401
        except ImportError:
            raise UserError("--tensorboard needs the tensorboard package: pip install 'mnist-vae[tensorboard]' "
                            "(or pip install tensorboard)") from None
    from .train import train

    train(config, resume=resume is not None, overwrite=bool(overwrite))
    return 0


def _run_parser(prog, command, description):
    parser = Parser(prog=f"{prog} {command}", description=description)
    parser.add_argument("run_dir", metavar="RUN_DIR", help="the --output folder of a training run")
    parser.add_argument("--device", type=choice("auto", "cpu", "cuda", "mps"), default="cpu",
                        help="where to compute (default: cpu)")
    return parser


def _load_run(args):
    from . import checkpoint
    from .train import resolve_device

    device = resolve_device(args.device)
    config, state, tensors = checkpoint.load(args.run_dir)
    model = checkpoint.build_model(config, tensors, Path(args.run_dir) / checkpoint.FILENAME).to(device).eval()
    return config, state, model, device


def command_evaluate(prog, args):
    parser = _run_parser(prog, "evaluate", "Test metrics of a trained model, and its importance-weighted "
                                           "log-likelihood estimate.")
    parser.add_argument("--k", type=integer(0), default=1000,
                        help="importance samples per test image for the log-likelihood (0: skip; default 1000)")
    parser.add_argument("--data_dir", "--data-dir", type=text, help="folder with the dataset's IDX files")
    parser.add_argument("--n_test", "--n-test", type=integer(0), default=0,
                        help="use the first N test images only (0: all)")
    args = parser.parse_args(args)
    from .train import evaluate, load_tensors, log_likelihood_estimate

    config, state, model, device = _load_run(args)
    config = dataclasses.replace(config, data_dir=args.data_dir or config.data_dir, n_test=args.n_test,
                                 n_train=1)
    test = load_tensors(config, device).test
    neg_elbo, recon, kl = evaluate(model, test)
    print(f"run: {args.run_dir} ({config.dataset}, dim_z={config.dim_z}, likelihood={config.likelihood}, "
          f"binarize={config.binarize}, {state['epoch']} epochs)")
    print(f"test images: {len(test)}")
    print(f"test -ELBO: {neg_elbo:.3f} nats per image (reconstruction {recon:.3f}, KL {kl:.3f})")
    if args.k > 0:
        nll, stderr = log_likelihood_estimate(model, test, args.k)
        print(f"test NLL (importance weighted, k={args.k}): {nll:.3f} ± {stderr:.3f} nats per image "
              f"(± one standard error)")
    return 0


def _grid_shape(n):
    columns = math.ceil(math.sqrt(n))
    return columns, math.ceil(n / columns)


def command_sample(prog, args):
    parser = _run_parser(prog, "sample", "Images decoded from z drawn from the prior N(0, I).")
    parser.add_argument("--n", type=integer(1, 10000), default=64, help="how many images (default 64)")
    parser.add_argument("--out", type=text, help="image file to write (default: RUN_DIR/samples.png)")
    parser.add_argument("--seed", type=integer(0, 2**63 - 1), default=0, help="seed of the draws (default 0)")
    args = parser.parse_args(args)
    import torch

    from .plots import save_grid
    from .train import decode_images

    config, _, model, device = _load_run(args)
    z = torch.randn((args.n, config.dim_z), generator=torch.Generator().manual_seed(args.seed)).to(device)
    out = Path(args.out or Path(args.run_dir) / "samples.png")
    save_grid(decode_images(model, z).cpu().numpy(), *_grid_shape(args.n), _writable(out))
    print(f"wrote {args.n} samples to {out}")
    return 0


def _writable(path):
    path = Path(path)
    if path.is_dir():
        raise UserError(f"--out {path} is a folder; give a file name such as {path / 'out.png'}")
    if not path.parent.is_dir():
        raise UserError(f"--out {path}: folder {path.parent} does not exist; create it or choose another path")
    if path.suffix.lower() not in (".png", ".jpg", ".jpeg"):
        raise UserError(f"--out {path}: give a .png or .jpg file name")
    return path


def _load_images(paths, device):
    import numpy as np
    import torch

    from .data import load_user_image

    return torch.from_numpy(np.stack([load_user_image(path) for path in paths])).to(device)


def command_reconstruct(prog, args, denoise=False):
    name = "denoise" if denoise else "reconstruct"
    parser = _run_parser(prog, name, "Restore your own noisy images with a denoising run; the picture shows "
                                     "input and result side by side." if denoise else
                         "Reconstruct your own images (PNG or JPEG, any size or colour; light backgrounds are "
                         "inverted); the picture shows input and result side by side.")
    parser.add_argument("images", nargs="+", metavar="IMAGE", help="PNG or JPEG files")
    parser.add_argument("--out", type=text, help=f"image file to write (default: RUN_DIR/{name}.png)")
    if denoise:
        parser.add_argument("--add_noise", "--add-noise", nargs="?", const=True, type=boolean, default=False,
                            metavar="BOOL", help="first add the run's training noise to the images (a demo)")
    args = parser.parse_args(args)
    from .plots import side_by_side
    from .train import add_noise, reconstruct

    config, _, model, device = _load_run(args)
    images = _load_images(args.images, device)
    out = _writable(args.out or Path(args.run_dir) / f"{name}.png")
    columns = [images.cpu().numpy()]
    if denoise:
        if not config.add_noise:
            print(f"note: {args.run_dir} was not trained with --add_noise; this is a plain reconstruction")
        if args.add_noise:
            import torch

            images = add_noise(images, config.noise_factor, torch.Generator().manual_seed(0))
            columns.append(images.cpu().numpy())
    columns.append(reconstruct(model, images).cpu().numpy())
    side_by_side(columns, out)
    print(f"wrote {out} ({len(args.images)} row{'s' if len(args.images) > 1 else ''}: " + " | ".join(
        ["input", "noisy input", "restored"] if len(columns) == 3 else
        ["input", "restored" if denoise else "reconstruction"]) + ")")
    return 0


def command_denoise(prog, args):
    return command_reconstruct(prog, args, denoise=True)


def command_interpolate(prog, args):
    parser = _run_parser(prog, "interpolate", "Decoded images along the straight line between the latent "
                                              "means of two images.")
    parser.add_argument("--from", dest="start", required=True, type=text, metavar="IMAGE", help="first image")
    parser.add_argument("--to", dest="end", required=True, type=text, metavar="IMAGE", help="last image")
    parser.add_argument("--steps", type=integer(2, 100), default=10, help="images along the line (default 10)")
    parser.add_argument("--out", type=text, help="image file to write (default: RUN_DIR/interpolate.png)")
    args = parser.parse_args(args)
    import torch

    from .plots import save_grid
    from .train import decode_images

    config, _, model, device = _load_run(args)
    images = _load_images([args.start, args.end], device)
    out = _writable(args.out or Path(args.run_dir) / "interpolate.png")
    with torch.no_grad():
        mu, _ = model.encode(images)
    weights = torch.linspace(0, 1, args.steps, device=device)[:, None]
    z = (1 - weights) * mu[0] + weights * mu[1]
    save_grid(decode_images(model, z).cpu().numpy(), args.steps, 1, out)
    print(f"wrote {args.steps} images from {args.start} to {args.end} into {out}")
    return 0


def command_bench(prog, args):
    from .bench import main as bench_main

    return bench_main(prog, args)


def command_explore(prog, args):
    from .explore import command_explore as explore_main

    return explore_main(prog, args)


def command_reproduce(prog, args):
    from .reproduce import main as reproduce_main

    return reproduce_main(prog, args)


COMMANDS = {
    "train": command_train, "evaluate": command_evaluate, "sample": command_sample,
    "reconstruct": command_reconstruct, "denoise": command_denoise, "interpolate": command_interpolate,
    "explore": command_explore, "bench": command_bench, "reproduce": command_reproduce,
}


def main(argv=None, prog=None):
    """Run a command; return its exit status. User errors print one line, never a traceback."""
    argv = list(sys.argv[1:] if argv is None else argv)
    prog = prog or ("mnist-vae" if Path(sys.argv[0]).name != "main.py" else "main.py")
    command = "train"
    if argv and argv[0] in COMMANDS:
        command = argv.pop(0)
    try:
        return COMMANDS[command](prog, argv) or 0
    except UserError as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return e.exit_code
    except Interrupted as e:
        return e.exit_code
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
