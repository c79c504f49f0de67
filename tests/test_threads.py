"""threads.py: the thread count follows the machine's load, and the results do not depend on it."""

import csv
import functools
import itertools
import json
import os
import subprocess
import sys
import time
import types
from pathlib import Path

import pytest
import torch

from mnist_vae import loop as train_module
from mnist_vae.fast import products, threads
from mnist_vae.config import Config
from mnist_vae.step import make_step
from mnist_vae.fast.threads import ThreadGovernor, machine_cpu_seconds
from mnist_vae.loop import make_model, train
from mnist_vae.outputs import Observer


@pytest.fixture
def two_threads():
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


class FakeMachine:
    """A clock, this process's CPU time and the machine's, moved by hand: `run(seconds, others, own)`."""

    def __init__(self):
        self.wall = self.machine = self.own = 0.0
        self.readable = True
        self.distance = 30.0  # ns for a write to pass between two threads: `distance` of the governors it makes

    def run(self, seconds, others, own=1.0):
        self.wall += seconds
        self.own += own * seconds
        self.machine += (others + own) * seconds

    def governor(self, threads=0, cpus=(0, 1), **options):
        options.setdefault("distance", lambda: self.distance)
        governor = ThreadGovernor(threads, interval=0.9, read=lambda cpus: self.machine if self.readable else None,
                                  clock=lambda: self.wall, own_cpu=lambda: self.own, **options)
        governor.cpus = list(cpus)
        governor.last = governor._sample() if not governor.fixed else None
        return governor


def test_one_thread_while_another_process_takes_a_core_and_two_again_after(two_threads):
    machine = FakeMachine()
    with machine.governor() as governor:
        machine.run(1.5, others=0.02, own=2.0)  # idle machine: both cores are ours
        governor()
        assert torch.get_num_threads() == 2
        machine.run(0.5, others=0.7, own=1.3)  # too soon after the last reading: nothing changes yet
        governor()
        assert torch.get_num_threads() == 2
        machine.run(0.6, others=0.7, own=1.3)  # a competing process got 0.7 of a core
        governor()
        assert torch.get_num_threads() == 1
        machine.run(1.0, others=1.0, own=1.0)  # it keeps its core while we run one thread
        governor()
        assert torch.get_num_threads() == 1
        machine.run(1.0, others=0.0, own=1.0)  # it ended
        governor()
        assert torch.get_num_threads() == 2
        assert governor.changes == 2
        machine.run(1.0, others=0.9, own=1.1)
        governor()
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == 2  # leaving gives torch back its count


def test_a_fixed_count_or_an_unreadable_machine_leaves_the_count_alone(two_threads):
    machine = FakeMachine()
    with machine.governor(threads=1) as governor:
        assert torch.get_num_threads() == 1
        machine.run(2.0, others=0.0, own=1.0)
        governor()
        assert torch.get_num_threads() == 1 and governor.changes == 0
    machine.readable = False
    with machine.governor() as governor:
        machine.run(2.0, others=1.5, own=0.5)
        governor()
        assert torch.get_num_threads() == 2 and governor.changes == 0


def test_machine_cpu_seconds_reads_the_cores_it_is_given(tmp_path):
    stat = tmp_path / "stat"
    stat.write_text("cpu  300 0 30 900 9 0 0 0 0 0\n"
                    "cpu0 100 0 10 300 3 0 0 0 0 0\n"
                    "cpu1 200 0 20 600 6 0 0 1 0 0\n"
                    "intr 12345\n")
    hz = os.sysconf("SC_CLK_TCK")
    assert machine_cpu_seconds({0}, stat) == pytest.approx(110 / hz)
    assert machine_cpu_seconds({0, 1}, stat) == pytest.approx(331 / hz)  # steal time counts as taken
    assert machine_cpu_seconds({0, 2}, stat) is None  # a core the file does not list
    assert machine_cpu_seconds({0}, tmp_path / "missing") is None


@pytest.mark.skipif(not Path("/proc/stat").exists() or len(os.sched_getaffinity(0)) != 2,
                    reason="reads Linux's /proc/stat on a 2-core machine, where one busy process takes half")
