"""The tools around training: `mnist-vae reproduce --quick` and `mnist-vae bench --quick` (so neither can
rot), their bad arguments, --device selection, and --tensorboard without the package."""

import csv
import json
import math
import re
import shutil
import sys
from dataclasses import replace
from types import SimpleNamespace

import pytest
import torch

from conftest import FASHION_SYSTEM_DIR, ROOT, assert_one_line_error, main, make_idx_dataset, read_metrics, run_command
from conftest import MNIST_DIR as MNIST
from mnist_vae import loop as train_module
from mnist_vae import machine
from mnist_vae.config import Config
from mnist_vae.errors import UserError

FASHION_INSTALLED = (FASHION_SYSTEM_DIR / "train-images-idx3-ubyte.gz").is_file()


# ---------------------------------------------------------------- reproduce --quick

@pytest.fixture(scope="module")
def reproduced(tmp_path_factory):
    out = tmp_path_factory.mktemp("reproduce") / "results"
    result = run_command("reproduce", "--quick", "--out", out, "--data_dir", MNIST,
                         env={"XDG_CACHE_HOME": str(out.parent / "cache")})
    assert result.returncode == 0, result.stderr
    return SimpleNamespace(out=out, result=result)


def test_reproduce_writes_the_old_readmes_images(reproduced):
    out = reproduced.out
    names = ["input.jpg", "input_noise.jpg", "PRR_epoch_2_dim20_denoising.jpg", "PMLR_epoch_2.jpg",
             "PMLR_map_epoch_2.jpg"] + [f"PRR_epoch_2_dim{d}.jpg" for d in (2, 4, 10, 20)]
    if FASHION_INSTALLED:
        names += ["fashion_PMLR_epoch_2.jpg", "fashion_PMLR_map_epoch_2.jpg"]
    for name in names:
        assert (out / name).is_file() and (out / name).stat().st_size > 1000, name


def test_reproduce_table_states_its_numbers_and_command(reproduced):
    table = (reproduced.out / "results.md").read_text()
    results = json.loads((reproduced.out / "results.json").read_text())
    runs = {row["run"]: row for row in results["runs"]}
    assert set(runs) == {"dim2", "dim4", "dim10", "dim20", "dim20_denoising", "fashion_dim2", "dim20_binarized",
                         "cond_dim2", "fashion_cond_dim2"}
    for name, row in runs.items():
        if name.startswith("fashion") and not FASHION_INSTALLED:
            assert "skipped" in row
            continue
        # The table's numbers are the runs' own: their last metrics row and their evaluation.json;
        # a conditional run's bound -log p(x|y), under names of its own.
        given = "_given_y" if "cond" in name else ""
        elbo, nll, stderr = f"test_neg_elbo{given}", f"iw_nll{given}", f"iw_nll{given}_stderr"
        with open(reproduced.out / "runs" / name / "metrics.csv") as f:
            last = list(csv.DictReader(f))[-1]
        evaluation = json.loads((reproduced.out / "runs" / name / "evaluation.json").read_text())
        assert f"{row[elbo]:.4f}" == last[elbo]
        assert row[nll] == evaluation[nll] and evaluation["k"] == 10
        # The importance-weighted NLL is the tighter bound (up to its standard error).
        assert row[nll] < row[elbo] + 3 * row[stderr]
        line = next(line for line in table.splitlines() if line.startswith(f"| {name} |"))
        assert f"{row[elbo]:.2f}" in line and f"{row[nll]:.2f} ± {row[stderr]:.2f}" in line
        if given:
            assert f"{row['test_accuracy']:.4f}" == last["test_accuracy"] and last["test_accuracy"] in line
    assert "mnist-vae reproduce --quick" in table
    # Grey-level and binarized numbers stand in tables of their own, each saying what it is.
    grey, binarized = table.split("Likelihood bernoulli, binarize dynamic: ")
    assert grey.startswith("Likelihood bernoulli, binarize none: grey-level pixels")
    assert "| dim20_binarized |" in binarized and "| dim20_binarized |" not in grey
    assert "| dim20 |" in grey and "| dim20 |" not in binarized
    binarized, conditional = binarized.split("Conditional VAEs (`--conditional`), likelihood bernoulli, "
                                             "binarize none: ")
    assert "| cond_dim2 |" in conditional and "| cond_dim2 |" not in grey + binarized
    assert runs["dim20_binarized"]["binarize"] == "dynamic" and runs["dim20"]["binarize"] == "none"
    assert results["machine"]["cores"] >= 1


def test_reproduce_again_reuses_finished_runs(reproduced):
    before = (reproduced.out / "runs" / "dim4" / "checkpoint.safetensors").read_bytes()
    result = run_command("reproduce", "--quick", "--out", reproduced.out, "--data_dir", MNIST)
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("already complete; reusing it") == 7 + 2 * FASHION_INSTALLED
    assert (reproduced.out / "runs" / "dim4" / "checkpoint.safetensors").read_bytes() == before


