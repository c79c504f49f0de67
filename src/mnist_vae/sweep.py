"""`mnist-vae sweep`: train a grid of settings × seeds on Ray Tune and give each setting's mean ± standard deviation.

    mnist-vae sweep --grid dim_z=2,4,10,20 --grid dataset=mnist,fashion-mnist --seeds 3 --num_epochs 60

Every trial is an ordinary run folder, OUT/runs/NAME (NAME built from its grid values and
seed), trained through the Python API (mnist_vae.api.train), so each keeps the checks,
lock, checkpoints and resume of a run: a trial whose folder holds a finished run is not
trained again, one with a checkpoint resumes, and so the same command after a Ctrl-C goes
on where it stopped. By default the command starts a Ray cluster of its own on 127.0.0.1,
without the dashboard and usage statistics, and stops it when done; `--address HOST:PORT`
runs the trials on a Ray cluster started with `ray start`, whose nodes share --out.
The results, OUT/sweep.md, sweep.json and sweep.png, are read from the run folders.
"""

import _thread
import csv
import itertools
import json
import logging
import math
import os
import secrets
import shlex
import shutil
import signal
import socket
import sys
import threading
import time
import traceback
from pathlib import Path

from . import api, files, runs
from .arguments import Parser, train_parser
from .config import SETTINGS, integer, text
from .errors import Interrupted, UserError, catch_signals, restore_signals

INSTALL = "pip install 'mnist-vae[sweep]'"
CHECKPOINT = "checkpoint.safetensors"  # checkpoint.FILENAME, without importing torch in the driver
# Flags a sweep sets itself, or that make no sense shared by every trial.
NOT_PASSED_ON = {
    "output": "every trial writes into OUT/runs/NAME; give the sweep's folder as --out",
    "resume": "a trial with a checkpoint resumes by itself; run the same sweep command again",
    "overwrite": "a sweep never writes over a run; choose another --out, or remove the run folders",
    "threads": "give the threads of each trial as --threads_per_trial",
    "tensorboard": "the trials would share one TensorBoard folder; each run's metrics.csv holds the numbers",
}


class UsageError(UserError):
    """A flag or value the sweep cannot take: one line, exit status 2 as for argparse's own errors."""

    exit_code = 2


# The metrics of the tables, in their order: the key in a run's metrics.csv or evaluation.json, and the heading.
METRICS = {
    "test_neg_elbo": "test −ELBO",
    "test_neg_elbo_given_y": "test −ELBO of log p(x\\|y)",
    "iw_nll": "test NLL (IW)",
    "iw_nll_given_y": "test −log p(x\\|y) (IW)",
    "test_accuracy": "test accuracy",
}
STOP_POLL_S = 0.1  # how often a running trial asks whether the sweep was interrupted (a local actor call)


# ---------------------------------------------------------------- the command

def make_parser(prog):
    """The sweep's own flags; the rest are training flags (parse_known_args leaves them)."""
    parser = Parser(prog=f"{prog} sweep", allow_abbrev=False, description=__doc__.splitlines()[0],
                    epilog=f"Every other flag is a training flag (see {prog} --help), passed on to every trial as "
                           f"{prog} takes it. Needs Ray Tune: {INSTALL}.")
    parser.add_argument("--grid", action="append", default=[], type=text, metavar="FLAG=V1,V2,...",
                        help="a training flag and the values to sweep (repeat for more flags; the grid is "
                             "their product)")
    parser.add_argument("--seeds", type=integer(1), metavar="N",
                        help="train every setting with N seeds: --seed, --seed + 1, ... (default 1)")
    parser.add_argument("--config", type=text, metavar="FILE",
                        help="a TOML file with [grid], seeds and [settings] (the command line adds to it "
                             "and wins)")
    parser.add_argument("--out", type=text, default="sweep",
                        help="folder for the run folders (runs/), the logs and the tables (default: sweep)")
    parser.add_argument("--workers", type=integer(1), metavar="N",
                        help="trials at once (default: the cores divided by --threads_per_trial; with "
                             "--address, as many as the cluster has CPUs for)")
    parser.add_argument("--threads_per_trial", "--threads-per-trial", type=integer(1), default=1, metavar="N",
                        help="CPU threads of each trial (default 1)")
    parser.add_argument("--address", type=text, metavar="HOST:PORT",
                        help="run the trials on this running Ray cluster (ray start --head) instead of a "
                             "local one; --out must then be an absolute path every node can reach")
    return parser


