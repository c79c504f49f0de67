"""`mnist-vae reproduce`: train the runs behind the results (docs/results.md) and write their images and tables.

The runs are those of the old program's README (reconstructions for dim_z 2, 4, 10
and 20; denoising with dim_z 20; the 2-D manifold and latent map) plus a
Fashion-MNIST manifold and a dim_z 20 run on dynamically binarized MNIST, whose
log-likelihood is the one that compares with the literature's, and conditional VAEs
(--conditional) on MNIST and Fashion-MNIST with dim_z 2 and 20; all at the same
number of epochs. `--runs` trains only the runs it names; `--seeds N` trains each with seeds 0 to
N - 1 (seed 0 in OUT/runs/NAME, the others in OUT/runs/NAME_seed1, NAME_seed2, ...) and the tables show
the mean ± standard deviation over the seeds. Numbers under different likelihoods or binarizations go into
separate tables, never into one column. Each run keeps its own
folder under OUT/runs, so an interrupted reproduction resumes where it stopped and
a finished run is not trained again.

`--paper iwae` instead trains the models of Burda, Grosse & Salakhutdinov's Table 1 (one stochastic
layer: the VAE, and the IWAE with k = 5) on their architecture, each for a fixed time budget, and
writes OUT/literature.md and literature.json: their numbers beside this project's. With `--recipe`
it trains recipes instead: their model with other training (RECIPES), each changing one thing of
the one before, and writes OUT/recipes.md and recipes.json, where each row says what its change did.
"""

import csv
import json
import math
from dataclasses import replace
from pathlib import Path

import torch

from . import checkpoint, files, runs
from .arguments import Parser
from .config import Config, choice, fixed_length, integer, number, text, words
from .data import binarize_test, load_tensors
from .errors import UserError
from .evaluation import log_likelihood_estimate
from .fast import machine
from .loop import train