# ---------------------------------------------------------------- bench --quick

def test_the_bench_sets_the_epochs_begun_with_the_cpus_apart_beside_the_rest():
    from mnist_vae import bench
    rows = [{"setting": "defaults", "epochs_s": [3.0, 4.0, 3.2], "floors_s": [2.4, 2.5, 2.4],
             "core_distances_ns": [30.0, 170.0, 40.0]},
            {"setting": "batch 64", "epochs_s": [5.0, 5.0], "floors_s": [2.5, 2.5], "core_distances_ns": [35.0, None]}]
    assert bench._placement_lines(rows) == [
        "cores: a write passed between two threads in 30-170 ns before the epochs; where it took over 60 ns "
        "(the CPUs moved apart):",
        "  defaults: 1 of 3 epochs, ratio 1.60, against 1.29 for the other 2"]
    rows[0]["core_distances_ns"] = [30.0, 40.0, 35.0]
    assert bench._placement_lines(rows) == [
        "cores: a write passed between two threads in 30-40 ns before the epochs, never over 60 ns"]
    assert bench._placement_lines([{**rows[1], "core_distances_ns": [None, None]}]) == []


def test_bench_quick_measures_and_writes_json(tmp_path):
    path = tmp_path / "bench.json"
    result = run_command("bench", "--quick", "--k", "1000", "5000", "--json", path,
                         env={"XDG_CACHE_HOME": str(tmp_path / "cache")})
    assert result.returncode == 0, result.stderr
    results = json.loads(path.read_text())
    (row,) = results["training"]
    assert row["setting"] == "defaults" and row["dim_z"] == 4 and row["batch_size"] == 128
    assert row["layers"] == [[784, 500, 1], [500, 500, 1], [500, 8, 1], [4, 500, 1], [500, 500, 1], [500, 784, 1]]
    # The machine, as lscpu describes it, in the JSON and in the table's first line.
    from mnist_vae.fast import products

    cpu = results["machine"]["lscpu"]
    assert cpu == products.cpu() and set(cpu) == {"vendor", "model_name", "family", "model", "extensions"}
    assert result.stdout.startswith(f"mnist-vae bench: {products.describe_cpu(cpu)}, ")
    assert row["epoch_s"] > 0 and row["floor_s"] > 0 and 1 <= row["threads"] <= results["machine"]["threads"]
    # the epoch trains from torch's count, as a user's run does, not held at the warm-up's (the floors' count)
    (epoch_threads,) = row["epoch_threads"]
    assert 1 <= epoch_threads <= results["machine"]["threads"]
    assert row["ratio"] == pytest.approx(row["epochs_s"][0] / row["floors_s"][0])
    assert row["images_per_s"] == pytest.approx(3000 / row["epoch_s"])
    evaluation = results["evaluation"]
    (estimate,) = evaluation["log_likelihood"]  # --k 1000 5000 in quick mode: k = 10 once
    assert evaluation["test_images"] == 500 and estimate["k"] == 10
    assert estimate["ratio"] == pytest.approx(estimate["seconds"] / estimate["floor_s"])
    assert estimate["floor_s"] == pytest.approx(sum(estimate["floors_s"]) / 2) and min(estimate["floors_s"]) > 0
    assert 50 < results["peak_rss_mb"] < 4000 and 0 < results["startup_help_s"] < 10
    # The printed table carries the same numbers.
    assert re.search(rf"defaults +fused +4 +128 +{epoch_threads} +{row['epoch_s']:.2f} +{row['floor_s']:.2f} +{row['ratio']:.2f} "
                     rf"{row['ratio']:.2f}-{row['ratio']:.2f} ", result.stdout), result.stdout  # one round: its ratio
    assert f"k=10, 500 test images: {estimate['seconds']:.1f} s, floor {estimate['floor_s']:.1f} s" in result.stdout
    assert 0 < row["adam_s"] < row["epoch_s"] and 0 < row["masks_s"] < row["epoch_s"]
    # +adam: the products with Adam's update after each step's, measured, not the sum of the two timed apart
    assert row["products_and_adam_ratio"] == pytest.approx(row["products_and_adam_s"][0] / row["floors_s"][0])
    # the last column: the routine of the floor, and the step's own where the floor's was another
    floor_by = row["floor_routine"] + ("" if row["step_routine"] == row["floor_routine"]
                                       else f" (the step's: {row['step_routine']})")
    assert re.search(rf" {row['products_and_adam_ratio']:.2f} +[-0-9]+/[-0-9]+  {re.escape(floor_by)}\n\(floor s: ",
                     result.stdout), result.stdout
    # Every routine is timed, the floors use the fastest, and the table says which the step uses.
    by_name = {r["routine"]: r for r in results["routines"]}
    assert {"torch.mm", "NumPy"} <= set(by_name) and results["step_routine"] in by_name
    assert results["fastest_routine"] == min(by_name, key=lambda name: by_name[name]["floor_s"])
    for r in by_name.values():
        assert r["gflop_per_s"] > 0 and r["peak_gflop_per_s"] > 0
        assert re.search(rf"{re.escape(r['routine'])} +{r['floor_s']:.2f} +{r['gflop_per_s']:.0f}", result.stdout)
    assert f"fastest on a default epoch: {results['fastest_routine']}" in result.stdout
    # The row's floor is by the routine fastest on its own products, each timed there (the table's last column).
    assert set(row["routine_floors_s"]) == set(by_name) and min(row["routine_floors_s"].values()) > 0
    assert row["floor_routine"] == min(row["routine_floors_s"], key=row["routine_floors_s"].get)
    # The one epoch's floor is the mean of the least of its round, in which every routine was timed before the
    # epoch, and of that routine timed again after it.
    (after,) = row["floors_after_s"]
    assert after > 0 and row["floor_routines"] == [row["floor_routine"]]
    (distance,) = row["core_distances_ns"]  # where the host had the CPUs, just before the epoch
    assert distance is None or (distance > 0 and "cores: a write passed between two threads in" in result.stdout)
    (before,) = row["floors_before_s"]
    assert row["floors_s"] == [pytest.approx((before + after) / 2)]
    # on the row's threads, or on one or torch's count where the fastest routine ran faster there (the CPUs on two
    # dies, or together again after a warm-up that ended on one)
    assert row["floor_threads"][0] in {row["threads"], 1, results["machine"]["threads"]}
    if row["floor_threads"] == [row["threads"]]:
        assert before == min(row["routine_floors_s"].values())
    else:
        assert before < min(row["routine_floors_s"].values())
    # Adam's bytes per second: back to back, and between the products (+adam's epoch less the same products by
    # the same routine, in the same round), beside the machine's copy within its last-level cache and beyond it.
    params = 784 * 500 + 500 + 500 * 500 + 500 + 500 * 8 + 8 + 4 * 500 + 500 + 500 * 500 + 500 + 500 * 784 + 784
    adam_bytes = 24 * params * 28  # 24 steps of 128 of the 3000 images
    assert row["adam_in_step_s"] == pytest.approx(row["products_and_adam_s"][0]
                                                  - row["routine_floors_s"][results["step_routine"]])
    assert row["adam_gb_per_s"] == pytest.approx(adam_bytes / row["adam_s"] / 1e9)
    if row["adam_in_step_s"] > 0:
        assert row["adam_in_step_gb_per_s"] == pytest.approx(adam_bytes / row["adam_in_step_s"] / 1e9)
    assert re.search(rf" {row['adam_gb_per_s']:.0f}/[-0-9]+  {re.escape(floor_by)}\n", result.stdout), result.stdout
    memory = results["memory"]
    cache = memory["last_level_cache_bytes"]
    assert cache is None or [copy["bytes"] for copy in memory["copies"]] == [cache // 4, cache * 8]
    assert all(copy["gb_per_s"] > 0 for copy in memory["copies"])
    assert f"MB last-level cache, {memory['copies'][0]['gb_per_s']:.0f} GB/s" in result.stdout or cache is None
    # The busy-CPU row: epochs with a competing process, against the unloaded epoch of the defaults row.
    busy = results["busy"]
    assert busy["unloaded_s"] == row["epoch_s"] and busy["epoch_s"] > 0 and busy["fixed_epoch_s"] > 0
    assert busy["ratio"] == pytest.approx(busy["epoch_s"] / row["epoch_s"])
    assert f"default epoch {busy['epoch_s']:.2f} s, {busy['ratio']:.2f} x" in result.stdout


def test_reproduce_runs_selects_runs_and_tables_every_finished_one(reproduced, capsys):
    result = main(capsys, "reproduce", "--quick", "--runs", "cond_dim2,dim4", "--out", reproduced.out,
                  "--data_dir", MNIST)
    assert result.returncode == 0, result.stderr
    assert "== cond_dim2" in result.stdout and "== dim4" in result.stdout
    table = (reproduced.out / "results.md").read_text()
    assert "| dim20 |" in table and "| cond_dim2 |" in table and "--runs cond_dim2,dim4" in table
    assert_one_line_error(main(capsys, "reproduce", "--quick", "--runs", "dim3", "--out", reproduced.out),
                          "--runs dim3", "cond_dim20")


def test_reproduce_seeds_trains_every_seed_and_tables_their_spread(reproduced, tmp_path, capsys):
    out = tmp_path / "results"
    for name in ("dim4", "cond_dim2"):  # their seed 0, trained by the quick reproduction
        shutil.copytree(reproduced.out / "runs" / name, out / "runs" / name)
    result = main(capsys, "reproduce", "--quick", "--seeds", "2", "--runs", "dim4,cond_dim2", "--out", out,
                  "--data_dir", MNIST)
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("already complete; reusing it") == 2  # seed 0 of each; seed 1 is trained
    results = json.loads((out / "results.json").read_text())
    rows = {row["run"]: row for row in results["runs"]}
    assert set(rows) == {"dim4", "cond_dim2"}
    for name, row in rows.items():
        given = "_given_y" if name.startswith("cond") else ""
        folders = [out / "runs" / name, out / "runs" / f"{name}_seed1"]
        assert [json.loads((folder / "config.json").read_text())["seed"] for folder in folders] == [0, 1]
        elbo = [float(read_metrics(folder)[-1][f"test_neg_elbo{given}"]) for folder in folders]
        estimates = [json.loads((folder / "evaluation.json").read_text()) for folder in folders]
        nll = [e[f"iw_nll{given}"] for e in estimates]
        assert [seed[f"test_neg_elbo{given}"] for seed in row["seeds"]] == pytest.approx(elbo, abs=1e-4)
        assert row[f"test_neg_elbo{given}"] == pytest.approx(sum(elbo) / 2, abs=1e-4)
        assert row["std"][f"test_neg_elbo{given}"] == pytest.approx(abs(elbo[0] - elbo[1]) / math.sqrt(2), abs=1e-4)
        assert row[f"iw_nll{given}"] == pytest.approx(sum(nll) / 2)
        assert row["std"][f"iw_nll{given}"] == pytest.approx(abs(nll[0] - nll[1]) / math.sqrt(2))
        assert row[f"iw_nll{given}_stderr"] == pytest.approx(sum(e[f"iw_nll{given}_stderr"] for e in estimates) / 2)
        assert elbo[0] != elbo[1]
    table = (out / "results.md").read_text()
    dim4 = rows["dim4"]
    assert (f"| dim4 (2 seeds) | mnist | 4 | no | 2 | {dim4['test_neg_elbo']:.2f} ± "
            f"{dim4['std']['test_neg_elbo']:.2f} | {dim4['iw_nll']:.2f} ± {dim4['std']['iw_nll']:.2f} (s.e. {dim4['iw_nll_stderr']:.2f}) |") in table
    cond = rows["cond_dim2"]
    assert f"{cond['test_accuracy']:.4f} ± {cond['std']['test_accuracy']:.4f} |" in table
    assert "--seeds 2" in table and "mean over its seeds ± their standard deviation" in table
    assert_one_line_error(main(capsys, "reproduce", "--paper", "iwae", "--seeds", "2", "--out", out),
                          "--seeds does not apply to --paper")


@pytest.mark.parametrize("name", ["bench-zen5.json", "bench-h200.json", "bench-xeon16.json"])
def test_bench_table_of_the_docs_runs_names_the_bf16_floors_routines(name):
    """The table of a run on a CPU with two bfloat16 routines, and of one on a CUDA GPU with one."""
    from mnist_vae.bench import format_table

    results = json.loads((ROOT / "docs" / name).read_text())
    (bf16_line,) = [line for line in format_table(results).splitlines() if line.startswith("bf16: ")]
    floors = [r for r in results["training"] if r["setting"] == "bf16"][0]["routine_floors_s"]
    if len(floors) > 1:
        assert bf16_line.endswith(", ".join(f"{routine} {seconds:.2f} s" for routine, seconds in floors.items()))
    else:
        assert bf16_line.endswith("by torch.mm, the one routine here that multiplies bfloat16")


def test_bench_table_names_the_threads_each_row_ran_on():
    """A run on 16 cores where Burda et al.'s model at batch 20 ran on 8; runs kept from before the column, on all."""
    from mnist_vae.bench import format_table

    for name, setting, threads in (("bench-xeon16.json", "Burda et al. b20", 8), ("bench-zen5.json", "defaults", 2)):
        results = json.loads((ROOT / "docs" / name).read_text())
        row = [r for r in results["training"] if r["setting"] == setting][0]
        assert row.get("threads", results["machine"]["threads"]) == threads
        assert re.search(rf"\n{setting} +fused +{row['dim_z']} +{row['batch_size']} +{threads} +{row['epoch_s']:.2f} ",
                         format_table(results))


def test_bench_table_gives_the_threads_of_each_rows_epochs():
    """Each epoch trains from torch's count and its governor may end it on fewer: the column gives the least and
    the most where they differ."""
    from mnist_vae.bench import format_table

    results = json.loads((ROOT / "docs" / "bench-zen5.json").read_text())
    row = [r for r in results["training"] if r["setting"] == "defaults"][0]
    row.update(epoch_threads=[2, 1, 2])
    assert re.search(rf"\ndefaults +fused +4 +128 +1-2 +{row['epoch_s']:.2f} ", format_table(results))
    row.update(epoch_threads=[2, 2, 2])
    assert re.search(rf"\ndefaults +fused +4 +128 +2 +{row['epoch_s']:.2f} ", format_table(results))


def test_bench_table_gives_the_spread_of_each_rows_rounds():
    """The least and the most of the epochs' ratios beside their median: a row the machine's phases moved shows it."""
    from mnist_vae.bench import format_table

    results = json.loads((ROOT / "docs" / "bench-zen5.json").read_text())
    row = [r for r in results["training"] if r["setting"] == "defaults"][0]
    row.update(epochs_s=[1.3, 2.6, 1.4], floors_s=[1.0, 1.0, 1.0], ratio=1.4)
    assert re.search(r"\ndefaults +fused .* 1\.40 1\.30-2\.60 ", format_table(results))


def test_bench_rounds_take_every_row_in_turn(monkeypatch):
    """A slow minute of the machine must fall on one round of several rows, not on every round of one: each
    row's warm-up first, then round after round of every row, each row with its precision's routines."""
    from mnist_vae import bench

    events = []

    class Row:
        def __init__(self, config, device, matmuls):
            self.name = config.output
            events.append(("warm-up", self.name, matmuls))

        def round(self):
            events.append(("round", self.name))

        def result(self):
            return {"rounds": sum(event == ("round", self.name) for event in events)}

    monkeypatch.setattr(bench, "TrainingRow", Row)
    configs = {"a": Config(output="a"), "b": Config(output="b", precision="bf16"), "c": Config(output="c")}
    rows = bench.bench_training(configs, torch.device("cpu"), 3, {"fp32": "F", "bf16": "B"}, log=lambda line: None)
    assert rows == {"a": {"rounds": 3}, "b": {"rounds": 3}, "c": {"rounds": 3}}
    assert events == [("warm-up", "a", "F"), ("warm-up", "b", "B"), ("warm-up", "c", "F")] + [
        ("round", name) for _ in range(3) for name in "abc"]


def test_bench_floor_reads_the_layers_of_the_model_it_times():
    """Depth, width, label columns and IWAE's draws: the floor's products are those of the row's own model."""
    from mnist_vae.bench import floor_epoch_seconds, product_shapes

    assert product_shapes(Config(dim_z=2, n_hidden=16)) == [
        (784, 16, 1), (16, 16, 1), (16, 4, 1), (2, 16, 1), (16, 16, 1), (16, 784, 1)]
    burda = Config(dim_z=50, n_hidden=200, activation="tanh", dropout=0.0, n_layers=1, conditional=True,
                   objective="iwae", k_train=5)
    assert product_shapes(burda) == [(794, 200, 1), (200, 100, 1), (60, 200, 5), (200, 784, 5)]
    deep = product_shapes(Config(dim_z=3, n_hidden=8, activation="relu", n_layers=3))
    assert [shape[:2] for shape in deep] == [(784, 8), (8, 8), (8, 8), (8, 6), (3, 8), (8, 8), (8, 8), (8, 784)]
    for dtype in ("fp32", "bf16"):
        seconds = floor_epoch_seconds(256, 128, product_shapes(burda), torch.device("cpu"), repeats=2, dtype=dtype)
        assert len(seconds) == 2 and all(s > 0 for s in seconds)


def test_bench_products_and_adam_update_every_parameter_after_each_step():
    """The +adam column's epoch: Adam's update of the row's own model once after each timed step's products."""
    from mnist_vae.bench import floor_epoch_seconds, product_shapes, step_for_adam

    config = Config(dim_z=2, n_hidden=16, dropout=0.0)
    step = step_for_adam(config, torch.device("cpu"))
    state = step.optimizer.state
    before = [p.detach().clone() for p in step.model.parameters()]
    assert {float(state[p]["step"]) for p in step.model.parameters()} == {1.0}  # its state created
    calls = []

    def adam():
        calls.append(1)
        step.adam_step()

    # 300 images in batches of 128: 3 steps an epoch, the last of 44; twice
    seconds = floor_epoch_seconds(300, 128, product_shapes(config), torch.device("cpu"), repeats=2, after_step=adam)
    assert len(seconds) == 2 and len(calls) == 6
    assert {float(state[p]["step"]) for p in step.model.parameters()} == {7.0}
    assert all(not torch.equal(b, p) for b, p in zip(before, step.model.parameters()))


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_bench_routines_compute_the_products_they_time(dtype):
    from mnist_vae.bench import epoch_gflop, product_shapes, routines

    g = torch.Generator().manual_seed(0)
    torch_dtype = torch.bfloat16 if dtype == "bf16" else torch.float32
    a, b = torch.randn(64, 30, generator=g).to(torch_dtype), torch.randn(20, 30, generator=g).to(torch_dtype)
    found = routines(torch.device("cpu"), dtype)
    assert ("NumPy" in found) == (dtype == "fp32")  # NumPy has no bfloat16
    for name, matmul in found.items():
        out = torch.empty(64, 20, dtype=torch_dtype)
        result = matmul(a, b.t(), out)  # oneDNN returns a new tensor; the others write into out
        result = result if name == "oneDNN" else out
        assert result.dtype == torch_dtype, name
        torch.testing.assert_close(result.float(), a.float() @ b.float().t(), msg=name,
                                   **({} if dtype == "fp32" else dict(rtol=1e-2, atol=0.1)))
    # 2 m n k per product: forward, weight gradient, and input gradient of all but the first layer
    assert epoch_gflop(1, product_shapes(Config(dim_z=20, n_hidden=500))) == pytest.approx(
        2 * (3 * 1_314_000 - 392_000) / 1e9)
    assert epoch_gflop(3, [(10, 20, 1), (20, 5, 4)]) == pytest.approx(2 * 3 * (2 * 200 + 3 * 400) / 1e9)


@pytest.mark.parametrize("command, args, flag", [
    ("bench", ["--epochs", "0"], "--epochs"),
    ("bench", ["--k", "-1"], "--k"),
    ("bench", ["--json", "/no/such/folder/b.json"], "--json"),
    ("bench", ["--device", "tpu"], "--device"),
    ("reproduce", ["--epochs", "zero"], "--epochs"),
    ("reproduce", ["--k", "-5"], "--k"),
    ("reproduce", ["--seeds", "0"], "--seeds"),
])
def test_bad_tool_arguments_are_one_line(capsys, command, args, flag):
    result = main(capsys, command, *args)
    assert_one_line_error(result, flag, code=2)


def test_reproduce_out_that_is_a_file(tmp_path, capsys):
    target = tmp_path / "results"
    target.write_text("mine")
    result = main(capsys, "reproduce", "--quick", "--out", target)
    assert_one_line_error(result, "is a file")
    assert target.read_text() == "mine"


# ---------------------------------------------------------------- --device

@pytest.mark.parametrize("cuda, mps, expected", [(True, True, "cuda"), (False, True, "mps"), (False, False, "cpu")])
def test_device_auto_picks_cuda_then_mps_then_cpu(monkeypatch, cuda, mps, expected):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: mps)
    assert machine.resolve_device("auto").type == expected
    assert machine.resolve_device("cpu").type == "cpu"


