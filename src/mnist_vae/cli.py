"""The command line: the old program's flags for training, and subcommands for trained models.

Heavy modules (torch, matplotlib) are imported inside the commands, so that
`--help` and flag errors answer at once.
"""

import argparse
import dataclasses
import math
import os
import sys
from pathlib import Path

from . import files, runs
from .config import SETTINGS, Config, Interrupted, UserError, boolean, choice, integer, resume_conflict, text


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
        epilog="other commands: evaluate, sample, reconstruct, denoise, interpolate, classify, analogies, export, "
               "explore, bench, reproduce, sweep "
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
    # The run folder's lock comes first, before torch loads: of two runs started into one folder a moment
    # apart, the first keeps it and the second is refused at once (released when main() returns).
    if resume is None:
        runs.hold(given.get("output", Config().output))
    elif os.path.isdir(resume):  # else checkpoint.load says what is wrong with it
        runs.hold(resume, create=False, what="--resume")
    from . import checkpoint

    if resume is not None:
        saved, state, _ = checkpoint.load(resume)
        conflict = resume_conflict(saved, given, resume)
        if conflict:
            raise UserError(conflict)
        if "output" in given and Path(given["output"]).resolve() != Path(resume).resolve():
            raise UserError(f"--output {given['output']} differs from --resume {resume}; a resumed run "
                            f"writes into its own folder, so drop --output")
        config = dataclasses.replace(saved, **{**given, "output": resume})
        if runs.training_done(config, state) and not _estimate_missing(config, resume):
            print(runs.finished_message(resume, config, state))
            return 0
    else:
        if "num_epochs" in given and given.get("time_budget"):
            raise UserError("--num_epochs and --time_budget both set how long the run trains; give one of them")
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


def _estimate_missing(config, run_dir):
    """Whether a finished run still owes its --eval_k estimate (one interrupted by a signal)."""
    return config.eval_k > 0 and not (Path(run_dir) / "evaluation.json").exists()


def _run_parser(prog, command, description):
    parser = Parser(prog=f"{prog} {command}", description=description)
    parser.add_argument("run_dir", metavar="RUN_DIR", help="the --output folder of a training run, or `pretrained` "
                                                           "for the model shipped with mnist-vae")
    parser.add_argument("--device", type=choice("auto", "cpu", "cuda", "mps"), default="cpu",
                        help="where to compute (default: cpu)")
    return parser


def _load_run(args):
    """(config, state, the model in eval mode, device) of RUN_DIR: a run folder, or `pretrained`."""
    from . import api

    model = api.load(args.run_dir, device=args.device)
    return model.config, {"epoch": model.epoch}, model.module.eval(), model.device


def _default_out(args, name):
    """Where a command writes by default: into the run folder, or the current folder for the packaged model."""
    from .api import PRETRAINED

    run_dir = Path(args.run_dir)
    return Path(name) if str(run_dir) == PRETRAINED and not run_dir.is_dir() else run_dir / name


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
    tensors = load_tensors(config, device)
    test, labels = tensors.test, tensors.test_y if model.conditional else None
    neg_elbo, recon, kl = evaluate(model, test, labels=labels)
    given = " of log p(x|y)" if model.conditional else ""
    print(f"run: {args.run_dir} ({config.dataset}, dim_z={config.dim_z}, likelihood={config.likelihood}, "
          f"binarize={config.binarize}, {state['epoch']} epochs)")
    print(f"test images: {len(test)}")
    print(f"test -ELBO{given}: {neg_elbo:.3f} nats per image (reconstruction {recon:.3f}, KL {kl:.3f})")
    if model.conditional:
        from .train import classifier_accuracy

        print(f"test accuracy as a classifier (highest ELBO): {classifier_accuracy(model, test, labels):.4f}")
    if args.k > 0:
        nll, stderr = log_likelihood_estimate(model, test, args.k, labels=labels)
        what = f"test NLL{' -log p(x|y)' if model.conditional else ''} (importance weighted, k={args.k})"
        print(f"{what}: {nll:.3f} ± {stderr:.3f} nats per image (± one standard error)" if math.isfinite(stderr)
              else f"{what}: {nll:.3f} nats per image (one test image: no standard error)")
    return 0


def _grid_shape(n):
    columns = math.ceil(math.sqrt(n))
    return columns, math.ceil(n / columns)


