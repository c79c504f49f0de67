"""`mnist-vae sweep` on Ray Tune: a 2 x 2 grid x 2 seeds on a local Ray, stopped by SIGINT and run again, its
table, and its runs' numbers those of runs trained without a stop; a sweep on a two-node Ray cluster started
with `ray start` on 127.0.0.1; its bad flags, the TOML file, and the missing extra.

The sweeps train tiny runs (a few hundred images of a made-up dataset, one epoch, 8 hidden units), so
their time is Ray's start and the workers' imports. Without Ray Tune installed the tests that need it
skip, except with CI=true, where `make test` installs the extra and they must run."""

import importlib.util
import json
import math
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
from pathlib import Path
from types import SimpleNamespace

import pytest

from conftest import assert_one_line_error, main, make_idx_dataset, read_metrics, run_command

CI = os.environ.get("CI") == "true"
HAVE_RAY = importlib.util.find_spec("ray") is not None
VENV_BIN = Path(sys.executable).parent
TIMEOUT = 600
# The environment a sweep sets up for itself; the in-process tests keep the test process's as it was.
RAY_ENV = ("RAY_USAGE_STATS_ENABLED", "RAY_AIR_NEW_OUTPUT", "TUNE_DISABLE_SIGINT_HANDLER",
           "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "RAY_AUTH_MODE", "RAY_AUTH_TOKEN")


@pytest.fixture
def needs_ray():
    if not HAVE_RAY:
        if CI:
            pytest.fail("Ray Tune is not installed; `make test` installs the sweep extra")
        pytest.skip("Ray Tune is not installed (pip install 'mnist-vae[sweep]')")


@pytest.fixture
def keep_environment(monkeypatch):
    for name in RAY_ENV:  # set, then removed: monkeypatch puts back each as it was, present or not
        monkeypatch.setenv(name, "")
        monkeypatch.delenv(name)


@pytest.fixture(scope="module")
def ray_env():
    """The environment of the Ray processes the tests start: their session folders (logs, sockets) in a
    folder of the test's own, short enough for Unix socket paths, removed afterwards."""
    folder = tempfile.mkdtemp(prefix="ray-", dir="/tmp")
    yield {"RAY_TMPDIR": folder}
    shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_idx_dataset(tmp_path_factory.mktemp("sweep") / "data", n_train=256, n_test=64, seed=5)


def tiny(data):
    return ["--n_train", "200", "--n_test", "50", "--num_epochs", "1", "--n_hidden", "8", "--batch_size", "50",
            "--PRR_n_img_x", "3", "--PRR_n_img_y", "3", "--PMLR_n_img_x", "3", "--PMLR_n_img_y", "3",
            "--PMLR_n_samples", "50", "--eval_k", "2", "--data_dir", str(data)]


GRID = ["--grid", "dim_z=2,3", "--grid", "conditional=false,true", "--seeds", "2"]


def sweep_until_the_third_start(args, env):
    """Run `mnist-vae sweep ARGS` and send it SIGINT as a third trial starts (one is done, that one runs, five
    are to come); its exit status, stdout and stderr."""
    command = [str(VENV_BIN / "mnist-vae"), "sweep", *map(str, args)]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, bufsize=1,
                               env={**os.environ, **env})
    watchdog = threading.Timer(TIMEOUT, process.kill)
    watchdog.start()
    try:
        lines = []
        for line in process.stdout:
            lines.append(line)
            if sum(line.startswith("start ") for line in lines) == 3:
                process.send_signal(signal.SIGINT)
                break
        rest, err = process.communicate()
    finally:
        watchdog.cancel()
    return SimpleNamespace(returncode=process.returncode, stdout="".join(lines) + rest, stderr=err)


@pytest.fixture(scope="module")
def swept(data, ray_env, tmp_path_factory):
    """A sweep stopped by SIGINT, then the same command again, which goes on to the end: the two Ray sessions of
    this file's local sweeps (each start of Ray is most of a tiny sweep's time)."""
    if not HAVE_RAY:
        pytest.skip("Ray Tune is not installed")
    out = tmp_path_factory.mktemp("sweep") / "out"
    stopped = sweep_until_the_third_start([*GRID, *tiny(data), "--out", out], ray_env)
    left = sorted(path.name for path in out.rglob("*.tmp"))
    table_after_stop = (out / "sweep.md").exists()
    again = run_command("sweep", *GRID, *tiny(data), "--out", out, timeout=TIMEOUT, env=ray_env)
    assert again.returncode == 0, again.stdout + again.stderr
    return SimpleNamespace(out=out, stopped=stopped, left=left, table_after_stop=table_after_stop, again=again)