def main(prog, args):
    given = list(args)
    parser = make_parser(prog)
    args, rest = parser.parse_known_args(args)
    sweep = plan(args, rest, f"{prog} sweep")
    ray, tune = _import_ray(local=args.address is None)
    return run(sweep, args, ray, tune, command=shlex.join([prog, "sweep", *given]))


def _import_ray(local):
    """Ray and Ray Tune, imported with usage statistics off; a local cluster of its own on 127.0.0.1 only."""
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")  # unless the user chose otherwise
    os.environ["RAY_AIR_NEW_OUTPUT"] = "0"  # Tune's reporter that verbose=0 silences: the sweep prints its own lines
    os.environ["TUNE_DISABLE_SIGINT_HANDLER"] = "1"  # Ctrl-C is the sweep's: the trials write checkpoints
    if local:
        # Ray's single-machine mode: its node address is 127.0.0.1 and every server binds to it (on Linux, Ray
        # otherwise takes the machine's network address and listens on it). Read when ray is imported.
        os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
        if "RAY_AUTH_MODE" not in os.environ and "RAY_AUTH_TOKEN" not in os.environ:
            # A token for this cluster alone, in the environment its processes inherit, so that Ray neither
            # runs without one nor saves one into ~/.ray.
            os.environ["RAY_AUTH_MODE"] = "token"
            os.environ["RAY_AUTH_TOKEN"] = secrets.token_hex(32)
    try:
        import ray
        from ray import tune
    except ImportError:
        raise UserError(f"sweep needs Ray Tune, which is not installed: {INSTALL}") from None
    return ray, tune


# ---------------------------------------------------------------- the plan: trials from the grid and seeds

class Sweep:
    """What to train: the grid (flag -> values, in order), the seeds, the flags every trial gets, and the trials."""

    def __init__(self, grid, seeds, settings, out):
        self.grid, self.seeds, self.settings, self.out = grid, seeds, settings, out
        self.trials = []
        for values in itertools.product(*grid.values()):
            setting = dict(zip(grid, values))
            for seed in seeds:
                name = ",".join([f"{key}={_name_part(value)}" for key, value in setting.items()] + [f"seed={seed}"])
                self.trials.append({"name": name, "setting": setting, "seed": seed,
                                    "output": str(out / "runs" / name), "log": str(out / "logs" / f"{name}.log"),
                                    "settings": {**settings, **setting, "seed": seed}})


def plan(args, rest, prog):
    """The sweep that `args` (and the training flags in `rest`) ask for; a UserError for anything wrong in them."""
    file_grid, file_seeds, file_settings = _read_config(args.config) if args.config else ({}, None, {})
    given = vars(train_parser(prog).parse_args(rest))  # the training flags, checked as `mnist-vae` checks them
    for name in given:
        if name in NOT_PASSED_ON:
            raise UsageError(f"--{name} does not apply to a sweep: {NOT_PASSED_ON[name]}")
    settings = {**file_settings, **given}
    grid = dict(file_grid)
    for item in args.grid:
        name, values = _grid_item(item)
        grid.pop(name, None)  # the command line's values replace the file's, and take its place in the order
        grid[name] = values
    for name in grid:
        settings.pop(name, None)  # a swept flag is the grid's, whatever the flags say
    seeds = args.seeds if args.seeds is not None else file_seeds if file_seeds is not None else 1
    base = settings.pop("seed", 0)
    settings["threads"] = args.threads_per_trial
    if settings.get("data_dir"):  # a trial's working folder is Ray's, not this one
        settings["data_dir"] = os.path.abspath(settings["data_dir"])
    if "data_dir" in grid:
        grid["data_dir"] = [os.path.abspath(value) for value in grid["data_dir"]]
    if args.address is not None and not args.address.rpartition(":")[2].isdigit():
        raise UsageError(f"--address {args.address}: give the head node's HOST:PORT, as `ray start --head` printed it")
    out = Path(args.out)
    if args.address is not None and not out.is_absolute():
        raise UsageError(f"--out {args.out}: with --address the trials run on the cluster's nodes, so give an "
                        f"absolute path to storage that every node reaches (a shared file system)")
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {args.out} is a file, not a folder; give a folder name")
    return Sweep(grid, list(range(base, base + seeds)), settings, out.absolute())