def command_sample(prog, args):
    parser = _run_parser(prog, "sample", "Images decoded from z drawn from the prior N(0, I); of a class you "
                                         "choose, for a run trained with --conditional.")
    parser.add_argument("--n", type=integer(1, 10000), default=64, help="how many images (default 64)")
    parser.add_argument("--out", type=text, help="image file to write (default: RUN_DIR/samples.png)")
    parser.add_argument("--seed", type=integer(0, 2**63 - 1), default=0, help="seed of the draws (default 0)")
    parser.add_argument("--class", dest="label", type=text, metavar="CLASS",
                        help="conditional runs: the class to generate, a digit or a Fashion-MNIST class name "
                             "(sneaker); without it, every class in turn")
    args = parser.parse_args(args)
    import torch

    from .plots import save_grid
    from .train import decode_images

    config, _, model, device = _load_run(args)
    labels, what = None, "samples"
    if model.conditional:
        if args.label is None:
            labels, what = torch.arange(args.n, device=device) % model.n_classes, "samples, every class in turn,"
        else:
            label = class_index(args.label, config.dataset)
            labels, what = torch.full((args.n,), label, device=device), f"samples of class {_class_names(config)[label]}"
    elif args.label is not None:
        raise UserError(f"--class needs a run trained with --conditional; {args.run_dir} was not")
    z = torch.randn((args.n, config.dim_z), generator=torch.Generator().manual_seed(args.seed)).to(device)
    out = Path(args.out or _default_out(args, "samples.png"))
    columns = model.n_classes if labels is not None and args.label is None else _grid_shape(args.n)[0]
    save_grid(decode_images(model, z, labels).cpu().numpy(), columns, math.ceil(args.n / columns), _writable(out))
    print(f"wrote {args.n} {what} to {out}")
    return 0


def _class_names(config):
    from .data import DATASETS

    return DATASETS[config.dataset]["classes"]


def class_index(name, dataset):
    """The index of a class given as its number or its name, case-insensitive (7, sneaker, ankle boot)."""
    from .data import DATASETS

    classes = DATASETS[dataset]["classes"]
    wanted = name.strip().lower()
    for index, known in enumerate(classes):
        if wanted in (str(index), known.lower(), known.lower().replace("/", " "), known.lower().split("/")[0]):
            return index
    raise UserError(f"--class {name}: {dataset} has no such class; give one of "
                    + ", ".join(f"{i} ({c})" if c != str(i) else c for i, c in enumerate(classes)))


def _conditional_run(args, command):
    config, state, model, device = _load_run(args)
    if not model.conditional:
        raise UserError(f"{command} needs a run trained with --conditional; {args.run_dir} was not "
                        f"(train one: mnist-vae --conditional --output RUN)")
    return config, state, model, device


def command_classify(prog, args):
    parser = _run_parser(prog, "classify", "The class of your own images by a conditional run: the class y of "
                                           "highest log p(x|y) + log p(y), each bounded with K importance samples; "
                                           "prints each image's class and the probabilities of all classes.")
    parser.add_argument("images", nargs="+", metavar="IMAGE", help="PNG or JPEG files")
    parser.add_argument("--k", type=integer(1, 100000), default=100,
                        help="importance samples per image and class (1: the ELBO; default 100)")
    args = parser.parse_args(args)
    from .model import classify

    config, _, model, device = _conditional_run(args, "classify")
    names = _class_names(config)
    probabilities = classify(model, _load_images(args.images, device), k=args.k).exp().cpu()
    for path, p in zip(args.images, probabilities):
        best = int(p.argmax())
        print(f"{path}: {names[best]} (p={p[best]:.3f})  " + "  ".join(f"{c}:{q:.3f}" for c, q in zip(names, p)))
    return 0


def command_analogies(prog, args):
    parser = _run_parser(prog, "analogies", "Your own images written in their style as every class by a "
                                            "conditional run: each row shows an image, then its z decoded with "
                                            "each class.")
    parser.add_argument("images", nargs="+", metavar="IMAGE", help="PNG or JPEG files")
    parser.add_argument("--label", type=text, metavar="CLASS",
                        help="the class of the images (a digit or a class name); without it, each is classified")
    parser.add_argument("--out", type=text, help="image file to write (default: RUN_DIR/analogies.png)")
    args = parser.parse_args(args)
    import torch

    from .model import analogies, classify
    from .plots import side_by_side

    config, _, model, device = _conditional_run(args, "analogies")
    names = _class_names(config)
    images = _load_images(args.images, device)
    out = _writable(args.out or _default_out(args, "analogies.png"))
    if args.label is not None:
        labels = torch.full((len(images),), class_index(args.label, config.dataset), device=device)
    else:
        labels = classify(model, images, k=100).argmax(1)
        for path, label in zip(args.images, labels.tolist()):
            print(f"{path}: read as {names[label]} (give --label to choose)")
    styles = analogies(model, images, labels).cpu().numpy()
    side_by_side([images.cpu().numpy()] + [styles[:, c] for c in range(model.n_classes)], out)
    print(f"wrote {out} ({len(images)} row{'s' if len(images) > 1 else ''}: input | "
          + " | ".join(names) + ")")
    return 0