@pytest.mark.parametrize("name", ["cuda", "mps"])
def test_device_that_is_missing_is_refused(monkeypatch, name):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    with pytest.raises(UserError, match=f"--device {name}: no such device"):
        machine.resolve_device(name)


def test_device_cuda_missing_from_the_command_line(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    result = main(capsys, "--device", "cuda", "--output", tmp_path / "run", "--num_epochs", "1")
    assert_one_line_error(result, "--device cuda", "auto or cpu")
    assert not (tmp_path / "run").exists()


def test_training_on_the_cpu_keeps_data_and_model_there(tmp_path, capsys):
    data = make_idx_dataset(tmp_path / "data", n_train=64, n_test=32)
    result = main(capsys, "--device", "cpu", "--data_dir", data, "--output", tmp_path / "run", "--num_epochs", "1",
                  "--n_hidden", "16", "--batch_size", "32")
    assert result.returncode == 0, result.stderr
    assert json.loads((tmp_path / "run" / "config.json").read_text())["device"] == "cpu"


# ---------------------------------------------------------------- --tensorboard

def test_tensorboard_without_the_package_is_one_line(tmp_path, capsys, monkeypatch):
    # A None in sys.modules makes the import fail as on a machine without the package, installed or not.
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)
    result = main(capsys, "--tensorboard", tmp_path / "tb", "--output", tmp_path / "run", "--num_epochs", "1")
    assert_one_line_error(result, "--tensorboard", "pip install")
    assert not (tmp_path / "run").exists() and not (tmp_path / "tb").exists()