RUNS = [  # name, settings, what the results page shows of it
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
    args = _parser(prog).parse_args(args)
    if args.paper:
        if args.epochs is not None or args.runs or args.seeds is not None:
            flag = "epochs" if args.epochs is not None else "runs" if args.runs else "seeds"
            raise UserError(f"--{flag} does not apply to --paper "
                            f"{args.paper}, which trains its own models for --budget minutes each; drop it")
        return recipes_main(args) if args.recipe else paper_main(args)
    if args.recipe:
        raise UserError("--recipe applies to --paper only; add --paper iwae")
    for flag in ("budget", "binarizations"):
        if getattr(args, flag) is not None:
            raise UserError(f"--{flag} applies to --paper only; drop it, or add --paper iwae")
    args.epochs = 60 if args.epochs is None else args.epochs
    args.k = 1000 if args.k is None else args.k
    args.seeds = 1 if args.seeds is None else args.seeds
    selected = _selected_runs(args)
    if Path(args.out).exists() and not Path(args.out).is_dir():
        raise UserError(f"--out {args.out} is a file, not a folder; give a folder name")
    return reproduce_runs(args, selected)


def _parser(prog):
    parser = Parser(prog=f"{prog} reproduce", description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=integer(1), help="epochs per run (default 60, as the old README)")
    parser.add_argument("--out", type=text, default="docs/results",
                        help="folder for images and table (default docs/results)")
    parser.add_argument("--k", type=integer(0),
                        help="importance samples for the test log-likelihood (default 1000; 5000 with --paper)")
    parser.add_argument("--quick", action="store_true",
                        help="a smoke test: 2 epochs on 1000 training and 500 test images, k=10 (with --paper: "
                             "a budget of 0.02 minutes, 200 test images)")
    parser.add_argument("--data_dir", "--data-dir", type=text,
                        help="folder with MNIST's IDX files (default: found as usual)")
    parser.add_argument("--runs", type=words("run names separated by commas"), metavar="NAME[,NAME...]",
                        help="train only these runs (default: all): " + ", ".join(name for name, _ in RUNS))
    parser.add_argument("--seeds", type=integer(1), metavar="N",
                        help="train each run with seeds 0 to N - 1; the tables show mean ± standard deviation over "
                             "them (default 1)")
    parser.add_argument("--paper", type=choice("iwae"),
                        help="instead, the models of a paper beside its numbers: iwae (Burda et al. 2016, Table 1)")
    parser.add_argument("--budget", type=number(0.0), metavar="MINUTES",
                        help="--paper: minutes of training for each model (default 60)")
    parser.add_argument("--recipe", type=words("recipe names separated by commas"), metavar="NAME[,NAME...]",
                        help="--paper iwae: train these recipes instead, for --budget minutes each, into "
                             "OUT/recipes.md: " + ", ".join(RECIPES))
    parser.add_argument("--binarizations", type=integer(0), metavar="N",
                        help="--paper: also estimate the first model's NLL on N other binarizations of the test "
                             "set (default 5; 0: skip)")
    return parser


def _selected_runs(args):
    """The runs --runs names (all by default; --quick leaves some out), each known by name."""
    if not args.runs:
        return [name for name, _ in RUNS if not (args.quick and name in QUICK_LEAVES_OUT)]
    return _known_names("runs", "run", args.runs, [name for name, _ in RUNS])


def _known_names(flag, kind, text, known):
    """The names of `text` (separated by commas) for --`flag`; a UserError naming the `known` ones where one
    is not among them, or none is given."""
    names = [name.strip() for name in text.split(",") if name.strip()]
    unknown = [name for name in names if name not in known]
    if unknown or not names:
        raise UserError(f"--{flag} {text}: no {kind} named {', '.join(unknown) or 'there'}; choose from "
                        + ", ".join(known))
    return names


def reproduce_runs(args, selected):
    """Train (or reuse) the runs, each with args.seeds seeds, and write their tables and images."""
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
        per_seed = []
        try:
            for seed in range(args.seeds):
                seeded = seed_config(config, name, seed, out)
                if name not in selected and _finished(seeded) is None:
                    continue  # a run not asked for: tabled with the seeds it has, none trained
                if args.seeds > 1:
                    print(f"   seed {seed}: {seeded.output}")
                row = _train_or_reuse(train, seeded)
                per_seed.append({"seed": seed, **row, "wall_seconds": _training_seconds(seeded)})
        except UserError as e:
            if config.dataset == "mnist":
                raise
            print(f"   skipped: {e}")  # Fashion-MNIST may not be on this machine
            rows.append({"run": name, "skipped": str(e)})
            continue
        rows.append({"run": name, **settings, "epochs": config.num_epochs, **over_seeds(per_seed)})
    _collect_images(out, base.num_epochs)
    files.write_json(out / "results.json", {"machine": machine(), "command": _command(args), "runs": rows})
    files.write_text(out / "results.md", results_table(rows, args, base))
    print(f"wrote {out / 'results.md'} and the images beside it")
    return 0


def seed_config(config, name, seed, out):
    """The run of `config` with another seed: seed 0 is the run itself (OUT/runs/NAME), seed 2 OUT/runs/NAME_seed2."""
    return config if seed == 0 else replace(config, seed=seed, output=str(Path(out) / "runs" / f"{name}_seed{seed}"))


SPREAD_KEYS = ("test_neg_elbo", "test_neg_elbo_given_y", "iw_nll", "iw_nll_given_y", "test_accuracy")


def over_seeds(rows):
    """One table row from a run's rows, one per seed: with one seed, its row; with several, the mean of each
    number, `std` (the sample standard deviation over the seeds of each test metric), the mean standard error
    of the NLL estimates, and `seeds`, the rows themselves."""
    if len(rows) == 1:
        return {key: value for key, value in rows[0].items() if key != "seed"}
    numbers = [key for key, value in rows[0].items()
               if key != "seed" and isinstance(value, (int, float)) and not isinstance(value, bool)
               and all(isinstance(row.get(key), (int, float)) for row in rows)]
    row = {key: sum(row[key] for row in rows) / len(rows) for key in numbers}
    row["std"] = {key: math.sqrt(sum((r[key] - row[key]) ** 2 for r in rows) / (len(rows) - 1))
                  for key in SPREAD_KEYS if key in numbers}
    return {**{key: value for key, value in rows[0].items() if key not in numbers and key != "seed"}, **row,
            "seeds": rows}


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

    saved, state, _ = checkpoint.load(folder)
    length = saved if fixed_length(saved) else config  # the epochs it planned at its start, else those asked for now
    if not runs.training_done(length, state) or not (evaluation.exists() or config.eval_k == 0):
        return None
    row = dict(state["history"][-1])
    if evaluation.exists():
        result = json.loads(evaluation.read_text())
        row.update({key: value for key, value in result.items() if key.startswith("iw_nll")})
    return row


def _training_seconds(config):
    """Training time of the run: the sum of its epochs' seconds, whichever call trained them."""

    with open(Path(config.output) / "metrics.csv") as f:
        return sum(float(row["seconds"]) for row in csv.DictReader(f))


def _collect_images(out, epochs):
    """Copy the images the results page shows under the file names it links."""
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


def _command(args):
    runs = f" --runs {args.runs}" if args.runs else ""
    runs += f" --seeds {args.seeds}" if getattr(args, "seeds", 1) > 1 else ""
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
            spread = row.get("std", {})
            nll = (f"{row[f'iw_nll{given}']:.2f} ± {row[f'iw_nll{given}_stderr']:.2f}" if f"iw_nll{given}" in row
                   else "–")
            if f"iw_nll{given}" in spread:  # several seeds: their spread, beside the estimate's standard error
                nll = (f"{row[f'iw_nll{given}']:.2f} ± {spread[f'iw_nll{given}']:.2f} "
                       f"(s.e. {row[f'iw_nll{given}_stderr']:.2f})")
            elbo = f"{row[f'test_neg_elbo{given}']:.2f}" + (
                f" ± {spread[f'test_neg_elbo{given}']:.2f}" if f"test_neg_elbo{given}" in spread else "")
            accuracy = ""
            if conditional:
                accuracy = f" {row['test_accuracy']:.4f}" + (
                    f" ± {spread['test_accuracy']:.4f}" if "test_accuracy" in spread else "") + " |"
            name = row["run"] + (f" ({len(row['seeds'])} seeds)" if "seeds" in row else "")
            lines.append(f"| {name} | {row.get('dataset', 'mnist')} | {row['dim_z']} | "
                         f"{'yes' if row.get('add_noise') else 'no'} | {row['epochs']} | "
                         f"{elbo} | {nll} |{accuracy} {_duration(row['wall_seconds'])} |")
        lines.append("")
    lines += [
        f"Nats per test image ({base.n_test or 10000} test images). −ELBO is the bound with one z per image "
        "(fixed draws); NLL is the importance-weighted estimate ± one standard error over test images. "
        "Training time sums the epochs' training steps.",
        "",
    ]
    if any("seeds" in row for row in rows):
        lines += [
            "A run with several seeds (seed 0 in runs/NAME, the others in runs/NAME_seed1, ...) shows the mean over "
            "its seeds ± their standard deviation, and the NLL's standard error over test images (s.e., the mean "
            "of the seeds'); its training time is the mean of the seeds'.",
            "",
        ]
    lines += [
        f"Command: `{_command(args)}`; machine: {m['cpu']}, {m['cores']} cores, torch {m['torch']} "
        f"({m['threads']} threads), Python {m['python']}.",
        "",
    ]
    kept = sorted({row["command"] for row in rows if "command" in row})
    lines += [f"Runs {', '.join(row['run'] for row in rows if row.get('command') == command)}: kept from an "
              f"earlier `{command}` (their folders are gone, so they were not trained again)." for command in kept]
    lines += [""] if kept else []
    return "\n".join(lines)


# ---------------------------------------------------------------- --paper iwae

# Burda, Grosse & Salakhutdinov, "Importance Weighted Autoencoders" (ICLR 2016), Table 1: test -log p(x)
# (k = 5000) on dynamically binarized MNIST of the models with one stochastic layer, by objective and the
# k they were trained with.
BURDA_TABLE_1 = {("VAE", 1): 86.76, ("VAE", 5): 86.47, ("VAE", 50): 86.35,
                 ("IWAE", 1): 86.76, ("IWAE", 5): 85.54, ("IWAE", 50): 84.78}
# Their one-layer model and its training: 784-200-200-50 with tanh, a Bernoulli decoder, no dropout; Adam
# with eps 1e-4, batch 20, learning rate 1e-3 * 10^(-i/7) in passes of 3^i epochs (here scaled to the
# epochs the budget allows); training images binarized afresh every epoch.
BURDA_MODEL = dict(dim_z=50, n_hidden=200, n_layers=2, activation="tanh", dropout=0.0, likelihood="bernoulli",
                   binarize="dynamic", adam_eps=1e-4, batch_size=20, learning_rate=1e-3, lr_schedule="paper")
PAPER_RUNS = [  # name, settings beside BURDA_MODEL, the row of Table 1
    ("iwae_paper_vae_k1", dict(objective="elbo"), ("VAE", 1)),
    ("iwae_paper_iwae_k5", dict(objective="iwae", k_train=5), ("IWAE", 5)),
]
OTHER_NUMBERS = ("pythae's reproductions, on statically binarized MNIST (so not the same test): VAE 89.78, "
                 "IWAE (n = 50) 86.82.")


# Recipes: Burda et al.'s model (BURDA_MODEL) trained otherwise, to find what reaches the lowest NLL in a
# fixed time on a CPU. Each changes one thing of the recipe it names (its parent), so that each row of
# the table measures one idea: name -> (parent, changes, what the change is).
RECIPES = {
    "paper": (None, dict(objective="iwae", k_train=5), "Table 1's IWAE training: k = 5, batch 20, their schedule"),
    "batch100": ("paper", dict(batch_size=100, learning_rate=3e-3, warmup_epochs=1.0),
                 "batch 100, learning rate 3e-3 reached by a linear warm-up over the first epoch"),
    "cosine": ("batch100", dict(lr_schedule="cosine"), "the cosine schedule instead of theirs"),
    "dreg": ("cosine", dict(gradient="dreg"), "DReG gradients (Tucker et al. 2019)"),
    "elbo": ("cosine", dict(objective="elbo", k_train=1), "the ELBO (a VAE, k = 1) instead of the IWAE bound"),
    "k50": ("cosine", dict(k_train=50), "k = 50 instead of 5"),
    "vae2": ("cosine", dict(model="vae2"), "two stochastic layers (Burda et al.'s 100-50 model)"),
    "vae2_warmup": ("vae2", dict(kl_warmup=10), "the KL's weight raised from 0 over the first 10 epochs "
                                                "(Sønderby et al. 2016)"),
}


def recipe_settings(name):
    """The settings beside BURDA_MODEL of recipe `name`: its parent's, and its own changes."""
    parent, changes, _ = RECIPES[name]
    return {**(recipe_settings(parent) if parent else {}), **changes}


def recipes_main(args):
    """mnist-vae reproduce --paper iwae --recipe NAMES: train each recipe for args.budget minutes (each
    resumable in OUT/runs/recipe_NAME) and write OUT/recipes.md and recipes.json over every recipe
    finished in OUT, those of earlier calls too."""
    selected = _known_names("recipe", "recipe", args.recipe, list(RECIPES))
    if args.binarizations is not None:
        raise UserError("--binarizations applies to --paper iwae without --recipe; drop it")
    out = _paper_out(args)
    base = _paper_base(args)
    command, earlier = _paper_command(args), _earlier_recipes(out / "recipes.json", base)
    rows = []
    for name in RECIPES:
        config = replace(base, output=str(out / "runs" / f"recipe_{name}"), **recipe_settings(name))
        if name not in selected and _finished(config) is None:
            if name in earlier:  # not asked for, its run folder gone: the row an earlier call wrote stays
                rows.append(earlier[name])
            continue
        print(f"== recipe {name}: {RECIPES[name][2]}, {base.time_budget:g} minutes of training")
        _check_same_paper_run(config)
        rows.append({"recipe": name, "parent": RECIPES[name][0], "change": RECIPES[name][2],
                     "settings": recipe_settings(name), **_paper_row(config),
                     "command": earlier.get(name, {}).get("command", command) if name not in selected else command,
                     "cpu": machine()["cpu"]})
    results = {"machine": machine(), "command": command, "budget_minutes": base.time_budget,
               "k": base.eval_k, "n_test": base.n_test or 10000, "settings": BURDA_MODEL, "rows": rows}
    files.write_json(out / "recipes.json", results)
    files.write_text(out / "recipes.md", recipes_table(results))
    print(f"wrote {out / 'recipes.md'} and recipes.json")
    return 0


def _earlier_recipes(path, base):
    """The rows of an earlier recipes.json by recipe, where it was made with the budget and k of `base`, so that
    a later call adds to the table even where the run folders (not kept with the results) are gone."""
    try:
        earlier = json.loads(Path(path).read_text())
        if (earlier["budget_minutes"], earlier["k"]) != (base.time_budget, base.eval_k):
            return {}
        return {row["recipe"]: {"command": earlier["command"], "cpu": earlier["machine"]["cpu"], **row}
                for row in earlier["rows"] if row["recipe"] in RECIPES}
    except (OSError, ValueError, KeyError, TypeError):
        return {}


def _paper_out(args):
    """The --out folder of a --paper command, made with its runs/ folder; a UserError where it is a file."""
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {args.out} is a file, not a folder; give a folder name")
    (out / "runs").mkdir(parents=True, exist_ok=True)
    return out


def _paper_base(args):
    """The config every --paper run starts from: Burda et al.'s model, the budget and k of the command."""
    budget = args.budget if args.budget is not None else 0.02 if args.quick else 60.0
    k = args.k if args.k is not None else 10 if args.quick else 5000
    base = Config(**BURDA_MODEL, time_budget=budget, eval_k=k, data_dir=args.data_dir)
    return replace(base, n_train=1000, n_test=200) if args.quick else base


def _paper_row(config):
    """Train (or reuse) the run of `config`; what the tables show of it."""
    row = _train_or_reuse(train, config)
    saved, state, _ = checkpoint.load(config.output)
    evaluation = json.loads((Path(config.output) / "evaluation.json").read_text())
    return {"nll": row["iw_nll"], "nll_stderr": row["iw_nll_stderr"], "test_neg_elbo": row["test_neg_elbo"],
            "epochs": state["epoch"], "planned_epochs": saved.num_epochs,
            "training_seconds": runs.training_seconds(state["history"]),
            "evaluation_seconds": evaluation.get("seconds")}


def recipes_table(results):
    """recipes.md: each recipe's result, and what its one change did against its parent's."""
    m, rows = results["machine"], results["rows"]
    nll = {row["recipe"]: row["nll"] for row in rows}
    lines = [
        f"Burda et al.'s one-layer model (784–200–200–50 tanh, Bernoulli, dynamically binarized MNIST), or the "
        f"model a recipe changes it to, trained by each recipe for {results['budget_minutes']:g} minutes. "
        f"Test −log p(x) in nats, k = {results['k']} "
        f"importance samples, {results['n_test']} test images; each recipe changes one thing of the one it "
        f"names, and the last column is what that change moved the NLL.",
        "",
        "| recipe | changes | from | epochs | training time | −ELBO | NLL | change |",
        "|---|---|---|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        parent = row["parent"]
        delta = f"{row['nll'] - nll[parent]:+.2f}" if parent in nll else ""
        epochs = (f"{row['epochs']}" if row["epochs"] >= row["planned_epochs"]
                  else f"{row['epochs']} of {row['planned_epochs']} planned")
        lines.append(f"| {row['recipe']} | {row['change']} | {parent or ''} | {epochs} | "
                     f"{row['training_seconds'] / 60:.1f} min | {row['test_neg_elbo']:.2f} | "
                     f"{row['nll']:.2f} ± {row['nll_stderr']:.2f} | {delta} |")
    lines += [
        "",
        "± is one standard error over test images. Training time sums the epochs' training steps; the epochs "
        "are planned from a timing of the first steps and again after every epoch from the epochs' own time "
        "(`--time_budget`); a run whose last epochs turn out slower stops when its "
        "minutes are spent. For comparison, after 3,280 epochs: "
        "Table 1's VAE 86.76, IWAE k = 5 85.54, IWAE k = 50 84.78; two stochastic layers, IWAE k = 50, 82.90.",
        "",
        "Commands: " + ", ".join(f"`{c}`" for c in _distinct(row.get("command", results["command"]) for row in rows))
        + f"; machine: {', '.join(_distinct(row.get('cpu', m['cpu']) for row in rows))}, {m['cores']} cores, "
        f"torch {m['torch']} ({m['threads']} threads), Python {m['python']}.",
        "",
    ]
    return "\n".join(lines)


def _distinct(values):
    """The values in their first order, each once."""
    return list(dict.fromkeys(values))


def paper_main(args):
    """mnist-vae reproduce --paper iwae: train PAPER_RUNS for args.budget minutes each (each resumable in
    its own folder), and write OUT/literature.md and literature.json."""

    out = _paper_out(args)
    base = _paper_base(args)
    budget, k = base.time_budget, base.eval_k
    binarizations = args.binarizations if args.binarizations is not None else 2 if args.quick else 5

    rows = []
    for name, settings, (model, k_train) in PAPER_RUNS:
        config = replace(base, output=str(out / "runs" / name), **settings)
        print(f"== {name}: Burda et al.'s {model} trained with k={k_train}, {budget:g} minutes of training")
        _check_same_paper_run(config)
        rows.append({"run": name, "model": model, "k_train": k_train, "paper_nll": BURDA_TABLE_1[(model, k_train)],
                     **_paper_row(config)})
    if binarizations:
        print(f"== the first model's NLL on {binarizations} other binarizations of the test set")
        rows[0]["binarizations"] = binarization_spread(replace(base, output=str(out / "runs" / PAPER_RUNS[0][0])),
                                                       binarizations, rows[0]["nll"])
    results = {"paper": "Burda, Grosse & Salakhutdinov, Importance Weighted Autoencoders (2016), Table 1",
               "machine": machine(), "command": _paper_command(args), "budget_minutes": budget, "k": k,
               "n_test": base.n_test or 10000, "settings": BURDA_MODEL, "rows": rows}
    files.write_json(out / "literature.json", results)
    files.write_text(out / "literature.md", literature_table(results))
    print(f"wrote {out / 'literature.md'} and literature.json")
    return 0


def _check_same_paper_run(config):
    """Refuse to go on with a run folder of an earlier --paper reproduction made with another budget or k."""

    folder = Path(config.output)
    if not (folder / checkpoint.FILENAME).exists():
        return
    saved = checkpoint.load(folder)[0]
    evaluation = folder / "evaluation.json"
    k = json.loads(evaluation.read_text()).get("k") if evaluation.exists() else config.eval_k
    if saved.time_budget != config.time_budget or k != config.eval_k or saved.n_test != config.n_test:
        raise UserError(f"{folder} holds a run made with --budget {saved.time_budget:g}, --k {k}"
                        f"{' and --quick' if saved.n_test else ''}; give the same, or another --out")


def binarization_spread(config, n, fixed_nll):
    """The NLL of the run in config.output on n other binarizations of the test set's grey levels (seeds 1..n),
    beside `fixed_nll`, its NLL on the one every run is measured on: what sampling the test set afresh at each
    evaluation, as Burda et al. did, would have given. Each binarization's estimate is kept in the run's
    binarizations.json as it is done, so an interrupted measurement goes on where it stopped."""

    folder = Path(config.output)
    path = folder / "binarizations.json"
    try:
        done = json.loads(path.read_text())
        done = done["nll"] if done.get("k") == config.eval_k and done.get("n_test") == config.n_test else {}
    except (OSError, ValueError, KeyError, AttributeError):
        done = {}
    saved, state, tensors = checkpoint.load(folder)
    model = checkpoint.build_model(saved, tensors, folder, state).eval()
    grey = load_tensors(replace(config, binarize="none", n_train=1), torch.device("cpu"), log=lambda *a: None).test
    for seed in range(1, n + 1):
        if str(seed) not in done:
            nll, stderr = log_likelihood_estimate(model, binarize_test(grey, seed), config.eval_k)
            done[str(seed)] = [nll, stderr]
            files.write_json(path, {"k": config.eval_k, "n_test": config.n_test, "nll": done})
            print(f"   binarization {seed}: NLL {nll:.3f} ± {stderr:.3f}")
    nlls = [done[str(seed)][0] for seed in range(1, n + 1)]
    mean = sum(nlls) / n
    spread = math.sqrt(sum((x - mean) ** 2 for x in nlls) / (n - 1)) if n > 1 else None  # JSON has no NaN
    return {"n": n, "nll": nlls, "mean": mean, "std": spread, "fixed": fixed_nll, "difference": fixed_nll - mean}


def _paper_command(args):
    if args.quick:
        recipe = f" --recipe {args.recipe}" if args.recipe else ""
        return f"mnist-vae reproduce --paper {args.paper}{recipe} --quick --out {args.out}"
    parts = [f"--recipe {args.recipe}" if args.recipe else "",
             f"--budget {args.budget:g}" if args.budget is not None else "",
             f"--k {args.k}" if args.k is not None else "",
             f"--binarizations {args.binarizations}" if args.binarizations is not None else ""]
    return " ".join(["mnist-vae reproduce --paper", args.paper, *filter(None, parts), "--out", args.out])


def literature_table(results):
    """literature.md: Burda et al.'s numbers beside this project's, with what each of ours cost."""
    m = results["machine"]
    lines = [
        f"Burda, Grosse & Salakhutdinov (2016), Table 1, one stochastic layer, beside this project's models of the "
        f"same architecture and training (784–200–200–50 tanh, Bernoulli, dynamically binarized MNIST, Adam ε 1e-4, "
        f"batch 20, their learning-rate schedule scaled to the epochs that {results['budget_minutes']:g} minutes "
        f"of training allow). Test −log p(x) in nats, k = {results['k']} importance samples, "
        f"{results['n_test']} test images.",
        "",
        "| model | trained with | paper (3,280 epochs) | this project | −ELBO | epochs | training time | "
        "evaluation time |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for row in results["rows"]:
        epochs = f"{row['epochs']}" + (f" of {row['planned_epochs']} planned" if row["epochs"] < row["planned_epochs"]
                                       else "")
        lines.append(f"| {row['model']} | k = {row['k_train']} | {row['paper_nll']:.2f} | {row['nll']:.2f} ± "
                     f"{row['nll_stderr']:.2f} | {row['test_neg_elbo']:.2f} | {epochs} | "
                     f"{_duration(row['training_seconds'])} | "
                     f"{_duration(row['evaluation_seconds']) if row['evaluation_seconds'] is not None else '–'} |")
    lines += [
        "",
        "± is one standard error over test images. Training time sums the epochs' training steps (the planning, "
        "the per-epoch test metrics and pictures are not counted); the schedule was planned from a timing of the "
        "first steps and again after every epoch from the epochs' own time, and a run whose last epochs turn out "
        "slower stops when its minutes are spent, before the schedule's end (then fewer epochs than planned are "
        "shown).",
        "",
        "The paper's other one-layer numbers (not trained here): VAE trained with k = 5: "
        f"{BURDA_TABLE_1[('VAE', 5)]}, k = 50: {BURDA_TABLE_1[('VAE', 50)]}; IWAE k = 50: "
        f"{BURDA_TABLE_1[('IWAE', 50)]}. " + OTHER_NUMBERS,
        "",
    ]
    spread = results["rows"][0].get("binarizations")
    if spread:
        several = spread["n"] > 1  # one binarization has no spread to state
        average = f" on average (standard deviation {spread['std']:.2f} between binarizations)" if several else ""
        lines += [
            f"The test set: every run here is measured on MNIST's test images binarized once with a fixed seed; "
            f"the paper sampled them afresh. On {spread['n']} other binarization{'s' if several else ''} of the "
            f"same grey levels the {results['rows'][0]['model']} above has NLL {spread['mean']:.2f}{average}, "
            f"against {spread['fixed']:.2f} on the fixed one: a difference of {spread['difference']:+.2f} nats.",
            "",
        ]
    lines += [f"Command: `{results['command']}`; machine: {m['cpu']}, {m['cores']} cores, torch {m['torch']} "
              f"({m['threads']} threads), Python {m['python']}.", ""]
    return "\n".join(lines)