def _writable(path):
    path = Path(path)
    try:
        if path.is_dir():
            raise UserError(f"--out {path} is a folder; give a file name such as {path / 'out.png'}")
        if not path.parent.is_dir():
            raise UserError(f"--out {path}: folder {path.parent} does not exist; create it or choose another path")
    except OSError as e:  # a name too long, a part of the path a file
        raise files.WriteError(files.error_line(path, e)) from None
    if path.suffix.lower() not in (".png", ".jpg", ".jpeg"):
        raise UserError(f"--out {path}: give a .png or .jpg file name")
    runs.hold_if_run(path.parent)  # writing into a run folder: not while another process uses it
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
    out = _writable(args.out or _default_out(args, f"{name}.png"))
    from .limits import check_image

    check_image(out, 3 * 30, len(args.images) * 30, f"{len(args.images)} images")
    columns = [images.cpu().numpy()]
    if denoise:
        if not config.add_noise:
            print(f"note: {args.run_dir} was not trained with --add_noise; this is a plain reconstruction")
        if args.add_noise:
            import torch

            images = add_noise(images, config.noise_factor, torch.Generator().manual_seed(0))
            columns.append(images.cpu().numpy())
    labels = None
    if model.conditional:  # q(z|x, y) and p(x|z, y) need a label: the one the model reads in the image
        from .model import classify

        labels = classify(model, images, k=100).argmax(1)
    columns.append(reconstruct(model, images, labels).cpu().numpy())
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
    if model.conditional:
        raise UserError(f"interpolate works on runs trained without --conditional; for {args.run_dir} use "
                        f"{prog} analogies")
    images = _load_images([args.start, args.end], device)
    out = _writable(args.out or _default_out(args, "interpolate.png"))
    with torch.no_grad():
        mu, _ = model.encode(images)
    weights = torch.linspace(0, 1, args.steps, device=device)[:, None]
    z = (1 - weights) * mu[0] + weights * mu[1]
    save_grid(decode_images(model, z).cpu().numpy(), args.steps, 1, out)
    print(f"wrote {args.steps} images from {args.start} to {args.end} into {out}")
    return 0


def command_export(prog, args):
    parser = _run_parser(prog, "export", "Write the model's encoder and decoder as ONNX files (encoder.onnx: "
                                         "image -> mu, std; decoder.onnx: z -> mean image) with model.json "
                                         "describing them, for use outside Python.")
    parser.add_argument("--format", type=choice("onnx"), default="onnx", help="file format (default: onnx)")
    parser.add_argument("--out", type=text, metavar="DIR",
                        help="folder to write into (default: RUN_DIR/onnx; for pretrained, ./pretrained-onnx)")
    args = parser.parse_args(args)
    from . import api
    from .export import require_packages

    require_packages()  # before loading anything: without the extra, one line saying what to install
    model = api.load(args.run_dir, device=args.device)
    out = Path(args.out) if args.out else (model.run_dir / "onnx" if model.run_dir else Path("pretrained-onnx"))
    written = model.export(out, format=args.format)
    print(f"wrote {', '.join(str(path) for path in written.values())}")
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


def command_sweep(prog, args):
    from .sweep import main as sweep_main

    return sweep_main(prog, args)


COMMANDS = {
    "train": command_train, "evaluate": command_evaluate, "sample": command_sample,
    "reconstruct": command_reconstruct, "denoise": command_denoise, "interpolate": command_interpolate,
    "classify": command_classify, "analogies": command_analogies, "export": command_export,
    "explore": command_explore, "bench": command_bench, "reproduce": command_reproduce,
    "sweep": command_sweep,
}


def main(argv=None, prog=None):
    """Run a command; return its exit status. User errors print one line, never a traceback."""
    argv = list(sys.argv[1:] if argv is None else argv)
    prog = prog or ("mnist-vae" if Path(sys.argv[0]).name != "main.py" else "main.py")
    command = "train"
    if argv and argv[0] in COMMANDS:
        command = argv.pop(0)
    try:
        with runs.session():  # the run folders a command locked are released when it returns
            return COMMANDS[command](prog, argv) or 0
    except UserError as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return e.exit_code
    except OSError as e:  # one on a path not caught where it happened: still one line, no traceback
        print(f"{prog}: error: " + (files.error_line(e.filename, e, "use") if e.filename else str(e)),
              file=sys.stderr)
        return 1
    except Interrupted as e:
        return e.exit_code
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