def test_a_real_competing_process_brings_the_count_down(two_threads):
    spin = "import time\nend = time.monotonic() + 20\nwhile time.monotonic() < end: pass\n"
    competitor = subprocess.Popen([sys.executable, "-c", spin])
    try:
        a = torch.randn(256, 256)
        with ThreadGovernor(interval=0.3) as governor:
            deadline = time.monotonic() + 10
            while torch.get_num_threads() == 2 and time.monotonic() < deadline:
                for _ in range(20):
                    a = torch.tanh(a @ a)
                governor()
            assert torch.get_num_threads() == 1, "one thread while another process took a core"
    finally:
        competitor.kill()
        competitor.wait()


def _on_one_thread(function):
    def pinned(*args, **kwargs):
        before = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            return function(*args, **kwargs)
        finally:
            torch.set_num_threads(before)
    return pinned


def _default_products_invariant():
    model = make_model(Config(), torch.device("cpu"))[0]
    return threads.invariant_counts(model, {128, 32, 64 * 3}, products.Products(torch.device("cpu"))) == [1, 2]


@pytest.fixture(params=["products on one thread", "products as this CPU's routine rounds them"])
def matrix_products(request, monkeypatch, two_threads):
    """The matrix products pinned to one thread, so that a test sees whether everything else (the C loops,
    Adam, the estimate) gives the same bits on any count; or left alone, where this CPU's routine gives
    the same bits on one thread as on two for the default model (MKL does not for every shape on every
    CPU, and a run then keeps its count: test_a_run_whose_products_round_otherwise_keeps_its_count)."""
    if request.param == "products on one thread":
        for owner, name in ((torch, "mm"), (torch, "addmm"), (torch.nn.functional, "linear"),
                            (products, "_onednn")):
            monkeypatch.setattr(owner, name, _on_one_thread(getattr(owner, name)))
    elif not _default_products_invariant():
        pytest.skip("this CPU's product routine rounds some of the default model's products otherwise on one "
                    "thread than on two, so runs here keep their thread count")
    return request.param


def _train_steps(threads_at_step, n_steps=25):
    torch.manual_seed(0)
    config = Config()
    model, optimizer = make_model(config, torch.device("cpu"))
    step = make_step(model, optimizer, config)
    x = torch.rand(128 * n_steps, 784, generator=torch.Generator().manual_seed(1))
    terms = []
    for i in range(n_steps):
        torch.set_num_threads(threads_at_step(i))
        terms.append(step(x[128 * i: 128 * (i + 1)], None, None))
    return torch.stack(terms), torch.cat([p.detach().flatten() for p in model.parameters()])


def test_the_fused_step_gives_the_same_bits_on_one_thread_or_two(matrix_products):
    terms_2, weights_2 = _train_steps(lambda i: 2)
    terms_mixed, weights_mixed = _train_steps(lambda i: 1 + i % 2)
    assert torch.equal(weights_2, weights_mixed)
    assert torch.equal(terms_2, terms_mixed)


def test_a_run_whose_thread_count_changes_every_step_matches_one_that_never_does(tmp_path, tiny_dataset,
                                                                                   matrix_products, monkeypatch):
    settings = dict(data_dir=str(tiny_dataset), num_epochs=2, batch_size=32, n_test=64, eval_k=3)
    train(Config(output=str(tmp_path / "steady"), threads=2, **settings), log=lambda *a: None)

    class Flipping(ThreadGovernor):  # one thread, then two, then one...: the worst a busy machine can do
        def __call__(self):
            torch.set_num_threads(3 - torch.get_num_threads())
            self.changes += 1

    monkeypatch.setattr(train_module, "ThreadGovernor", Flipping)
    train(Config(output=str(tmp_path / "flipping"), **settings), log=lambda *a: None)
    rows = {}
    for run in ("steady", "flipping"):
        with open(tmp_path / run / "metrics.csv", newline="") as f:
            rows[run] = [{k: v for k, v in row.items() if k != "seconds"} for row in csv.DictReader(f)]
    assert len(rows["steady"]) == 2 and rows["steady"] == rows["flipping"]
    steady, flipping = (json.loads((tmp_path / run / "evaluation.json").read_text()) for run in ("steady", "flipping"))
    assert "iw_nll" in steady
    assert {k: v for k, v in steady.items() if "seconds" not in k} == {k: v for k, v in flipping.items()
                                                                      if "seconds" not in k}


