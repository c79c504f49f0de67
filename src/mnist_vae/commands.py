"""The commands on a trained model, and training from the command line: each parses its flags and calls the API.

`cli.main` dispatches here; the flags of training are arguments.train_parser's.
"""

import math
from pathlib import Path

import numpy as np

from . import api, files, runs
from .arguments import Parser
from .config import Config, boolean, choice, integer, text, words
from .data import class_index
from .errors import UserError
from .export import require_packages
from .images import load_user_image
from .limits import check_image
from .plots import save_grid, side_by_side


# ---------------------------------------------------------------- commands

def command_train(given, resume, overwrite):
    """Train, or with `resume` (a run folder) train further, as the flags in `given` say."""
    if resume is None:
        output = given.pop("output", Config().output)
    else:
        if "output" in given and Path(given["output"]).resolve() != Path(resume).resolve():
            raise UserError(f"--output {given['output']} differs from --resume {resume}; a resumed run "
                            f"writes into its own folder, so drop --output")
        given.pop("output", None)
        output = resume
    api.train(output, resume=resume is not None, overwrite=overwrite, **given)
    return 0


def _run_parser(prog, command, description):
    parser = Parser(prog=f"{prog} {command}", description=description)
    parser.add_argument("run_dir", metavar="RUN_DIR", help="the --output folder of a training run, or `pretrained` "
                                                           "for the model shipped with mnist-vae")
    parser.add_argument("--device", type=choice("auto", "cpu", "cuda", "mps"), default="cpu",
                        help="where to compute (default: cpu)")
    return parser


def _default_out(args, name):
    """Where a command writes by default: into the run folder, or the current folder for the packaged model."""

    run_dir = Path(args.run_dir)
    return Path(name) if str(run_dir) == api.PRETRAINED and not run_dir.is_dir() else run_dir / name


def command_evaluate(prog, args):
    parser = _run_parser(prog, "evaluate", "Test metrics of a trained model, and its importance-weighted "
                                           "log-likelihood estimate.")
    parser.add_argument("--k", type=integer(0), default=1000,
                        help="importance samples per test image for the log-likelihood (0: skip; default 1000)")
    parser.add_argument("--data_dir", "--data-dir", type=text, help="folder with the dataset's IDX files")
    parser.add_argument("--n_test", "--n-test", type=integer(0), default=0,
                        help="use the first N test images only (0: all)")
    parser.add_argument("--other_data", "--other-data", nargs="?", const=True, type=boolean, default=False,
                        metavar="BOOL", help="evaluate on --data_dir even if its data are not those the run was "
                                             "trained on (it says so)")
    args = parser.parse_args(args)

    model = api.load(args.run_dir, device=args.device)
    result = model.evaluate(k=args.k, n_test=args.n_test, data_dir=args.data_dir, progress=True, log=print,
                            other_data=args.other_data)
    config = model.config
    given = " of log p(x|y)" if model.conditional else ""
    print(f"run: {args.run_dir} ({config.dataset}, dim_z={config.dim_z}, likelihood={config.likelihood}, "
          f"binarize={config.binarize}, {model.epoch} epochs)")
    print(f"test images: {result['images']}")
    print(f"test -ELBO{given}: {result['neg_elbo']:.3f} nats per image (reconstruction {result['recon']:.3f}, "
          f"KL {result['kl']:.3f})")
    if "accuracy" in result:
        print(f"test accuracy as a classifier (highest ELBO): {result['accuracy']:.4f}")
    if args.k > 0:
        nll, stderr = result["nll"], result["nll_stderr"]
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
    parser.add_argument("--class", dest="label", type=words("a class: a digit or a class name"), metavar="CLASS",
                        help="conditional runs: the class to generate, a digit or a Fashion-MNIST class name "
                             "(sneaker); without it, every class in turn")
    args = parser.parse_args(args)

    model = api.load(args.run_dir, device=args.device)
    label, what = None, "samples"
    every_class = model.conditional and args.label is None
    if every_class:
        label, what = [i % len(model.classes) for i in range(args.n)], "samples, every class in turn,"
    elif model.conditional:
        label = class_index(args.label, model.config.dataset)
        what = f"samples of class {model.classes[label]}"
    elif args.label is not None:
        raise UserError(f"--class needs a run trained with --conditional; {args.run_dir} was not")
    images = model.sample(args.n, seed=args.seed, label=label)
    out = Path(args.out or _default_out(args, "samples.png"))
    columns = len(model.classes) if every_class else _grid_shape(args.n)[0]
    save_grid(images, columns, math.ceil(args.n / columns), _writable(out))
    print(f"wrote {args.n} {what} to {out}")
    return 0