# ---------------------------------------------------------------- a local sweep

def test_sweep_trains_every_trial_as_a_run_folder_and_tables_them(needs_ray, swept):
    out = swept.out
    results = json.loads((out / "sweep.json").read_text())
    done_before = {line.split()[1].rstrip(":") for line in swept.stopped.stdout.splitlines()
                   if line.startswith("done ")}
    names = sorted(p.name for p in (out / "runs").iterdir())
    assert names == sorted(f"dim_z={d},conditional={c},seed={s}" for d in (2, 3) for c in (False, True)
                           for s in (0, 1))
    for trial in results["trials"]:  # each an ordinary run: its own seed, one thread, on the local Ray
        config = json.loads((out / "runs" / trial["run"] / "config.json").read_text())
        assert (config["seed"], config["dim_z"], config["conditional"], config["threads"]) == \
               (trial["seed"], trial["setting"]["dim_z"], trial["setting"]["conditional"], 1)
        assert trial["status"] == "finished" and trial["node"] == "127.0.0.1"
        assert trial["trained"] == (trial["run"] not in done_before)  # those done before the stop were not again
    # The numbers are the runs' own, mean and sample standard deviation over the two seeds.
    assert len(results["results"]) == 4
    for row in results["results"]:
        conditional = row["setting"]["conditional"]
        given = "_given_y" if conditional else ""
        runs = [out / "runs" / f"dim_z={row['setting']['dim_z']},conditional={conditional},seed={s}" for s in (0, 1)]
        elbo = [float(read_metrics(run)[-1][f"test_neg_elbo{given}"]) for run in runs]
        nll = [json.loads((run / "evaluation.json").read_text())[f"iw_nll{given}"] for run in runs]
        metrics = row["metrics"]
        assert set(metrics) == ({"test_neg_elbo_given_y", "iw_nll_given_y", "test_accuracy"} if conditional
                                else {"test_neg_elbo", "iw_nll"})
        assert metrics[f"test_neg_elbo{given}"]["values"] == elbo
        assert metrics[f"test_neg_elbo{given}"]["mean"] == pytest.approx(sum(elbo) / 2)
        assert metrics[f"test_neg_elbo{given}"]["std"] == pytest.approx(abs(elbo[0] - elbo[1]) / math.sqrt(2))
        assert metrics[f"iw_nll{given}"]["values"] == nll
        assert row["finished"] == row["seeds"] == 2 and row["failed"] == []
    table = (out / "sweep.md").read_text()
    rows = [line for line in table.splitlines() if line.startswith("| 2 ") or line.startswith("| 3 ")]
    assert len(rows) == 4 and all(line.count("±") == (3 if "True" in line else 2) for line in rows), table
    assert "test −ELBO of log p(x\\|y)" in table and "k = 2" in table and "mnist-vae sweep --grid" in table
    png = (out / "sweep.png").read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) > 10000
    assert not (out / ".tune").exists() and not list(out.rglob("*.tmp"))


def test_sweep_prints_a_line_for_each_start_and_end_with_the_counts(needs_ray, swept):
    first, again = swept.stopped.stdout.splitlines(), swept.again.stdout.splitlines()
    for lines in (first, again):
        assert lines[0].startswith("sweep: 8 trials (2 dim_z × 2 conditional × 2 seeds)") and "127.0.0.1" in lines[0]
    assert sum(line.startswith("start ") for line in first) == 3
    # Run again, every trial starts; those done before say so, the others train.
    earlier = sum(line.startswith("done ") and ": finished earlier, test −ELBO" in line for line in again)
    trained = sum(line.startswith("done ") and ": trained, test −ELBO" in line for line in again)
    assert sum(line.startswith("start ") for line in again) == 8
    assert earlier >= 1 and earlier + trained == 8, swept.again.stdout
    assert earlier == sum(line.startswith("done ") for line in first)
    assert "[8 done, 0 running, 0 failed, of 8]" in swept.again.stdout
    for result in (swept.stopped, swept.again):
        assert "Configuration for experiment" not in result.stdout
    assert "Traceback" not in swept.again.stderr