def test_tensorboard_logs_scalars_and_images(tmp_path, capsys):
    pytest.importorskip("tensorboard")
    data = make_idx_dataset(tmp_path / "data", n_train=64, n_test=32)
    result = main(capsys, "--tensorboard", tmp_path / "tb", "--data_dir", data, "--output", tmp_path / "run",
                  "--num_epochs", "2", "--n_hidden", "16", "--batch_size", "32")
    assert result.returncode == 0, result.stderr
    assert list((tmp_path / "tb").glob("events.out.tfevents.*"))


def test_reproduce_runs_keeps_the_rows_of_an_earlier_reproduction(tmp_path):
    from types import SimpleNamespace

    from mnist_vae import reproduce
    from mnist_vae.config import Config

    earlier = {"command": "mnist-vae reproduce --epochs 60", "runs": [
        {"run": "dim4", "dim_z": 4, "epochs": 60, "test_neg_elbo": 122.44, "iw_nll": 118.78, "iw_nll_stderr": 0.4,
         "likelihood": "bernoulli", "binarize": "none", "wall_seconds": 190.0},
        {"run": "fashion_dim2", "skipped": "no data"}]}
    (tmp_path / "results.json").write_text(json.dumps(earlier))
    rows = reproduce._earlier_rows(tmp_path / "results.json")
    assert list(rows) == ["dim4"] and rows["dim4"]["command"] == earlier["command"]
    args = SimpleNamespace(epochs=2, out=str(tmp_path), k=10, quick=False, data_dir=None, runs="cond_dim2")
    table = reproduce.results_table([rows["dim4"]], args, Config(eval_k=10))
    assert "| dim4 | mnist | 4 | no | 60 | 122.44 | 118.78 ± 0.40 |" in table
    assert "kept from an earlier `mnist-vae reproduce --epochs 60`" in table
    assert reproduce._earlier_rows(tmp_path / "missing.json") == {}