class _Rounding:
    """Products whose weight gradient rounds differently on one thread, as MKL's do for some shapes."""

    def linear(self, x, weight):
        return torch.mm(x, weight.t())

    def weight_grad(self, d_y, x, out):
        return torch.mm(d_y.t(), x, out=out).add_(1e-3 * (torch.get_num_threads() == 1))

    def input_grad(self, d_y, weight):
        return torch.mm(d_y, weight)


def test_the_probe_finds_a_product_that_rounds_otherwise_on_one_thread(two_threads):
    from mnist_vae.fast.products import Products

    model = make_model(Config(n_hidden=16, dim_z=2), torch.device("cpu"))[0]
    assert threads.invariant_counts(model, {8}, _Rounding()) == [2]  # no two counts agree: the count stays
    assert torch.get_num_threads() == 2  # the probe gives the count back
    torch.set_num_threads(1)  # one thread: nothing to compare
    assert threads.invariant_counts(model, {8}, _Rounding()) == [1]
    torch.set_num_threads(2)
    assert threads.invariant_counts(model, {8, 3}, Products(torch.device("cpu"))) in ([2], [1, 2])


class _RoundingOn(_Rounding):
    """Products whose weight gradient rounds differently on `count` threads alone."""

    def __init__(self, count):
        self.count = count

    def weight_grad(self, d_y, x, out):
        return torch.mm(d_y.t(), x, out=out).add_(1e-3 * (torch.get_num_threads() == self.count))


def test_the_probe_compares_every_count_a_run_may_choose_with_all(monkeypatch):
    model = make_model(Config(n_hidden=16, dim_z=2), torch.device("cpu"))[0]
    for name in ("mm", "addmm"):  # torch's own products on one thread: only _RoundingOn's may round otherwise
        monkeypatch.setattr(torch, name, _on_one_thread(getattr(torch, name)))
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(4)  # a run may choose 1, 2 or 4
        assert threads.invariant_counts(model, {8}, _RoundingOn(2)) == [1, 4]  # one agrees with all; two does not
        assert torch.get_num_threads() == 4
        assert threads.invariant_counts(model, {8}, _RoundingOn(1)) == [2, 4]
        assert threads.invariant_counts(model, {8}, _RoundingOn(3)) == [1, 2, 4]  # three is never chosen
        # all four round otherwise, and no fewer count agrees with them: the counts that agree with one thread
        assert threads.invariant_counts(model, {8}, _RoundingOn(4)) == [1, 2]
        assert torch.get_num_threads() == 4
    finally:
        torch.set_num_threads(before)


@pytest.fixture
def governors_made(monkeypatch):
    """(fixed, counts, torch's count) of each governor train makes, as it made them."""
    made = []

    class Recording(ThreadGovernor):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            made.append((self.fixed, self.counts, torch.get_num_threads()))

    monkeypatch.setattr(train_module, "ThreadGovernor", Recording)
    return made


def test_a_run_whose_products_round_otherwise_keeps_its_count(tmp_path, tiny_dataset, two_threads, monkeypatch,
                                                              governors_made):
    monkeypatch.setattr(train_module, "invariant_counts", lambda *a: [2])
    settings = dict(data_dir=str(tiny_dataset), num_epochs=1, batch_size=32, n_test=64, eval_k=2)
    train(Config(output=str(tmp_path / "kept"), **settings), log=lambda *a: None)
    monkeypatch.setattr(train_module, "invariant_counts", lambda *a: [1, 2])
    train(Config(output=str(tmp_path / "adapting"), **settings), log=lambda *a: None)
    assert [fixed for fixed, _, _ in governors_made] == [True, True, False, False]  # the loop's and the estimate's


def test_where_the_counts_are_one_threads_the_estimate_keeps_all_threads(tmp_path, tiny_dataset, monkeypatch,
                                                                         governors_made):
    monkeypatch.setattr(train_module, "invariant_counts", lambda *a: [1, 2])  # 4 threads round otherwise
    monkeypatch.setattr(threads, "step_products_seconds", lambda layers, batch, products, counts: {1: 1.0, 2: 0.5})
    before = torch.get_num_threads()
    torch.set_num_threads(4)
    try:
        train(Config(output=str(tmp_path / "run"), data_dir=str(tiny_dataset), num_epochs=1, batch_size=32, n_test=64,
                     eval_k=2), log=lambda *a: None)
    finally:
        torch.set_num_threads(before)
    assert governors_made == [(False, [1, 2], 2), (True, [4], 4)]  # training among one thread's counts; the estimate on all


