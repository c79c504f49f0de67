"""`mnist-vae reproduce`: train the runs behind the README's results and write its images and table.

The runs are those of the old program's README (reconstructions for dim_z 2, 4, 10
and 20; denoising with dim_z 20; the 2-D manifold and latent map) plus a
Fashion-MNIST manifold and a dim_z 20 run on dynamically binarized MNIST, whose
log-likelihood is the one that compares with the literature's, and conditional VAEs
(--conditional) on MNIST and Fashion-MNIST with dim_z 2 and 20; all at the same
number of epochs. `--runs` trains only the runs it names. Numbers under different likelihoods or binarizations go into
separate tables, never into one column. Each run keeps its own
folder under OUT/runs, so an interrupted reproduction resumes where it stopped and
a finished run is not trained again.
"""

import json
import os
import platform
from dataclasses import replace
from pathlib import Path

from . import files
from .config import Config, UserError, integer, text

RUNS = [  # name, settings, what the README shows of it
    ("dim2", dict(dim_z=2)),
    ("dim4", dict(dim_z=4)),
    ("dim10", dict(dim_z=10)),
    ("dim20", dict(dim_z=20)),
    ("dim20_denoising", dict(dim_z=20, add_noise=True)),
    ("fashion_dim2", dict(dim_z=2, dataset="fashion-mnist")),
    ("dim20_binarized", dict(dim_z=20, binarize="dynamic")),
    ("cond_dim2", dict(dim_z=2, conditional=True)),
    ("cond_dim20", dict(dim_z=20, conditional=True)),
    ("fashion_cond_dim2", dict(dim_z=2, dataset="fashion-mnist", conditional=True)),
    ("fashion_cond_dim20", dict(dim_z=20, dataset="fashion-mnist", conditional=True)),
]

QUICK_LEAVES_OUT = ("cond_dim20", "fashion_cond_dim20")  # --quick: one conditional run per dataset is enough

PIXELS = {  # what the numbers of each --binarize are
    "none": "grey-level pixels, so the Bernoulli term is a cross-entropy and these numbers are not comparable "
            "with NLLs on binarized MNIST",
    "dynamic": "binary pixels, resampled from the grey levels every epoch; the test set binarized once with a "
               "fixed seed: comparable with published NLLs on dynamically binarized MNIST",
    "static": "binary pixels, binarized once; the test set binarized once with a fixed seed",
}


def main(prog, args):
    from .cli import Parser

    parser = Parser(prog=f"{prog} reproduce", description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=integer(1), default=60, help="epochs per run (default 60, as the old README)")
    parser.add_argument("--out", type=text, default="docs/results",
                        help="folder for images and table (default docs/results)")
    parser.add_argument("--k", type=integer(0), default=1000,
                        help="importance samples for the test log-likelihood (default 1000)")
    parser.add_argument("--quick", action="store_true",
                        help="a smoke test: 2 epochs on 1000 training and 500 test images, k=10")
    parser.add_argument("--data_dir", "--data-dir", type=text,
                        help="folder with MNIST's IDX files (default: found as usual)")
    parser.add_argument("--runs", type=text, metavar="NAME[,NAME...]",
                        help="train only these runs (default: all): " + ", ".join(name for name, _ in RUNS))
    args = parser.parse_args(args)
    selected = [name for name, _ in RUNS if not (args.quick and name in QUICK_LEAVES_OUT)]
    if args.runs:
        names = [name.strip() for name in args.runs.split(",") if name.strip()]
        unknown = [name for name in names if name not in dict(RUNS)]
        if unknown or not names:
            raise UserError(f"--runs {args.runs}: no run named {', '.join(unknown) or 'there'}; choose from "
                            + ", ".join(name for name, _ in RUNS))
        selected = names
    if Path(args.out).exists() and not Path(args.out).is_dir():
        raise UserError(f"--out {args.out} is a file, not a folder; give a folder name")
    from .train import train

    out = Path(args.out)
    (out / "runs").mkdir(parents=True, exist_ok=True)
    base = Config(num_epochs=args.epochs, eval_k=args.k, data_dir=args.data_dir)
    if args.quick:
        base = replace(base, num_epochs=2, n_train=1000, n_test=500, eval_k=10, PMLR_n_samples=500)
    rows, earlier = [], _earlier_rows(out / "results.json")
    for name, settings in RUNS:
        config = replace(base, output=str(out / "runs" / name), **settings)
        if config.dataset != "mnist":
            config = replace(config, data_dir=None)
        if name not in selected and _finished(config) is None:
            if name in earlier:  # not asked for, its folder gone: the row an earlier reproduction wrote stays
                rows.append(earlier[name])
            continue  # not asked for and not trained before: left out of the tables
        print(f"== {name}: {settings}, {config.num_epochs} epochs")
        try:
            row = _train_or_reuse(train, config)
        except UserError as e:
            if config.dataset == "mnist":
                raise
            print(f"   skipped: {e}")  # Fashion-MNIST may not be on this machine
            rows.append({"run": name, "skipped": str(e)})
            continue
        rows.append({"run": name, **settings, "epochs": config.num_epochs, **row,
                     "wall_seconds": _training_seconds(config)})
    _collect_images(out, base.num_epochs)
    files.write_json(out / "results.json", {"machine": machine(), "command": _command(args), "runs": rows})
    files.write_text(out / "results.md", results_table(rows, args, base))
    print(f"wrote {out / 'results.md'} and the images beside it")
    return 0