# ---------------------------------------------------------------- reproduce --paper iwae --quick

@pytest.fixture(scope="module")
def literature(tmp_path_factory):
    out = tmp_path_factory.mktemp("literature") / "results"
    result = run_command("reproduce", "--paper", "iwae", "--quick", "--out", out, "--data_dir", MNIST,
                         env={"XDG_CACHE_HOME": str(out.parent / "cache")})
    assert result.returncode == 0, result.stderr
    return SimpleNamespace(out=out, result=result)


def test_reproduce_paper_iwae_tables_burda_et_al_beside_its_runs(literature):
    from mnist_vae import checkpoint
    from mnist_vae.reproduce import BURDA_TABLE_1

    results = json.loads((literature.out / "literature.json").read_text())
    table = (literature.out / "literature.md").read_text()
    rows = {row["run"]: row for row in results["rows"]}
    assert list(rows) == ["iwae_paper_vae_k1", "iwae_paper_iwae_k5"]
    for name, row in rows.items():
        config, state, _ = checkpoint.load(literature.out / "runs" / name)
        # The paper's model and training, each run on its own budget, planned and spent as recorded.
        assert (config.dim_z, config.n_hidden, config.n_layers, config.activation, config.dropout) == (50, 200, 2, "tanh", 0)
        assert (config.binarize, config.adam_eps, config.batch_size, config.lr_schedule) == ("dynamic", 1e-4, 20, "paper")
        assert (config.objective, config.k_train) == (("elbo", 1) if row["model"] == "VAE" else ("iwae", 5))
        assert config.time_budget == results["budget_minutes"] == 0.02
        assert row["epochs"] == state["epoch"] >= 1 and row["planned_epochs"] == config.num_epochs
        assert row["training_seconds"] == pytest.approx(sum(r["seconds"] for r in state["history"]))
        # Its numbers are the run's own, finite, and the paper's is Table 1's for that model and k.
        evaluation = json.loads((literature.out / "runs" / name / "evaluation.json").read_text())
        assert row["nll"] == evaluation["iw_nll"] and evaluation["k"] == results["k"] == 10
        assert math.isfinite(row["nll"]) and math.isfinite(row["nll_stderr"]) and row["nll"] > 0
        assert row["paper_nll"] == BURDA_TABLE_1[(row["model"], row["k_train"])]
        line = next(line for line in table.splitlines() if line.startswith(f"| {row['model']} | k = {row['k_train']} |"))
        assert f"| {row['paper_nll']:.2f} | {row['nll']:.2f} ± {row['nll_stderr']:.2f} |" in line
    assert rows["iwae_paper_vae_k1"]["paper_nll"] == 86.76 and rows["iwae_paper_iwae_k5"]["paper_nll"] == 85.54
    assert "mnist-vae reproduce --paper iwae --quick" in table and results["machine"]["cores"] >= 1