def test_importing_mnist_vae_turns_on_mkls_reproducible_mode_unless_the_user_chose_one():
    show = "import os, mnist_vae; print(os.environ['MKL_CBWR'])"
    env = {k: v for k, v in os.environ.items() if k != "MKL_CBWR"}
    chosen = subprocess.run([sys.executable, "-c", show], env=env, capture_output=True, text=True, check=True)
    assert chosen.stdout.strip() == "AUTO,STRICT"
    kept = subprocess.run([sys.executable, "-c", show], env={**env, "MKL_CBWR": "COMPATIBLE"}, capture_output=True,
                          text=True, check=True)
    assert kept.stdout.strip() == "COMPATIBLE"


def test_the_counts_a_run_chooses_among_are_the_powers_of_two_below_all_and_all():
    assert threads.thread_counts(16) == [1, 2, 4, 8, 16]
    assert threads.thread_counts(12) == [1, 2, 4, 8, 12]
    assert threads.thread_counts(2) == [1, 2]
    assert threads.thread_counts(1) == [1]


def test_fewer_threads_are_chosen_only_where_they_beat_all_by_the_margin():
    # Burda et al.'s model at batch 20 on a 16-core machine: its 20-row products are fastest on 8 threads
    assert threads.fastest_thread_count({1: 1.19, 2: 1.04, 4: 0.90, 8: 0.86, 16: 1.66}) == 8
    assert threads.fastest_thread_count({1: 10.2, 2: 6.2, 4: 4.1, 8: 3.7, 16: 2.6}) == 16  # the defaults: all
    assert threads.fastest_thread_count({1: 3.0, 2: 0.95, 4: 1.0}) == 4  # 5% is within the timings' noise
    assert threads.fastest_thread_count({1: 3.0, 2: 0.85, 4: 1.0}) == 2
    assert threads.fastest_thread_count({1: 1.0}) == 1


class _Counting:
    """Products that record each call with the thread count it ran on."""

    def __init__(self):
        self.calls = []

    def _record(self, name, result):
        self.calls.append((name, torch.get_num_threads()))
        return result

    def linear(self, x, weight):
        return self._record("linear", torch.mm(x, weight.t()))

    def weight_grad(self, d_y, x, out=None, d_y_t=None):
        assert torch.equal(d_y_t, d_y.t())
        return self._record("weight_grad", torch.mm(d_y.t(), x, out=out))

    def input_grad(self, d_y, weight):
        return self._record("input_grad", torch.mm(d_y, weight))


def test_the_step_products_are_timed_on_each_count_in_turn_and_the_count_is_given_back(two_threads):
    model = make_model(Config(n_hidden=16, dim_z=2, objective="iwae", k_train=3), torch.device("cpu"))[0]
    layers = threads.product_layers(model, k=3)
    assert layers == [(784, 16, 1), (16, 16, 1), (16, 4, 1), (2, 16, 3), (16, 16, 3), (16, 784, 3)]
    counting = _Counting()
    seconds = threads.step_products_seconds(layers, 8, counting, [1, 2], rounds=2)
    assert set(seconds) == {1, 2} and all(0 < s < 1 for s in seconds.values())
    assert torch.get_num_threads() == 2
    one_step = [("linear", "weight_grad")] + [("linear", "weight_grad", "input_grad")] * (len(layers) - 1)
    one_step = [name for names in one_step for name in names]
    assert len(counting.calls) % len(one_step) == 0
    steps = [counting.calls[i:i + len(one_step)] for i in range(0, len(counting.calls), len(one_step))]
    assert all([name for name, _ in step] == one_step for step in steps)
    assert all(len({count for _, count in step}) == 1 for step in steps)  # a step on one count throughout
    runs = [count for count, _ in itertools.groupby(step[0][1] for step in steps[2:])]
    assert runs == [1, 2, 1, 2]  # after two set-up steps: two rounds, the counts in turn


