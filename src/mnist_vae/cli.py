"""The command line: the old program's flags for training, and subcommands for trained models.

Heavy modules (torch, matplotlib) are imported inside the commands, so that
`--help` and flag errors answer at once.
"""

import argparse
import math
import sys
from pathlib import Path

from .config import SETTINGS, Config, Interrupted, UserError, boolean, choice, integer, text


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
        epilog="other commands: evaluate, sample, reconstruct, denoise, interpolate, export, bench, reproduce "
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
    output = given.pop("output", None)  # present only when given (argument_default=SUPPRESS)
    if resume is not None:
        if output is not None and Path(output).resolve() != Path(resume).resolve():
            raise UserError(f"--output {output} differs from --resume {resume}; a resumed run "
                            f"writes into its own folder, so drop --output")
        output = resume
    from . import api

    api.train(output or Config().output, resume=resume is not None, overwrite=bool(overwrite), **given)
    return 0


def _run_parser(prog, command, description):
    parser = Parser(prog=f"{prog} {command}", description=description)
    parser.add_argument("run_dir", metavar="RUN_DIR", help="the --output folder of a training run, or `pretrained` "
                                                           "for the model shipped with mnist-vae")
    parser.add_argument("--device", type=choice("auto", "cpu", "cuda", "mps"), default="cpu",
                        help="where to compute (default: cpu)")
    return parser


def _load_model(args):
    """The api.Model of RUN_DIR (a run folder, or `pretrained`) on --device."""
    from . import api

    return api.load(args.run_dir, device=args.device)


def _default_out(model, name):
    """Where a command writes by default: into the run folder, or the current folder for the packaged model."""
    return model.run_dir / name if model.run_dir is not None else Path(name)


def command_evaluate(prog, args):
    parser = _run_parser(prog, "evaluate", "Test metrics of a trained model, and its importance-weighted "
                                           "log-likelihood estimate.")
    parser.add_argument("--k", type=integer(0), default=1000,
                        help="importance samples per test image for the log-likelihood (0: skip; default 1000)")
    parser.add_argument("--data_dir", "--data-dir", type=text, help="folder with the dataset's IDX files")
    parser.add_argument("--n_test", "--n-test", type=integer(0), default=0,
                        help="use the first N test images only (0: all)")
    args = parser.parse_args(args)
    model = _load_model(args)
    config = model.config
    report = model.evaluate(k=args.k, n_test=args.n_test, data_dir=args.data_dir, progress=True)
    print(f"data: {config.dataset} from the {report['source']}")
    print(f"run: {args.run_dir} ({config.dataset}, dim_z={config.dim_z}, likelihood={config.likelihood}, "
          f"binarize={config.binarize}, {model.epoch} epochs)")
    print(f"test images: {report['images']}")
    print(f"test -ELBO: {report['neg_elbo']:.3f} nats per image (reconstruction {report['recon']:.3f}, "
          f"KL {report['kl']:.3f})")
    if args.k > 0:
        print(f"test NLL (importance weighted, k={args.k}): {report['nll']:.3f} ± {report['nll_stderr']:.3f} "
              f"nats per image (± one standard error)")
    return 0


def _grid_shape(n):
    columns = math.ceil(math.sqrt(n))
    return columns, math.ceil(n / columns)


def command_sample(prog, args):
    parser = _run_parser(prog, "sample", "Images decoded from z drawn from the prior N(0, I).")
    parser.add_argument("--n", type=integer(1, 10000), default=64, help="how many images (default 64)")
    parser.add_argument("--out", type=text, help="image file to write (default: RUN_DIR/samples.png; for "
                                                 "pretrained, ./samples.png)")
    parser.add_argument("--seed", type=integer(0, 2**63 - 1), default=0, help="seed of the draws (default 0)")
    args = parser.parse_args(args)
    from .plots import save_grid

    model = _load_model(args)
    out = _writable(args.out or _default_out(model, "samples.png"))
    save_grid(_rows(model.sample(args.n, seed=args.seed)), *_grid_shape(args.n), out)
    print(f"wrote {args.n} samples to {out}")
    return 0


def _rows(images):
    """(n, 28, 28) images as the rows of 784 pixels that the picture functions take."""
    return images.reshape(len(images), 784)


def _writable(path):
    path = Path(path)
    if path.is_dir():
        raise UserError(f"--out {path} is a folder; give a file name such as {path / 'out.png'}")
    if not path.parent.is_dir():
        raise UserError(f"--out {path}: folder {path.parent} does not exist; create it or choose another path")
    if path.suffix.lower() not in (".png", ".jpg", ".jpeg"):
        raise UserError(f"--out {path}: give a .png or .jpg file name")
    return path


def command_reconstruct(prog, args, denoise=False):
    name = "denoise" if denoise else "reconstruct"
    parser = _run_parser(prog, name, "Restore your own noisy images with a denoising run; the picture shows "
                                     "input and result side by side." if denoise else
                         "Reconstruct your own images (PNG or JPEG, any size or colour; light backgrounds are "
                         "inverted); the picture shows input and result side by side.")
    parser.add_argument("images", nargs="+", metavar="IMAGE", help="PNG or JPEG files")
    parser.add_argument("--out", type=text, help=f"image file to write (default: RUN_DIR/{name}.png; for "
                                                 f"pretrained, ./{name}.png)")
    if denoise:
        parser.add_argument("--add_noise", "--add-noise", nargs="?", const=True, type=boolean, default=False,
                            metavar="BOOL", help="first add the run's training noise to the images (a demo)")
    args = parser.parse_args(args)
    from .api import prepare_images
    from .plots import side_by_side

    model = _load_model(args)
    images = prepare_images(args.images).numpy()  # the prepared pixels, shown in the first column
    out = _writable(args.out or _default_out(model, f"{name}.png"))
    columns = [images]
    if denoise:
        if not model.config.add_noise:
            print(f"note: {args.run_dir} was not trained with --add_noise; this is a plain reconstruction")
        if args.add_noise:
            images = _rows(model.add_noise(images, seed=0))
            columns.append(images)
    columns.append(_rows(model.reconstruct(images)))
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
    parser.add_argument("--out", type=text, help="image file to write (default: RUN_DIR/interpolate.png; for "
                                                 "pretrained, ./interpolate.png)")
    args = parser.parse_args(args)
    from .api import prepare_images
    from .plots import save_grid

    model = _load_model(args)
    start, end = prepare_images([args.start, args.end])  # both read before anything is written
    out = _writable(args.out or _default_out(model, "interpolate.png"))
    save_grid(_rows(model.interpolate(start.numpy(), end.numpy(), steps=args.steps)), args.steps, 1, out)
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
    from .export import require_packages

    require_packages()  # before loading anything: without the extra, one line saying what to install
    model = _load_model(args)
    out = Path(args.out) if args.out else (model.run_dir / "onnx" if model.run_dir else Path("pretrained-onnx"))
    written = model.export(out, format=args.format)
    print(f"wrote {', '.join(str(path) for path in written.values())}")
    return 0


def command_bench(prog, args):
    from .bench import main as bench_main

    return bench_main(prog, args)


def command_reproduce(prog, args):
    from .reproduce import main as reproduce_main

    return reproduce_main(prog, args)


COMMANDS = {
    "train": command_train, "evaluate": command_evaluate, "sample": command_sample,
    "reconstruct": command_reconstruct, "denoise": command_denoise, "interpolate": command_interpolate,
    "export": command_export, "bench": command_bench, "reproduce": command_reproduce,
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