def _earlier_rows(path):
    """The rows of an earlier results.json by run name, each with the command that made it, so that
    `--runs` adds to the tables rather than replacing them."""
    try:
        earlier = json.loads(Path(path).read_text())
        return {row["run"]: {"command": earlier["command"], **row} for row in earlier["runs"] if "skipped" not in row}
    except (OSError, ValueError, KeyError, TypeError):
        return {}


def _train_or_reuse(train, config):
    """Train the run, resume it if it was interrupted, or read its results if it is complete."""
    row = _finished(config)
    if row is not None:
        print("   already complete; reusing it")
        return row
    if (Path(config.output) / "checkpoint.safetensors").exists():
        return train(config, resume=True)
    return train(config, overwrite=True)


def _finished(config):
    """The last metrics row (with its evaluation) of a run trained to the end in config.output; else None."""
    folder = Path(config.output)
    evaluation = folder / "evaluation.json"
    if not (folder / "checkpoint.safetensors").exists():
        return None
    from . import checkpoint

    _, state, _ = checkpoint.load(folder)
    if state["epoch"] < config.num_epochs or not (evaluation.exists() or config.eval_k == 0):
        return None
    row = dict(state["history"][-1])
    if evaluation.exists():
        result = json.loads(evaluation.read_text())
        row.update({key: value for key, value in result.items() if key.startswith("iw_nll")})
    return row


def _training_seconds(config):
    """Training time of the run: the sum of its epochs' seconds, whichever call trained them."""
    import csv

    with open(Path(config.output) / "metrics.csv") as f:
        return sum(float(row["seconds"]) for row in csv.DictReader(f))


def _collect_images(out, epochs):
    """Copy the images the README shows under the old README's file names."""
    tag = f"epoch_{epochs:02d}"
    runs = out / "runs"
    copies = {
        runs / "dim2" / "input.jpg": "input.jpg",
        runs / "dim20_denoising" / "input_noise.jpg": "input_noise.jpg",
        runs / "dim20_denoising" / f"PRR_{tag}.jpg": f"PRR_epoch_{epochs}_dim20_denoising.jpg",
        runs / "dim2" / f"PMLR_{tag}.jpg": f"PMLR_epoch_{epochs}.jpg",
        runs / "dim2" / f"PMLR_map_{tag}.jpg": f"PMLR_map_epoch_{epochs}.jpg",
        runs / "fashion_dim2" / "input.jpg": "fashion_input.jpg",
        runs / "fashion_dim2" / f"PMLR_{tag}.jpg": f"fashion_PMLR_epoch_{epochs}.jpg",
        runs / "fashion_dim2" / f"PMLR_map_{tag}.jpg": f"fashion_PMLR_map_epoch_{epochs}.jpg",
    }
    for dim in (2, 4, 10, 20):
        copies[runs / f"dim{dim}" / f"PRR_{tag}.jpg"] = f"PRR_epoch_{epochs}_dim{dim}.jpg"
        copies[runs / f"dim{dim}" / f"samples_{tag}.jpg"] = f"samples_epoch_{epochs}_dim{dim}.jpg"
    for run in ("cond_dim2", "cond_dim20", "fashion_cond_dim2", "fashion_cond_dim20"):
        for prefix in ("samples", "analogies"):  # a row per class; an image, then its style as each class
            copies[runs / run / f"{prefix}_{tag}.jpg"] = f"{run}_{prefix}_epoch_{epochs}.jpg"
    for source, name in copies.items():
        if source.exists():
            files.write_bytes(out / name, source.read_bytes())