def test_reproduce_paper_measures_other_test_binarizations(literature):
    from mnist_vae.data import binarize_test, load_tensors
    from mnist_vae.config import Config

    spread = json.loads((literature.out / "literature.json").read_text())["rows"][0]["binarizations"]
    assert spread["n"] == len(spread["nll"]) == 2 and all(math.isfinite(x) for x in spread["nll"])
    assert spread["mean"] == pytest.approx(sum(spread["nll"]) / 2)
    assert spread["difference"] == pytest.approx(spread["fixed"] - spread["mean"])
    assert f"{spread['mean']:.2f}" in (literature.out / "literature.md").read_text()
    # The fixed seed draws the very test set every binarized run is measured on; the others draw other ones.
    config = Config(n_test=200, n_train=1, data_dir=str(MNIST))
    binary = load_tensors(replace(config, binarize="dynamic"), torch.device("cpu"), log=lambda *a: None).test
    grey = load_tensors(config, torch.device("cpu"), log=lambda *a: None).test
    assert torch.equal(binarize_test(grey), binary) and not torch.equal(binarize_test(grey, 1), binary)


def test_paper_table_with_one_other_binarization_has_no_spread(literature):
    from mnist_vae.reproduce import literature_table

    results = json.loads((literature.out / "literature.json").read_text())
    spread = results["rows"][0]["binarizations"]
    one = {"n": 1, "nll": spread["nll"][:1], "mean": spread["nll"][0], "std": None, "fixed": spread["fixed"],
           "difference": spread["fixed"] - spread["nll"][0]}
    results["rows"][0]["binarizations"] = one
    text = literature_table(results)
    assert "nan" not in text.lower() and "standard deviation" not in text
    assert f"NLL {one['mean']:.2f}, against {one['fixed']:.2f} on the fixed one" in text
    assert "standard deviation" in literature_table(json.loads((literature.out / "literature.json").read_text()))