def _conditional_run(args, command):
    """The model of RUN_DIR, which must be conditional."""
    model = api.load(args.run_dir, device=args.device)
    if not model.conditional:
        raise UserError(f"{command} needs a run trained with --conditional; {args.run_dir} was not "
                        f"(train one: mnist-vae --conditional --output RUN)")
    return model


def command_classify(prog, args):
    parser = _run_parser(prog, "classify", "The class of your own images by a conditional run: the class y of "
                                           "highest log p(x|y) + log p(y), each bounded with K importance samples; "
                                           "prints each image's class and the probabilities of all classes.")
    parser.add_argument("images", nargs="+", metavar="IMAGE", help="PNG or JPEG files")
    parser.add_argument("--k", type=integer(1, 100000), default=100,
                        help="importance samples per image and class (1: the ELBO; default 100)")
    args = parser.parse_args(args)

    model = _conditional_run(args, "classify")
    names = model.classes
    probabilities = model.classify(_load_images(args.images), k=args.k)
    for path, p in zip(args.images, probabilities):
        best = int(p.argmax())
        print(f"{path}: {names[best]} (p={p[best]:.3f})  " + "  ".join(f"{c}:{q:.3f}" for c, q in zip(names, p)))
    return 0


def command_analogies(prog, args):
    parser = _run_parser(prog, "analogies", "Your own images written in their style as every class by a "
                                            "conditional run: each row shows an image, then its z decoded with "
                                            "each class.")
    parser.add_argument("images", nargs="+", metavar="IMAGE", help="PNG or JPEG files")
    parser.add_argument("--label", type=words("a class: a digit or a class name"), metavar="CLASS",
                        help="the class of the images (a digit or a class name); without it, each is classified")
    parser.add_argument("--out", type=text, help="image file to write (default: RUN_DIR/analogies.png)")
    args = parser.parse_args(args)

    model = _conditional_run(args, "analogies")
    names = model.classes
    label = None if args.label is None else class_index(args.label, model.config.dataset, flag="--label")
    out = _writable(args.out or _default_out(args, "analogies.png"))
    # side_by_side's picture: the input and one column per class, a row per image, 2 pixels apart
    check_image(out, 30 * (1 + len(names)) - 2, 30 * len(args.images) - 2, f"{len(args.images)} images")
    images = _load_images(args.images)
    if label is not None:
        labels = label
    else:
        labels = model.predict(images)
        for path, label in zip(args.images, labels.tolist()):
            print(f"{path}: read as {names[label]} (give --label to choose)")
    styles = model.analogies(images, labels)
    side_by_side([images] + [styles[:, c] for c in range(len(names))], out)
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


def _load_images(paths):
    """Users' image files, prepared like MNIST, as one float32 array (N, 784)."""
    return np.stack([load_user_image(path) for path in paths])


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

    model = api.load(args.run_dir, device=args.device)
    images = _load_images(args.images)
    out = _writable(args.out or _default_out(args, f"{name}.png"))

    check_image(out, 3 * 30, len(args.images) * 30, f"{len(args.images)} images")
    columns = [images]
    if denoise:
        if not model.config.add_noise:
            print(f"note: {args.run_dir} was not trained with --add_noise; this is a plain reconstruction")
        if args.add_noise:
            images = model.add_noise(images, seed=0)
            columns.append(images)
    # A conditional model reads the label in each image itself: q(z|x, y) and p(x|z, y) need one.
    columns.append(model.reconstruct(images))
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

    model = api.load(args.run_dir, device=args.device)
    if model.conditional:
        raise UserError(f"interpolate works on runs trained without --conditional; for {args.run_dir} use "
                        f"{prog} analogies")
    start, end = _load_images([args.start, args.end])
    out = _writable(args.out or _default_out(args, "interpolate.png"))
    save_grid(model.interpolate(start, end, steps=args.steps), args.steps, 1, out)
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

    require_packages()  # before loading anything: without the extra, one line saying what to install
    model = api.load(args.run_dir, device=args.device)
    out = Path(args.out) if args.out else (model.run_dir / "onnx" if model.run_dir else Path("pretrained-onnx"))
    written = model.export(out, format=args.format)
    print(f"wrote {', '.join(str(path) for path in written.values())}")
    return 0