def test_sweep_stopped_by_sigint_and_run_again_ends_as_uninterrupted_runs_do(needs_ray, swept, data, tmp_path):
    stopped = swept.stopped
    assert stopped.returncode == 130, stopped.stdout + stopped.stderr
    assert "Traceback" not in stopped.stderr and "interrupted" in stopped.stderr
    assert "run the same command again" in stopped.stderr
    assert "stopped " in stopped.stdout and not swept.table_after_stop and swept.left == []
    # Every trial's numbers, the stopped one's and those never begun before the stop among them, are those of
    # the same run trained from start to end without a stop.
    from mnist_vae import api

    def numbers(folder):  # all but the seconds each part took
        rows = [{key: value for key, value in row.items() if key != "seconds"} for row in read_metrics(folder)]
        evaluation = json.loads((folder / "evaluation.json").read_text())
        return rows, {key: value for key, value in evaluation.items() if key != "seconds"}

    for trial in plan(*GRID, *tiny(data), "--out", swept.out).trials:
        folder = tmp_path / trial["name"]
        api.train(folder, log=lambda line: None, **trial["settings"])
        assert numbers(Path(trial["output"])) == numbers(folder), trial["name"]


# ---------------------------------------------------------------- on a Ray cluster

CLUSTER_SCRIPT = r"""
set -u
ip link set lo up  # the namespace's one interface: nothing here can reach another address
B="$VENV_BIN"
$B/ray start --head --block --node-ip-address 127.0.0.1 --port $PORT --disable-usage-stats \
    --include-dashboard=false --num-cpus 1 --object-store-memory 80000000 > "$LOGS/head.log" 2>&1 &
HEAD=$!
$B/ray start --block --address 127.0.0.1:$PORT --num-cpus 1 --object-store-memory 80000000 \
    > "$LOGS/worker.log" 2>&1 &
WORKER=$!
trap 'kill -TERM $WORKER $HEAD 2>/dev/null; wait $WORKER $HEAD 2>/dev/null' EXIT
nodes=0
for i in $(seq 90); do  # until both nodes are in the cluster
    nodes=$($B/ray status --address 127.0.0.1:$PORT 2>/dev/null | grep -cE '^ +1 node_[0-9a-f]+')
    [ "$nodes" = 2 ] && break
    sleep 1
done
echo "nodes: $nodes"
$B/mnist-vae sweep --address 127.0.0.1:$PORT --out "$OUT" "$@"
echo "sweep exit status: $?"
"""