def test_reproduce_paper_again_reuses_its_runs(literature):
    before = (literature.out / "literature.json").read_text()
    result = run_command("reproduce", "--paper", "iwae", "--quick", "--out", literature.out, "--data_dir", MNIST)
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("already complete; reusing it") == 2 and "binarization 1:" not in result.stdout
    after = json.loads((literature.out / "literature.json").read_text())
    assert after["rows"] == json.loads(before)["rows"]


def test_reproduce_recipes_table_what_each_change_did(tmp_path, capsys):
    """Two recipes in two calls: each trained with its parent's settings and its own change, the second call's
    table holding both rows, the change column the difference of their NLLs."""
    from mnist_vae import checkpoint
    from mnist_vae.reproduce import RECIPES, recipe_settings

    out = tmp_path / "recipes"
    for recipe in ("paper", "batch100", "paper,batch100"):
        result = main(capsys, "reproduce", "--paper", "iwae", "--recipe", recipe, "--quick", "--out", out,
                      "--data_dir", MNIST)
        assert result.returncode == 0, result.stderr
    assert result.stdout.count("already complete; reusing it") == 2
    results = json.loads((out / "recipes.json").read_text())
    table = (out / "recipes.md").read_text()
    rows = {row["recipe"]: row for row in results["rows"]}
    assert list(rows) == ["paper", "batch100"] and rows["batch100"]["parent"] == "paper"
    config = checkpoint.load(out / "runs" / "recipe_batch100")[0]
    assert (config.objective, config.k_train, config.batch_size, config.warmup_epochs) == ("iwae", 5, 100, 1.0)
    assert recipe_settings("dreg") == {**recipe_settings("cosine"), "gradient": "dreg"}
    assert config.n_hidden == 200 and config.time_budget == 0.02 and RECIPES["batch100"][2] in table
    change = rows["batch100"]["nll"] - rows["paper"]["nll"]
    assert f"| {rows['batch100']['nll']:.2f} ± {rows['batch100']['nll_stderr']:.2f} | {change:+.2f} |" in table
    assert "--recipe paper,batch100 --quick" in table

    shutil.rmtree(out / "runs" / "recipe_paper")  # the run folders are not kept with the results; the rows are
    result = main(capsys, "reproduce", "--paper", "iwae", "--recipe", "batch100", "--quick", "--out", out,
                  "--data_dir", MNIST)
    assert result.returncode == 0, result.stderr
    kept = json.loads((out / "recipes.json").read_text())["rows"]
    assert [row["recipe"] for row in kept] == ["paper", "batch100"] and kept[0]["nll"] == rows["paper"]["nll"]
    assert kept[0]["command"].endswith("--recipe paper,batch100 --quick --out " + str(out))
    assert "--recipe batch100 --quick" in (out / "recipes.md").read_text()


@pytest.mark.parametrize("args, flag, code", [
    (["--paper", "iwae", "--recipe", "nothing"], "--recipe nothing", 1),
    (["--recipe", "paper"], "--recipe", 1),
    (["--paper", "iwae", "--epochs", "3"], "--epochs", 1),
    (["--paper", "iwae", "--runs", "dim4"], "--runs", 1),
    (["--budget", "5"], "--budget", 1),
    (["--paper", "vae"], "--paper", 2),
    (["--paper", "iwae", "--budget", "0"], "--budget", 2),
])
def test_bad_paper_arguments_are_one_line(capsys, args, flag, code):
    assert_one_line_error(main(capsys, "reproduce", *args), flag, code=code)


def test_reproduce_paper_refuses_runs_of_another_budget(literature, capsys):
    before = (literature.out / "literature.json").read_text()
    result = main(capsys, "reproduce", "--paper", "iwae", "--quick", "--budget", "0.5", "--out", literature.out,
                  "--data_dir", MNIST)
    assert_one_line_error(result, "--budget 0.02", "another --out")
    assert (literature.out / "literature.json").read_text() == before