def test_the_governor_starts_on_the_fastest_count_and_gives_torch_back_its_own(two_threads):
    with ThreadGovernor(most=1) as governor:
        assert torch.get_num_threads() == 1 and governor.most == 1
    assert torch.get_num_threads() == 2
    with ThreadGovernor(most=1, counts=[2]):  # the results would depend on the count: it stays
        assert torch.get_num_threads() == 2
    with ThreadGovernor(threads=2, most=1):  # --threads fixes the count
        assert torch.get_num_threads() == 2
    with ThreadGovernor(most=8) as governor:  # never more than torch's
        assert torch.get_num_threads() == 2 and governor.most == 2


def test_a_run_trains_on_the_count_its_products_ran_fastest_on_and_gives_the_same_bits(
        tmp_path, tiny_dataset, matrix_products, two_threads, monkeypatch):
    settings = dict(data_dir=str(tiny_dataset), num_epochs=2, batch_size=32, n_test=64, eval_k=3)
    train(Config(output=str(tmp_path / "all"), threads=2, **settings), log=lambda *a: None)

    class Count(Observer):
        seen = []

        def on_epoch_end(self, run, row):
            self.seen.append(torch.get_num_threads())

    monkeypatch.setattr(train_module, "invariant_counts", lambda *a: [1, 2])
    monkeypatch.setattr(threads, "step_products_seconds", lambda layers, batch, products, counts: {1: 0.5, 2: 1.0})
    monkeypatch.setattr(threads, "machine_cpu_seconds", lambda cpus: None)  # a busy machine would keep all threads
    logged = []
    train(Config(output=str(tmp_path / "one"), **settings), log=logged.append, observers=[Count()])
    assert Count.seen == [1, 1]
    assert "threads: 1 of 2, on which this model's products ran fastest" in logged
    assert torch.get_num_threads() == 2
    rows = {}
    for run in ("all", "one"):
        with open(tmp_path / run / "metrics.csv", newline="") as f:
            rows[run] = [{k: v for k, v in row.items() if k != "seconds"} for row in csv.DictReader(f)]
    assert len(rows["all"]) == 2 and rows["all"] == rows["one"]


def test_a_ceiling_below_all_is_timed_again_once_the_machine_is_quiet(two_threads):
    """A start-up timing that another process's moment of work made favour one thread must not halve a run."""
    machine, answers = FakeMachine(), []

    def probe():
        answers.append(machine.wall)
        return 2

    with machine.governor(counts=[1, 2], most=1, probe=probe) as governor:
        assert torch.get_num_threads() == 1
        machine.run(1.0, others=0.9, own=1.0)  # busy: a timing now would say the same again
        governor()
        assert answers == [] and torch.get_num_threads() == 1
        machine.run(1.0, others=0.1, own=1.0)  # quiet
        governor()
        assert answers == [2.0] and governor.most == 2 and torch.get_num_threads() == 2
        machine.run(1.0, others=0.0, own=2.0)
        governor()
        assert answers == [2.0]  # at all threads: nothing to time again
    assert torch.get_num_threads() == 2


def test_the_ceiling_is_timed_again_at_most_every_half_minute_and_three_times(two_threads):
    machine, answers = FakeMachine(), []

    def probe():
        answers.append(machine.wall)
        return 1  # one thread is the faster, every time

    with machine.governor(counts=[1, 2], most=1, probe=probe) as governor:
        for _ in range(200):
            machine.run(1.0, others=0.0, own=1.0)
            governor()
        assert governor.most == 1 and torch.get_num_threads() == 1
    assert len(answers) == threads.PROBES and answers[0] == 1.0
    assert all(b - a >= threads.PROBE_AGAIN_S for a, b in zip(answers, answers[1:]))
    with machine.governor(counts=[1, 2], most=1) as governor:  # no probe: the ceiling stays
        machine.run(1.0, others=0.0, own=1.0)
        governor()
        assert governor.most == 1