def test_sweep_on_a_ray_cluster_of_two_nodes_on_127_0_0_1(needs_ray, data, ray_env, tmp_path):
    """A head and a worker started with `ray start`, as on two machines, inside a network namespace whose one
    interface is the loopback: the sweep's trials run on both nodes, and the failing ones are in the table."""
    unshare = shutil.which("unshare")
    if unshare is None or subprocess.run([unshare, "--net", "true"], capture_output=True).returncode != 0 \
            or shutil.which("ip") is None:
        if CI:
            pytest.fail("the cluster test needs `unshare --net` and `ip` (root, util-linux, iproute2)")
        pytest.skip("needs `unshare --net` and `ip`: a network namespace of its own (root)")
    out, logs = tmp_path / "out", tmp_path / "logs"
    logs.mkdir()
    env = {**os.environ, **ray_env, "VENV_BIN": str(VENV_BIN), "PORT": "6380", "OUT": str(out), "LOGS": str(logs),
           "RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32)}
    args = ["--grid", "learning_rate=0.001,1e20", "--seeds", "2", *tiny(data)]
    process = subprocess.Popen([unshare, "--net", "bash", "-c", CLUSTER_SCRIPT, "cluster", *args], env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        stdout, stderr = process.communicate(timeout=TIMEOUT)
    finally:  # the script stops both nodes; should it be stopped itself, so are they (Ray's fate sharing)
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
    assert "nodes: 2" in stdout, stdout + stderr + (logs / "worker.log").read_text()
    assert "sweep exit status: 1" in stdout, stdout + stderr  # two trials failed, two finished
    assert "on the Ray cluster at 127.0.0.1:6380" in stdout
    results = json.loads((out / "sweep.json").read_text())
    trials = results["trials"]
    assert {trial["node"] for trial in trials} == {"127.0.0.1"}
    assert len({trial["node_id"] for trial in trials}) == 2  # both nodes trained
    good, bad = results["results"]
    assert good["setting"] == {"learning_rate": 0.001} and good["finished"] == 2
    assert bad["finished"] == 0 and len(bad["failed"]) == 2
    assert all(re.match(r"the loss became (nan|inf)", trial["reason"]) for trial in bad["failed"])
    table = (out / "sweep.md").read_text()
    assert "| 1e+20 | 0 of 2 | – | – |" in table and "| learning_rate=1e+20,seed=1 | the loss became" in table


# ---------------------------------------------------------------- bad flags, the TOML file, no Ray

@pytest.mark.parametrize("args, needles", [
    (["--output", "x"], ["--output does not apply to a sweep", "--out"]),
    (["--threads", "2"], ["--threads_per_trial"]),
    (["--grid", "dim_z=2,0"], ["--grid dim_z=0", "at least 1"]),
    (["--grid", "dim_z=2,2"], ["given twice"]),
    (["--grid", "dimz=2"], ["dimz is not a training flag"]),
    (["--grid", "dim_z"], ["--grid dim_z: give a training flag and its values"]),
    (["--grid", "seed=1,2"], ["--seeds N"]),
    (["--dim_z", "zero"], ["--dim_z"]),
    (["--seeds", "0"], ["--seeds"]),
    (["--address", "127.0.0.1:6379", "--out", "relative"], ["--out relative", "absolute path"]),
    (["--address", "127.0.0.1"], ["HOST:PORT"]),
])
def test_bad_sweep_flags_are_one_line_before_ray_starts(tmp_path, capsys, monkeypatch, keep_environment,
                                                        args, needles):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setitem(sys.modules, "ray", None)  # never reached: the flags are checked first
    result = main(capsys, "sweep", *args)
    assert_one_line_error(result, *needles, code=2)
    assert list(tmp_path.iterdir()) == []


def test_sweep_without_ray_says_what_to_install(tmp_path, capsys, monkeypatch, keep_environment):
    # A None in sys.modules makes the import fail as on a machine without the package, installed or not.
    monkeypatch.setitem(sys.modules, "ray", None)
    monkeypatch.setitem(sys.modules, "ray.tune", None)
    result = main(capsys, "sweep", "--grid", "dim_z=2,4", "--out", tmp_path / "out")
    assert_one_line_error(result, "pip install 'mnist-vae[sweep]'", code=1)
    assert not (tmp_path / "out").exists()


def test_sweep_where_no_cluster_answers_is_one_line(needs_ray, tmp_path, capsys, keep_environment):
    import socket

    with socket.socket() as s:  # a port on 127.0.0.1 that nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    result = main(capsys, "sweep", "--address", f"127.0.0.1:{port}", "--out", tmp_path / "out")
    assert_one_line_error(result, f"--address 127.0.0.1:{port}", "no Ray cluster answers", "ray start --head")
    assert not (tmp_path / "out").exists()


def plan(*args):
    from mnist_vae import sweep

    parsed, rest = sweep.make_parser("mnist-vae").parse_known_args([str(arg) for arg in args])
    return sweep.plan(parsed, rest, "mnist-vae sweep")


def test_a_toml_file_gives_the_grid_seeds_and_settings_and_the_command_line_wins(tmp_path):
    config = tmp_path / "sweep.toml"
    config.write_text('seeds = 3\n[grid]\ndim_z = [2, 4]\ndataset = ["mnist", "fashion-mnist"]\n'
                      '[settings]\nnum_epochs = 60\nadd-noise = true\nlearning_rate = 3e-4\n')
    swept = plan("--config", config, "--out", tmp_path / "out")
    assert swept.grid == {"dim_z": [2, 4], "dataset": ["mnist", "fashion-mnist"]} and swept.seeds == [0, 1, 2]
    assert swept.settings == {"num_epochs": 60, "add_noise": True, "learning_rate": 3e-4, "threads": 1}
    assert [trial["name"] for trial in swept.trials[:4]] == [
        "dim_z=2,dataset=mnist,seed=0", "dim_z=2,dataset=mnist,seed=1", "dim_z=2,dataset=mnist,seed=2",
        "dim_z=2,dataset=fashion-mnist,seed=0"]
    assert swept.trials[0]["output"] == str((tmp_path / "out" / "runs" / "dim_z=2,dataset=mnist,seed=0").absolute())
    again = plan("--config", config, "--grid", "dim_z=10", "--grid", "beta=0.5,1", "--seeds", "1", "--seed", "7",
                 "--num_epochs", "5", "--threads_per_trial", "2", "--out", tmp_path / "out")
    assert again.grid == {"dataset": ["mnist", "fashion-mnist"], "dim_z": [10], "beta": [0.5, 1.0]}
    assert again.seeds == [7] and again.settings["num_epochs"] == 5 and again.settings["threads"] == 2
    assert again.trials[0]["settings"] == {"num_epochs": 5, "add_noise": True, "learning_rate": 3e-4, "threads": 2,
                                           "dataset": "mnist", "dim_z": 10, "beta": 0.5, "seed": 7}


@pytest.mark.parametrize("text, needle", [
    ("seeds = 3\n[grid\n", "not valid TOML"),
    ("seed = 3\n", "unknown key seed"),
    ("[grid]\ndim_z = [2, -1]\n", "[grid] dim_z=-1"),
    ("[settings]\noutput = 'x'\n", "[settings] output does not apply"),
    ("seeds = 0\n", "seeds = 0"),
])
def test_a_bad_toml_file_is_one_line(tmp_path, capsys, keep_environment, text, needle):
    config = tmp_path / "sweep.toml"
    config.write_text(text)
    result = main(capsys, "sweep", "--config", config, "--out", tmp_path / "out")
    assert_one_line_error(result, f"--config {config}", needle, code=2)


def test_the_table_of_a_sweep_with_a_failed_trial(tmp_path):
    """summarise and table, on run folders made by hand: the numbers, a failed trial's reason in the table."""
    from mnist_vae import sweep

    swept = plan("--grid", "dim_z=2,4", "--seeds", "2", "--out", tmp_path)
    status = {}
    for i, trial in enumerate(swept.trials):
        if trial["name"] == "dim_z=4,seed=1":
            status[trial["name"]] = {"status": "failed", "reason": "the loss became nan | at epoch 1"}
            continue
        folder = Path(trial["output"])
        folder.mkdir(parents=True)
        (folder / "metrics.csv").write_text(f"epoch,test_neg_elbo\n1,{100 + i}.0000\n")
        (folder / "evaluation.json").write_text(json.dumps({"iw_nll": 90.0 + i, "k": 5}))
        status[trial["name"]] = {"status": "finished", "trained": True}
    results = sweep.summarise(swept, status)
    results["command"] = "mnist-vae sweep --grid dim_z=2,4 --seeds 2"
    first, second = results["results"]
    assert first["metrics"]["test_neg_elbo"] == {"mean": 100.5, "std": pytest.approx(math.sqrt(0.5)), "n": 2,
                                                 "values": [100.0, 101.0]}
    assert second["metrics"]["iw_nll"] == {"mean": 92.0, "std": None, "n": 1, "values": [92.0]}
    table = sweep.table(results)
    assert "| 2 | 2 | 100.50 ± 0.71 | 90.50 ± 0.71 |" in table
    assert "| 4 | 1 of 2 | 102.00 | 92.00 |" in table
    assert "| dim_z=4,seed=1 | the loss became nan \\| at epoch 1 |" in table
    sweep.write_results(tmp_path, results)
    assert json.loads((tmp_path / "sweep.json").read_text())["results"][1]["failed"][0]["seed"] == 1
    assert (tmp_path / "sweep.png").read_bytes().startswith(b"\x89PNG")