def machine():
    import torch

    from . import kernels

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "torch": torch.__version__, "threads": torch.get_num_threads(),
            "python": platform.python_version(), "kernels": kernels.description()}


def _command(args):
    runs = f" --runs {args.runs}" if args.runs else ""
    if args.quick:
        return f"mnist-vae reproduce --quick{runs} --out {args.out}"
    return f"mnist-vae reproduce --epochs {args.epochs} --k {args.k}{runs} --out {args.out}"


def _duration(seconds):
    return f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.1f} min"


def results_table(rows, args, base):
    m = machine()
    groups = {}  # one table per likelihood and binarization, and conditional runs' -log p(x|y) apart
    for row in rows:
        conditional = row.get("conditional", dict(RUNS).get(row["run"], {}).get("conditional", False))
        key = (conditional, row.get("likelihood", base.likelihood), row.get("binarize", base.binarize))
        groups.setdefault(key, []).append(row)
    lines = []
    for (conditional, likelihood, binarize), group in groups.items():
        given = "_given_y" if conditional else ""
        if conditional:
            lines += [
                f"Conditional VAEs (`--conditional`), likelihood {likelihood}, binarize {binarize}: the bounds are "
                f"on −log p(x|y), the image given its label, so they are not comparable with −log p(x) above; "
                f"accuracy is the model as a classifier, the label of highest ELBO.",
                "",
                f"| run | dataset | dim_z | noise | epochs | test −ELBO of log p(x\\|y) | test −log p(x\\|y) "
                f"(IW, k={base.eval_k}) | test accuracy | training time |",
                "|---|---|---:|---|---:|---:|---:|---:|---:|",
            ]
        else:
            lines += [
                f"Likelihood {likelihood}, binarize {binarize}: {PIXELS[binarize]}.",
                "",
                f"| run | dataset | dim_z | noise | epochs | test −ELBO | test NLL (IW, k={base.eval_k}) | training time |",
                "|---|---|---:|---|---:|---:|---:|---:|",
            ]
        for row in group:
            if "skipped" in row:
                lines.append(f"| {row['run']} | skipped: {row['skipped']} |||||||" + ("|" if conditional else ""))
                continue
            nll = (f"{row[f'iw_nll{given}']:.2f} ± {row[f'iw_nll{given}_stderr']:.2f}" if f"iw_nll{given}" in row
                   else "–")
            accuracy = f" {row['test_accuracy']:.4f} |" if conditional else ""
            lines.append(f"| {row['run']} | {row.get('dataset', 'mnist')} | {row['dim_z']} | "
                         f"{'yes' if row.get('add_noise') else 'no'} | {row['epochs']} | "
                         f"{row[f'test_neg_elbo{given}']:.2f} | {nll} |{accuracy} {_duration(row['wall_seconds'])} |")
        lines.append("")
    lines += [
        f"Nats per test image ({base.n_test or 10000} test images). −ELBO is the bound with one z per image "
        "(fixed draws); NLL is the importance-weighted estimate ± one standard error over test images. "
        "Training time sums the epochs' training steps.",
        "",
        f"Command: `{_command(args)}`; machine: {m['cpu']}, {m['cores']} cores, torch {m['torch']} "
        f"({m['threads']} threads), Python {m['python']}.",
        "",
    ]
    kept = sorted({row["command"] for row in rows if "command" in row})
    lines += [f"Runs {', '.join(row['run'] for row in rows if row.get('command') == command)}: kept from an "
              f"earlier `{command}` (their folders are gone, so they were not trained again)." for command in kept]
    lines += [""] if kept else []
    return "\n".join(lines)