def _grid_item(item, source="--grid"):
    """(flag, its values checked and converted) of a `FLAG=V1,V2,...`."""
    name, sep, values = item.partition("=")
    if not sep or not values.strip():
        raise UsageError(f"{source} {item}: give a training flag and its values, such as --grid dim_z=2,4,10")
    return _grid_values(name.strip(), [value.strip() for value in values.split(",")], source)


def _grid_values(name, values, source):
    name = name.removeprefix("--").replace("-", "_")
    if name == "seed":
        raise UsageError(f"{source}: the seeds are --seeds N (and --seed for the first); leave seed out of the grid")
    if name in NOT_PASSED_ON:
        raise UsageError(f"{source}: {name} cannot be swept: {NOT_PASSED_ON[name]}")
    if name not in SETTINGS:
        raise UsageError(f"{source}: {name} is not a training flag; the flags are {', '.join(SETTINGS)}")
    check = SETTINGS[name][0]
    checked = []
    for value in values:
        try:
            value = check(str(value))
        except Exception as e:  # argparse.ArgumentTypeError: the flag's own message
            raise UsageError(f"{source} {name}={value}: {e}") from None
        if value in checked:
            raise UsageError(f"{source} {name}: the value {value} is given twice")
        checked.append(value)
    return name, checked


def _read_config(path):
    """(grid, seeds, settings) of a TOML file: `seeds = N`, a [grid] table of lists, a [settings] table."""
    try:
        import tomllib
    except ImportError:  # Python 3.10
        try:
            import tomli as tomllib
        except ImportError:
            raise UserError(f"--config {path}: reading TOML needs Python 3.11, or pip install tomli") from None
    try:
        with open(path, "rb") as f:
            values = tomllib.load(f)
    except OSError as e:
        raise UserError(files.error_line(path, e, "read")) from None
    except tomllib.TOMLDecodeError as e:
        raise UsageError(f"--config {path}: not valid TOML ({e})") from None
    source = f"--config {path}:"
    unknown = sorted(set(values) - {"grid", "seeds", "settings"})
    if unknown:
        raise UsageError(f"{source} unknown key {unknown[0]}; the file holds seeds, [grid] and [settings]")
    grid, settings = {}, {}
    if not isinstance(values.get("grid", {}), dict) or not isinstance(values.get("settings", {}), dict):
        raise UsageError(f"{source} grid and settings are tables: [grid] and [settings]")
    for name, listed in values.get("grid", {}).items():
        listed = listed if isinstance(listed, list) else [listed]
        name, checked = _grid_values(name, listed, f"{source} [grid]")
        grid[name] = checked
    for name, value in values.get("settings", {}).items():
        name = name.replace("-", "_")
        if name in NOT_PASSED_ON:
            raise UsageError(f"{source} [settings] {name} does not apply to a sweep: {NOT_PASSED_ON[name]}")
        if name not in SETTINGS:
            raise UsageError(f"{source} [settings] {name} is not a training flag; the flags are {', '.join(SETTINGS)}")
        try:
            settings[name] = SETTINGS[name][0](str(value))
        except Exception as e:
            raise UsageError(f"{source} [settings] {name} = {value!r}: {e}") from None
    seeds = values.get("seeds")
    if seeds is not None and (isinstance(seeds, bool) or not isinstance(seeds, int) or seeds < 1):
        raise UsageError(f"{source} seeds = {seeds!r}: give a whole number of at least 1")
    return grid, seeds, settings


def _value(value):
    """A flag's value as the tables show it."""
    return f"{value:g}" if isinstance(value, float) else str(value)