def test_the_products_are_timed_again_whenever_the_cores_move_apart_or_together(two_threads):
    """A virtual machine's host may move its CPUs from cores that share a cache to cores of two dies and back."""
    machine, answers = FakeMachine(), []

    def probe():
        answers.append(machine.wall)
        return 1 if machine.distance > 100 else 2  # one thread is the faster with the cores far apart

    with machine.governor(counts=[1, 2], most=2, probe=probe) as governor:
        machine.run(1.0, others=0.0, own=2.0)
        machine.distance = 45.0  # within the factor MOVED: the same placement
        governor()
        assert answers == [] and torch.get_num_threads() == 2
        machine.run(1.0, others=0.0, own=2.0)
        machine.distance = 180.0
        governor()
        assert answers == [2.0] and governor.most == 1 and torch.get_num_threads() == 1
        for _ in range(5):  # apart for a while: timed once, not at every reading
            machine.run(1.0, others=0.0, own=1.0)
            machine.distance = 170.0
            governor()
        assert answers == [2.0] and torch.get_num_threads() == 1
        machine.run(1.0, others=0.9, own=1.0)  # busy: the timing would follow the load, not the cores
        machine.distance = 30.0
        governor()
        assert answers == [2.0]
        machine.run(1.0, others=0.0, own=1.0)  # quiet again, and the cores are together
        governor()
        assert answers == [2.0, 9.0] and governor.most == 2 and torch.get_num_threads() == 2
        assert governor.moves == 2
    assert torch.get_num_threads() == 2
    with machine.governor(threads=2, counts=[1, 2], most=2, probe=probe) as governor:  # a fixed count stays
        machine.run(1.0, others=0.0, own=2.0)
        machine.distance = 500.0
        governor()
        assert governor.moves == 0 and torch.get_num_threads() == 2


def test_the_distance_between_two_threads_is_measured_where_the_c_loops_run_on_several(two_threads):
    from mnist_vae.fast import kernels
    if not kernels.available() or not kernels._kernels.openmp or len(os.sched_getaffinity(0)) < 2:
        assert kernels.core_distance_ns() is None or not kernels.available()
        pytest.skip("needs the C extension built with OpenMP and two cores")
    distances = [kernels.core_distance_ns() for _ in range(3)]
    # a write crosses between two cores in tens to a few hundred nanoseconds; 0 would mean no second thread
    assert all(d is not None and 1.0 < d < 100_000.0 for d in distances)
    assert kernels._kernels.core_distance(0) == 0.0


def test_the_distance_is_not_measured_on_one_core(monkeypatch):
    """Two threads on one core would take turns at the scheduler's pace: the reading would take seconds."""
    from mnist_vae.fast import kernels
    if kernels._kernels is not None:
        monkeypatch.setattr(kernels._kernels, "core_distance", lambda trips: pytest.fail("measured on one core"))
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0})
    assert kernels.core_distance_ns() is None


def test_a_run_whose_first_timing_chose_one_thread_goes_back_to_two_and_gives_the_same_bits(
        tmp_path, tiny_dataset, matrix_products, two_threads, monkeypatch):
    settings = dict(data_dir=str(tiny_dataset), num_epochs=2, batch_size=32, n_test=64)
    train(Config(output=str(tmp_path / "all"), threads=2, **settings), log=lambda *a: None)

    class Count(Observer):
        seen = []

        def on_epoch_end(self, run, row):
            self.seen.append((torch.get_num_threads(), run.step_threads))

    timings = iter([{1: 0.5, 2: 1.0}])  # the start-up timing; every later one finds two threads faster
    monkeypatch.setattr(train_module, "invariant_counts", lambda *a: [1, 2])
    monkeypatch.setattr(threads, "step_products_seconds",
                        lambda layers, batch, products, counts: next(timings, {1: 1.0, 2: 0.5}))
    quiet = lambda cpus: 0.0  # noqa: E731 (the machine's CPU seconds: no other process ever runs)
    monkeypatch.setattr(threads, "machine_cpu_seconds", quiet)
    # the governor reads the machine at every step, where a run this short would not reach its first second
    # and does not time the products again for the host moving the machine's CPUs meanwhile
    monkeypatch.setattr(train_module, "ThreadGovernor",
                        functools.partial(ThreadGovernor, interval=0.0, read=quiet, distance=lambda: None))
    logged = []
    train(Config(output=str(tmp_path / "again"), **settings), log=logged.append, observers=[Count()])
    assert "threads: 1 of 2, on which this model's products ran fastest" in logged
    assert ("threads: 2 of 2, on which this model's products ran fastest when timed again on a quiet machine"
            in logged)
    assert Count.seen == [(2, 2), (2, 2)]
    rows = {}
    for run in ("all", "again"):
        with open(tmp_path / run / "metrics.csv", newline="") as f:
            rows[run] = [{k: v for k, v in row.items() if k != "seconds"} for row in csv.DictReader(f)]
    assert len(rows["all"]) == 2 and rows["all"] == rows["again"]