def _name_part(value):
    """A grid value as it appears in a run folder's name."""
    if isinstance(value, float):
        return f"{value:g}"
    return str(value).replace(os.sep, "_").strip("_") or "_"


# ---------------------------------------------------------------- running it on Ray

def run(sweep, args, ray, tune, command):
    """Train the sweep's trials on Ray Tune, print their progress, and write the tables; the exit status."""

    out, local = sweep.out, args.address is None
    if not local:
        _check_reachable(args.address)
    runs.hold(out, what="--out")  # one sweep at a time in a folder (its trials lock their own run folders)
    for folder in (out / "runs", out / "logs"):
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise files.WriteError(files.error_line(folder, e)) from None
    cores = os.cpu_count() or 1
    workers = (args.workers or max(1, cores // args.threads_per_trial)) if local else args.workers
    where = (f"a local Ray on 127.0.0.1, {workers} at once" if local
             else f"the Ray cluster at {args.address}" + (f", at most {workers} at once" if workers else ""))
    print(f"sweep: {len(sweep.trials)} trials ({_shape(sweep)}) into {out}, on {where}, "
          f"{args.threads_per_trial} thread{'s' if args.threads_per_trial > 1 else ''} each", flush=True)
    try:
        if local:
            ray.init(address="local", num_cpus=workers * args.threads_per_trial, include_dashboard=False,
                     object_store_memory=100 * 2**20, log_to_driver=False, logging_level=logging.WARNING)
        else:
            ray.init(address=args.address, log_to_driver=False, logging_level=logging.WARNING)
    except (ConnectionError, RuntimeError, ValueError) as e:
        where = f"the Ray cluster at --address {args.address}" if args.address else "a local Ray cluster"
        raise UserError(f"cannot start or reach {where}: {str(e).strip().splitlines()[0]}") from None
    try:
        if local and not ray.util.get_node_ip_address().startswith("127."):  # ray imported before the sweep set it up
            raise UserError("the local Ray cluster did not start on 127.0.0.1, since ray was imported before the "
                            "sweep began; run the sweep in a process of its own (mnist-vae sweep)")
        if not local and ray.cluster_resources().get("CPU", 0) < args.threads_per_trial:
            raise UserError(f"the Ray cluster at {args.address} has {ray.cluster_resources().get('CPU', 0):g} CPUs, "
                            f"fewer than --threads_per_trial {args.threads_per_trial}")
        progress = _tune(sweep, args, ray, tune, workers)
    finally:
        ray.shutdown()
    if progress.signum is not None:
        done = sum(1 for status in progress.status.values() if status["status"] == "finished")
        print(f"sweep: interrupted, {done} of {len(sweep.trials)} trials done; every run folder keeps its "
              f"checkpoint: run the same command again to go on", file=sys.stderr)
        raise Interrupted(128 + progress.signum)
    results = summarise(sweep, progress.status)
    results["command"] = command
    write_results(out, results)
    failed = [trial for trial in results["trials"] if trial["status"] != "finished"]
    print(f"wrote {out / 'sweep.md'}, sweep.json and sweep.png"
          + (f"; {len(failed)} trial{'s' if len(failed) > 1 else ''} failed (see the table)" if failed else ""))
    return 1 if failed else 0


def _check_reachable(address):
    """Refuse at once an --address where nothing listens (Ray itself would retry for minutes)."""

    host, _, port = address.rpartition(":")
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=10):
            pass
    except OSError as e:
        raise UserError(f"--address {address}: no Ray cluster answers there ({e.strerror or e}); start one with "
                        f"`ray start --head --port {port}`, or give the address it printed") from None


def _shape(sweep):
    parts = [f"{len(values)} {name}" for name, values in sweep.grid.items()]
    return " × ".join(parts + [f"{len(sweep.seeds)} seed{'s' if len(sweep.seeds) > 1 else ''}"])


def _tune(sweep, args, ray, tune, workers):
    """Run every trial through a Tuner; return the Progress callback, which holds each trial's outcome."""

    flag = ray.remote(num_cpus=0)(StopFlag).remote()
    progress = Progress(sweep, flag)
    callback, stopper = progress.tune_hooks(tune)
    trainable = tune.with_resources(tune.with_parameters(_trainable(tune), stop=flag),
                                    {"cpu": args.threads_per_trial})
    storage = sweep.out / ".tune"  # Tune's own experiment state; the results are in the run folders
    tuner = tune.Tuner(
        trainable,
        param_space={"trial": tune.grid_search(sweep.trials)},
        tune_config=tune.TuneConfig(max_concurrent_trials=workers, reuse_actors=True,
                                    trial_dirname_creator=lambda trial: trial.trial_id),
        run_config=tune.RunConfig(
            name="sweep", storage_path=str(storage), verbose=0, callbacks=[callback], stop=stopper,
            checkpoint_config=tune.CheckpointConfig(checkpoint_at_end=False, checkpoint_frequency=0),
            failure_config=tune.FailureConfig(max_failures=0)))
    previous = catch_signals(progress.interrupt)
    try:
        tuner.fit()
    finally:
        restore_signals(previous)
        shutil.rmtree(storage, ignore_errors=True)
    return progress


class StopFlag:
    """Set by the driver when the sweep is interrupted; each running trial asks it (a Ray actor)."""

    def __init__(self):
        self.stop = False

    def set(self):
        self.stop = True

    def is_set(self):
        return self.stop


def _trainable(tune):
    """The Tune trainable of a trial. A class, because Tune calls a class's step() in the main thread of its
    worker process, where training can take the signal that makes it write its checkpoint and stop (Tune runs
    a function trainable in a thread of its own, where no signal handler can be set)."""

    class Trial(tune.Trainable):
        def setup(self, config, stop=None):
            self.trial, self.stop = config["trial"], stop

        def reset_config(self, new_config):  # reuse_actors: the next trial in the same worker process
            self.trial = new_config["trial"]
            return True

        def step(self):
            return {**train_trial(self.trial, self.stop), "done": True}

        def save_checkpoint(self, checkpoint_dir):  # the run folder holds the checkpoint
            return None

        def load_checkpoint(self, checkpoint):
            pass

    return Trial


class Progress:
    """The driver's side of the trials: a line for each trial's start and end with the counts so far, each
    trial's outcome by name, and Ctrl-C: the first sets the StopFlag (each running trial then writes its
    checkpoint and ends, and no other starts), a second stops at once."""

    def __init__(self, sweep, flag):
        self.total, self.flag = len(sweep.trials), flag
        self.status, self.running, self.started = {}, set(), {}
        self.signum, self.flag_set = None, False
        self.quiet = set()  # trials Tune started after the interrupt: they end at once, untrained, unannounced

    def interrupt(self, signum, frame):
        if self.signum is not None:
            raise KeyboardInterrupt
        self.signum = signum
        print("sweep: stopping; the running trials write their checkpoints (press Ctrl-C again to stop at once)",
              file=sys.stderr, flush=True)

    def tune_hooks(self, tune):
        """The Tune callback and stopper that drive this object."""
        progress = self

        class Callback(tune.Callback):
            def on_step_begin(self, iteration, trials, **info):
                progress.step()

            def on_trial_start(self, iteration, trials, trial, **info):
                progress.start(trial.config["trial"])

            def on_trial_complete(self, iteration, trials, trial, **info):
                progress.end(trial.config["trial"], trial.last_result or {})

            def on_trial_error(self, iteration, trials, trial, **info):
                lines = [line.strip() for line in str(trial.get_error() or "").splitlines() if line.strip()]
                progress.end(trial.config["trial"],
                             {"status": "failed", "reason": lines[-1] if lines else "the trial's process ended"})

        class Stopper(tune.Stopper):
            def __call__(self, trial_id, result):
                return False

            def stop_all(self):  # once interrupted and the running trials have ended: start no other
                return progress.signum is not None and not progress.running

        return Callback(), Stopper()

    def step(self):
        if self.signum is not None and not self.flag_set:  # here, not in the signal handler: a call into Ray
            self.flag.set.remote()
            self.flag_set = True

    def _line(self, verb, name, detail=""):
        done = sum(1 for status in self.status.values() if status["status"] == "finished")
        failed = sum(1 for status in self.status.values() if status["status"] == "failed")
        print(f"{verb:<7} {name}{detail}   [{done} done, {len(self.running)} running, {failed} failed, "
              f"of {self.total}]", flush=True)

    def start(self, trial):
        self.running.add(trial["name"])
        self.started[trial["name"]] = time.monotonic()
        if self.signum is not None:
            self.quiet.add(trial["name"])
        else:
            self._line("start", trial["name"])

    def end(self, trial, result):
        name = trial["name"]
        if name not in self.running:
            return
        self.running.discard(name)
        status = {key: result[key] for key in ("status", "reason", "trained", "node", "node_id")
                  if key in result}
        status.setdefault("status", "failed")
        self.status[name] = status
        seconds = time.monotonic() - self.started.pop(name)
        if name in self.quiet:
            return
        if status["status"] == "finished":
            metrics = read_metrics(trial["output"])
            elbo = next((f", {_plain(METRICS[key])} {metrics[key]:.2f}" for key in METRICS if key in metrics), "")
            how = "trained" if status.get("trained") else "finished earlier"
            self._line("done", name, f": {how}{elbo}, {seconds:.0f} s")
        elif status["status"] == "interrupted":
            kept = (Path(trial["output"]) / CHECKPOINT).exists()
            self._line("stopped", name, ": its checkpoint kept" if kept else ": before its first checkpoint")
        else:
            self._line("failed", name, f": {status.get('reason', '')}")


def _plain(heading):
    """A table heading without markdown's escapes."""
    return heading.replace("\\", "")


# ---------------------------------------------------------------- one trial, in a Ray worker

def train_trial(trial, stop=None):
    """Train (or resume, or find finished) the run of one trial in the main thread of this process; its outcome."""
    import ray


    node = {"node": ray.util.get_node_ip_address(), "node_id": ray.get_runtime_context().get_node_id()}
    if stop is not None and ray.get(stop.is_set.remote()):
        return {"status": "interrupted", **node}
    output = Path(trial["output"])
    resume = (output / CHECKPOINT).exists()
    before = _stamps(output)
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    outcome = {"status": "finished", **node}
    try:
        with open(trial["log"], "a", buffering=1) as log, _Watch(stop):
            log.write(f"== {time.strftime('%Y-%m-%d %H:%M:%S')} on {node['node']}: "
                      f"{'resume' if resume else 'train'} {trial['name']}\n")
            try:
                api.train(output, resume=resume, log=lambda line: print(line, file=log, flush=True),
                          **trial["settings"])
            except (Interrupted, KeyboardInterrupt):
                outcome["status"] = "interrupted"
            except UserError as e:  # a bad setting or combination, a non-finite loss: the run's one line
                outcome.update(status="failed", reason=str(e))
            except Exception as e:  # a bug: the traceback into the trial's log, one line for the table
                log.write(traceback.format_exc())
                outcome.update(status="failed", reason=f"{type(e).__name__}: {e}".splitlines()[0])
    except KeyboardInterrupt:  # the stop came just as training ended: the run folder is as it should be
        outcome["status"] = "interrupted"
    except OSError as e:
        outcome.update(status="failed", reason=files.error_line(trial["log"], e))
    finally:
        signal.signal(signal.SIGINT, previous)
    outcome["trained"] = _stamps(output) != before
    return outcome


def _stamps(folder):
    """When the files a training run updates were last written (to tell whether this trial trained)."""
    stamps = []
    for name in (CHECKPOINT, "metrics.csv", "evaluation.json"):
        try:
            stamps.append(os.stat(Path(folder) / name).st_mtime_ns)
        except OSError:
            stamps.append(None)
    return stamps


class _Watch:
    """A thread that asks the StopFlag every STOP_POLL_S and, once it is set (or the driver is gone), sends this
    process's main thread a SIGINT: training then writes its checkpoint and stops, as after a Ctrl-C."""

    def __init__(self, stop):
        self.stop, self.done = stop, threading.Event()
        self.thread = threading.Thread(target=self._watch, daemon=True)

    def __enter__(self):
        if self.stop is not None:
            self.thread.start()
        return self

    def _watch(self):

        import ray

        while not self.done.wait(STOP_POLL_S):
            try:
                stop = ray.get(self.stop.is_set.remote(), timeout=30)
            except Exception:  # the driver, and its flag, are gone
                stop = True
            if stop and not self.done.is_set():
                _thread.interrupt_main(signal.SIGINT)
                return

    def __exit__(self, *exc):
        self.done.set()
        if self.thread.is_alive():
            self.thread.join()


# ---------------------------------------------------------------- results

def read_metrics(folder):
    """The test metrics of a finished run: its last metrics.csv row, and evaluation.json's estimate."""
    folder, metrics = Path(folder), {}
    try:
        with open(folder / "metrics.csv", newline="") as f:
            rows = list(csv.DictReader(f))
        for key in ("test_neg_elbo", "test_neg_elbo_given_y", "test_accuracy"):
            if rows and rows[-1].get(key):
                metrics[key] = float(rows[-1][key])
        metrics["epochs"] = int(rows[-1]["epoch"]) if rows else 0
    except (OSError, ValueError, KeyError):
        pass
    try:
        evaluation = json.loads((folder / "evaluation.json").read_text())
        for key in ("iw_nll", "iw_nll_given_y"):
            if isinstance(evaluation.get(key), (int, float)):
                metrics[key] = float(evaluation[key])
                metrics["eval_k"] = evaluation.get("k")
    except (OSError, ValueError, AttributeError):
        pass
    return metrics


def mean_std(values):
    """Mean and sample standard deviation (None for one value)."""
    mean = sum(values) / len(values)
    std = math.sqrt(sum((x - mean) ** 2 for x in values) / (len(values) - 1)) if len(values) > 1 else None
    return mean, std


def summarise(sweep, status):
    """sweep.json's content: every trial's outcome and metrics, and each setting's mean ± std over its seeds."""
    trials, groups = [], {}
    for trial in sweep.trials:
        outcome = status.get(trial["name"], {"status": "not run"})
        row = {"run": trial["name"], "setting": trial["setting"], "seed": trial["seed"], **outcome}
        if outcome["status"] == "finished":
            row["metrics"] = read_metrics(trial["output"])
        trials.append(row)
        groups.setdefault(json.dumps(trial["setting"]), []).append(row)
    settings = []
    for rows in groups.values():
        finished = [row for row in rows if row["status"] == "finished"]
        metrics = {}
        for key in METRICS:
            values = [row["metrics"][key] for row in finished if key in row["metrics"]]
            if values:
                mean, std = mean_std(values)
                metrics[key] = {"mean": mean, "std": std, "n": len(values), "values": values}
        settings.append({"setting": rows[0]["setting"], "seeds": len(rows), "finished": len(finished),
                         "metrics": metrics,
                         "failed": [{"run": row["run"], "seed": row["seed"], "reason": row.get("reason", row["status"])}
                                    for row in rows if row["status"] != "finished"]})
    eval_k = sorted({row["metrics"]["eval_k"] for row in trials if row.get("metrics", {}).get("eval_k")})
    return {"grid": sweep.grid, "seeds": sweep.seeds, "settings_of_every_run": sweep.settings, "eval_k": eval_k,
            "results": settings, "trials": trials}


def write_results(out, results):
    files.write_json(out / "sweep.json", results)
    files.write_text(out / "sweep.md", table(results))
    plot(results, out / "sweep.png")


def _cell(metric, key):
    if metric is None:
        return "–"
    digits = 4 if key == "test_accuracy" else 2
    return f"{metric['mean']:.{digits}f}" + (f" ± {metric['std']:.{digits}f}" if metric["std"] is not None else "")


def _escape(cell):
    return cell.replace("|", "\\|")


def table(results):
    """sweep.md: a row per setting, mean ± standard deviation over its seeds; the failed trials with their reason."""
    grid, rows = list(results["grid"]), results["results"]
    keys = [key for key in METRICS if any(key in row["metrics"] for row in rows)]
    seeds = results["seeds"]
    lines = [f"Sweep of {' × '.join(grid) or 'one setting'} with {len(seeds)} seed{'s' if len(seeds) > 1 else ''} "
             f"({', '.join(map(str, seeds))}): mean ± standard deviation over the seeds of each setting, "
             f"in nats per test image (accuracy: the conditional model as a classifier).", ""]
    header = grid + ["seeds"] + [METRICS[key] for key in keys]
    lines += ["| " + " | ".join(header) + " |",
              "|" + "|".join("---" if name in grid and name in ("dataset", "likelihood", "binarize", "objective",
                                                                 "activation", "lr_schedule", "step", "precision",
                                                                 "device", "data_dir") else "---:"
                             for name in header) + "|"]
    for row in rows:
        finished = f"{row['finished']}" if row["finished"] == row["seeds"] else f"{row['finished']} of {row['seeds']}"
        lines.append("| " + " | ".join([_value(row["setting"][name]) for name in grid] + [finished]
                                       + [_cell(row["metrics"].get(key), key) for key in keys]) + " |")
    lines.append("")
    failed = [trial for row in rows for trial in row["failed"]]
    if failed:
        lines += ["Trials that did not finish:", "", "| run | reason |", "|---|---|"]
        lines += [f"| {trial['run']} | {_escape(trial['reason'])} |" for trial in failed]
        lines.append("")
    if results["eval_k"]:
        lines += [f"NLL (IW): the importance-weighted estimate with k = {', '.join(map(str, results['eval_k']))} "
                  f"(each run's evaluation.json).", ""]
    flags = " ".join(f"--{name} {value}" for name, value in results["settings_of_every_run"].items())
    lines += [f"Command: `{results['command']}`; every run: `{flags}`. Each run's folder is runs/NAME, its "
              f"training log logs/NAME.log.", ""]
    return "\n".join(lines)


def plot(results, path):
    """sweep.png: each metric against the first swept flag, one line for each value of the others, with error
    bars of one standard deviation over the seeds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows, grid = results["results"], list(results["grid"])
    keys = [key for key in METRICS if any(key in row["metrics"] for row in rows)] or ["test_neg_elbo"]
    x_name = grid[0] if grid else None
    x_values = results["grid"][x_name] if x_name else [None]
    numeric = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in x_values)
    positions = {json.dumps(v): (v if numeric else i) for i, v in enumerate(x_values)}
    fig, axes = plt.subplots(1, len(keys), figsize=(4.5 * len(keys), 3.8), dpi=100, squeeze=False)
    for ax, key in zip(axes[0], keys):
        lines = {}
        for row in rows:
            others = ", ".join(f"{name}={_value(row['setting'][name])}" for name in grid[1:])
            metric = row["metrics"].get(key)
            if metric is not None:
                x = positions[json.dumps(row["setting"][x_name])] if x_name else 0
                lines.setdefault(others, []).append((x, metric["mean"], metric["std"] or 0.0))
        for label, points in lines.items():
            points.sort()
            ax.errorbar([p[0] for p in points], [p[1] for p in points], yerr=[p[2] for p in points], marker="o",
                        ms=4, capsize=3, label=label or None)
        if x_name and numeric:
            ax.set_xticks(x_values)
            if min(x_values) > 0 and max(x_values) >= 100 * min(x_values):  # learning rates, say
                ax.set_xscale("log")
        else:
            ax.set_xticks(list(positions.values()) if x_name else [0])
            ax.set_xticklabels([_value(v) for v in x_values] if x_name else ["every run"])
        ax.set_xlabel(x_name or "")
        ax.set_ylabel("accuracy" if key == "test_accuracy" else "nats per test image")
        ax.set_title(_plain(METRICS[key]))
        ax.grid(alpha=0.3)
        if any(lines):
            ax.legend(fontsize=8)
    seeds = len(results["seeds"])
    fig.suptitle(f"mean ± standard deviation over {seeds} seed{'s' if seeds > 1 else ''}")
    fig.tight_layout()
    try:
        with files.atomic_path(path) as tmp:
            fig.savefig(tmp, format="png")
    finally:
        plt.close(fig)