def test_the_count_is_not_lowered_for_timings_taken_while_another_process_took_a_core(two_threads, monkeypatch):
    machine = FakeMachine()

    def timed(layers, batch_size, products, counts):
        machine.run(0.2, others=others, own=1.0)  # one thread was faster while it ran
        return {1: 0.5, 2: 1.0}

    monkeypatch.setattr(threads, "step_products_seconds", timed)
    monkeypatch.setattr(threads, "machine_cpu_seconds", lambda cpus: machine.machine)
    fake = dict(clock=lambda: machine.wall, own_cpu=lambda: machine.own)
    others = 0.9
    assert threads.fastest_step_threads([], 8, None, **fake) == 2
    others = 0.1
    assert threads.fastest_step_threads([], 8, None, **fake) == 1
    torch.set_num_threads(1)
    assert threads.fastest_step_threads([], 8, None, **fake) == 1


def test_the_governor_moves_only_among_the_counts_that_give_the_same_bits():
    machine = FakeMachine()
    before = torch.get_num_threads()
    torch.set_num_threads(4)
    try:
        def governor(**options):
            return machine.governor(cpus=range(4), **options)

        seen = []
        with governor(counts=[2, 4]) as checked:
            for others in (1.0, 3.2, 0.0, 2.0):  # cores free: 3, 1 (less than any count), 4, 2
                machine.run(1.0, others=others)
                checked()
                seen.append(torch.get_num_threads())
        assert seen == [2, 2, 4, 2]  # rounded down to a checked count, the fewest where none fits
        with governor() as any_count:  # the estimate's: torch's products there are not training's
            machine.run(1.0, others=1.0)
            any_count()
            assert torch.get_num_threads() == 3
        with governor(counts=[2, 4], most=2) as one_left:  # the fastest count is 2: nothing to move among
            for others in (0.0, 3.2):
                machine.run(1.0, others=others)
                one_left()
                assert torch.get_num_threads() == 2 and one_left.changes == 0
    finally:
        torch.set_num_threads(before)


def test_the_count_is_chosen_among_those_that_give_the_same_bits(monkeypatch):
    timed = []

    def seconds(layers, batch_size, products, counts):
        timed.append(list(counts))
        return {count: {1: 0.2, 2: 0.5, 4: 0.6, 8: 1.0}[count] for count in counts}

    monkeypatch.setattr(threads, "step_products_seconds", seconds)
    monkeypatch.setattr(threads, "machine_cpu_seconds", lambda cpus: None)
    assert threads.fastest_step_threads([], 20, None, counts=[2, 4, 8]) == 2  # not 1, which rounds otherwise
    assert threads.fastest_step_threads([], 20, None, counts=[8]) == 8  # nothing to time
    assert timed == [[2, 4, 8]]


def test_the_log_says_which_counts_were_left_out_for_rounding_differently(monkeypatch):
    before = torch.get_num_threads()
    torch.set_num_threads(4)
    try:
        monkeypatch.setattr(train_module, "fastest_step_threads", lambda layers, batch, products, counts: counts[-1])
        logged = []
        config = Config(n_hidden=16)
        run = types.SimpleNamespace(config=config, model=make_model(config, torch.device("cpu"))[0], step_function=None,
                                    device=torch.device("cpu"), log=logged.append)
        assert train_module.step_threads(run, [1, 2]) == 2
        assert train_module.step_threads(run, [1, 2, 4]) == 4  # all threads: nothing to say
    finally:
        torch.set_num_threads(before)
    assert logged == ["threads: 2 of 4, on which this model's products ran fastest of the counts where they give "
                      "the same bits (on 4 they round differently)"]


def test_a_model_without_an_encoder_and_a_decoder_has_its_linear_layers_timed_at_one_row_per_image():
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2))
    assert threads.product_layers(model, k=5) == [(3, 4, 1), (4, 2, 1)]
