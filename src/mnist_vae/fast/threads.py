"""Fair sharing of a busy CPU: fewer of torch's threads while other processes take cores.

torch's OpenMP threads meet at the end of every parallel region, and the first to
arrive spins until the others come. When another process takes one of the cores,
the thread that shares it runs half the time and its partner spins through the
rest: on 2 cores one competing process made an epoch 4-5 times slower, where
giving that core up and working on one thread costs about 2 times (measurements
in docs/speed.md). So every second or so `ThreadGovernor` reads how
much CPU time the rest of the machine used on this process's cores (Linux's
/proc/stat, less this process's own time) and sets torch's thread count to the
cores left free, at least one, and back up to the starting count once they are
free again. Results must not change with it: the step's kernels give the same bits on
any number of threads, and so do MKL's products in its strict reproducibility mode,
which importing mnist_vae turns on (MKL_CBWR, in __init__.py). Without that mode MKL
splits the inner dimension of some products between threads (on an AMD EPYC Zen 4: the
weight gradient of a layer with 6 or 10 outputs; on an Intel Xeon with AMX: the products
whose inner dimension is an image's 784 pixels), and oneDNN promises nothing either. So
before training `invariant_counts` computes each product of the run's own layers on all
threads and on 1, 2, 4, ... (the counts a run chooses among, below), and the run moves only
among the counts that gave the same bits as all, or, where no fewer count did, as one thread
(none: it keeps its count). The governor
rounds the cores left free down to one of them, so that the count is always one that was
checked, and a run interrupted and resumed on a busy machine still matches one trained alone
(tests/test_threads.py and the resume tests check both). Where /proc/stat cannot be
read (macOS, Windows) the thread count is left alone.

More threads are not always faster. A product of 20 rows split among 16 threads gives each
too little work for what their meeting costs, so on a many-core machine a small model's
step can run slower on all cores than on a few. Before training, `fastest_step_threads`
times the step's own products on those counts, and the governor keeps to the count that
was fastest: the results, again, do not depend on it. Where that count is below all, the
governor times them again once the machine is quiet, in case another process's moment of
work fell on the first timing.

Which count is fastest can also change while a run goes on. A virtual machine's host may run
its CPUs on cores that share a last-level cache, or on cores of two dies, and move them from
one placement to the other and back, for seconds or minutes at a time. Across dies, every cache
line that one thread writes and another reads takes several times as long to arrive, and a
small model's step, whose threads hand each other their products' outputs and meet at the end
of every parallel region many times a millisecond, can then run faster on one thread than on
two. So once a second, while the machine is quiet, the governor also times how long a write
takes to pass between two of torch's threads (kernels.core_distance_ns, a fraction of a
millisecond), and where that has doubled or halved since the products were last timed, it times
them again and keeps to the count they now run fastest on (docs/speed.md, "The cores' placement").
"""

import os
import time

import torch

from . import kernels

INTERVAL_S = 1.0  # how often the machine's load is read: long enough to average out the scheduler's ticks
# Fewer threads than all must beat all by this much to be chosen: timings of a fraction of a second move by
# a few per cent, and where all threads are about as fast, a fluke must not take cores from the step.
MARGIN = 0.1
TIMED_S = 0.005  # about how long each timing of the step's products lasts
# A ceiling below all threads is timed again where the machine is quiet: a moment of another process's work
# during the start-up timing, a few milliseconds long, must not halve the speed of a whole run. Quiet: other
# processes took less than this much of a core over the governor's last interval.
QUIET = 0.25
PROBE_AGAIN_S = 30.0  # after the first quiet interval, at most this often
PROBES = 3  # and this many times at most
# The products are timed again where the time for a write to pass between two threads has grown or shrunk by this
# factor since they were last timed: the two placements of a virtual machine's CPUs differ by several times, the
# timings within one by a few tens of per cent.
MOVED = 2.0


def machine_cpu_seconds(cpus, path="/proc/stat"):
    """Seconds of CPU time all processes spent so far on `cpus` (ids), from /proc/stat's cpuN lines;
    None where that file does not exist or reads otherwise than on Linux."""
    try:
        with open(path) as stat:
            lines = stat.read().splitlines()
    except OSError:
        return None
    ticks = 0
    found = 0
    for line in lines:
        name, *fields = line.split()
        if name.startswith("cpu") and name[3:].isdigit() and int(name[3:]) in cpus:
            # user nice system idle iowait irq softirq steal ...: all but idle and iowait were busy;
            # steal counts too, since a virtual CPU that the host gives to others is lost to us as well.
            values = [int(v) for v in fields[:8]]
            ticks += sum(values) - values[3] - values[4]
            found += 1
    if found != len(cpus):
        return None
    return ticks / os.sysconf("SC_CLK_TCK")


def own_cpus():
    """The ids of the cores this process may run on; none where the system does not say (macOS, Windows)."""
    return sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []


def load_sample(cpus, read, clock, own_cpu):
    """(wall clock, the machine's CPU seconds on `cpus` by `read`, this process's CPU seconds): a reading to take
    the difference of with a later one (others_cores); None where the machine's cannot be read."""
    machine = read(set(cpus)) if cpus else None
    return None if machine is None else (clock(), machine, own_cpu())


def others_cores(before, after):
    """Cores' worth of CPU time the rest of the machine used between two load_sample readings."""
    wall, machine, own = (b - a for a, b in zip(before, after))
    return max(0.0, machine - own) / max(wall, 1e-9)


def invariant_counts(model, batch_rows, products):
    """The counts among thread_counts(torch's count) that a run may move among without changing its results:
    those on which every matrix product of a training step of `model` (each nn.Linear's forward product,
    weight gradient and input gradient, by `products`, a products.Products, and torch.addmm as autograd
    does them), on batches of each of `batch_rows` rows, gives the same bits as on all threads, where a
    fewer count does; else those that give the same bits as on one thread, the serial result, where a
    greater count does; else torch's count alone. Which of the two sets it is depends on the bits alone,
    never on a timing."""
    most = torch.get_num_threads()
    counts = thread_counts(most)
    with_all, with_one = set(counts), set(counts)  # the counts that agreed so far with all, and with one
    generator = torch.Generator().manual_seed(0)
    layers = {(m.in_features, m.out_features) for m in model.modules() if isinstance(m, torch.nn.Linear)}
    try:
        for rows in sorted(set(batch_rows)):
            for n_in, n_out in sorted(layers):
                x, weight, d_y, bias = (torch.randn(shape, generator=generator)
                                        for shape in ((rows, n_in), (n_out, n_in), (rows, n_out), (n_out,)))
                for product in (lambda: products.linear(x, weight), lambda: torch.addmm(bias, x, weight.t()),
                                lambda: products.weight_grad(d_y, x, out=torch.empty(n_out, n_in)),
                                lambda: products.input_grad(d_y, weight), lambda: torch.mm(x.t(), d_y)):
                    if len(with_all) == 1 and len(with_one) == 1:
                        return [most]
                    results = {}
                    for count in sorted(with_all | with_one):
                        torch.set_num_threads(count)
                        results[count] = product()
                    with_all = {c for c in with_all if torch.equal(results[c], results[most])}
                    with_one = {c for c in with_one if torch.equal(results[c], results[1])}
    finally:
        torch.set_num_threads(most)
    return sorted(with_all if len(with_all) > 1 else with_one if len(with_one) > 1 else {most})


def product_layers(model, k=1):
    """(inputs, outputs, rows per image) of each Linear layer of `model`'s encoder, then its decoder's, whose
    rows are `k` per image (the importance-weighted bound's k draws of z); of a model without those two parts
    (a registered class), each of its Linear layers at one row per image."""
    parts = ((model.encoder, 1), (model.decoder, k)) if hasattr(model, "encoder") and hasattr(model, "decoder") \
        else ((model, 1),)
    return [(m.in_features, m.out_features, rows) for part, rows in parts
            for m in part.modules() if isinstance(m, torch.nn.Linear)]


def thread_counts(most):
    """The thread counts a run chooses among: 1, 2, 4, ... below `most`, and `most`."""
    return sorted({2 ** i for i in range(most.bit_length()) if 2 ** i < most} | {most})


def step_products_seconds(layers, batch_size, products, counts, rounds=2, clock=time.perf_counter):
    """{count: seconds}: the least, over `rounds` rounds that take the counts in turn, of the time one training
    step's matrix products take on that many threads: each layer of `layers` (product_layers) on its rows of a
    batch of `batch_size`, its forward product, weight gradient and (but the first's) input gradient, by
    `products` (a products.Products); torch's thread count is restored."""
    generator = torch.Generator().manual_seed(0)
    operands = []
    for index, (n_in, n_out, rows) in enumerate(layers):
        x, weight, d_y = (torch.randn(shape, generator=generator)
                          for shape in ((batch_size * rows, n_in), (n_out, n_in), (batch_size * rows, n_out)))
        operands.append((index, x, weight, d_y, d_y.t().contiguous(), torch.empty(n_out, n_in)))

    def step():
        for index, x, weight, d_y, d_y_t, grad_weight in operands:
            products.linear(x, weight)
            products.weight_grad(d_y, x, out=grad_weight, d_y_t=d_y_t)
            if index > 0:
                products.input_grad(d_y, weight)

    before = torch.get_num_threads()
    try:
        step()  # the first call of a routine sets it up
        started = clock()
        step()
        repeats = max(1, min(50, round(TIMED_S / max(clock() - started, 1e-9))))
        seconds = {count: float("inf") for count in counts}
        for _ in range(rounds):
            for count in counts:
                torch.set_num_threads(count)
                step()  # threads woken or parked
                started = clock()
                for _ in range(repeats):
                    step()
                seconds[count] = min(seconds[count], (clock() - started) / repeats)
    finally:
        torch.set_num_threads(before)
    return seconds


def fastest_step_threads(layers, batch_size, products, counts=None, clock=time.perf_counter,
                         own_cpu=time.process_time):
    """The thread count among `counts` (by default thread_counts(torch's count)) on which one training step's
    products (step_products_seconds' arguments) ran fastest; the most of them where other processes took more
    than half a core while they were timed, since the count would then fit the moment's load (which the
    governor follows) rather than the model."""
    counts = thread_counts(torch.get_num_threads()) if counts is None else sorted(counts)
    most = counts[-1]
    if len(counts) == 1:
        return most
    cpus = own_cpus()
    before = load_sample(cpus, machine_cpu_seconds, clock, own_cpu)
    seconds = step_products_seconds(layers, batch_size, products, counts)
    after = load_sample(cpus, machine_cpu_seconds, clock, own_cpu)
    if before is not None and after is not None and others_cores(before, after) > 0.5:
        return most
    return fastest_thread_count(seconds)


def fastest_thread_count(seconds, margin=MARGIN):
    """The count to run on, from step_products_seconds' timings: the fastest where it beats the most threads
    timed by `margin` and more, else the most."""
    most = max(seconds)
    fastest = min(seconds, key=seconds.get)
    return fastest if seconds[fastest] < (1 - margin) * seconds[most] else most


class ThreadGovernor:
    """Call it often (every training step, every batch of an estimate); about once a second it sets
    torch.set_num_threads to the cores that other processes leave free, rounded down to one of `counts`
    (invariant_counts'; None: any count up to torch's at start), or the fewest of them where none fits.
    `threads` > 0 fixes the count instead (the governor then does nothing), and so does a single count.
    `most`, where the count may follow the load, lowers the ceiling (fastest_step_threads'); the count starts
    there. `probe`, a function that gives that count anew (fastest_step_threads on the step's products), is
    called where the ceiling is below all threads and the machine has been quiet, after the first such
    interval and then every PROBE_AGAIN_S at most, PROBES times at most: the ceiling becomes its answer. It is
    called too, as often as that happens, where an interval was quiet and `distance` (the nanoseconds a write
    takes to pass between two threads, or None where unknown) has changed by MOVED times or more since the
    last answer: the host moved the CPUs (the module's docstring)."""

    def __init__(self, threads=0, interval=INTERVAL_S, read=machine_cpu_seconds, clock=time.perf_counter,
                 own_cpu=time.process_time, counts=None, most=None, probe=None, distance=kernels.core_distance_ns):
        self.read, self.clock, self.own_cpu, self.interval = read, clock, own_cpu, interval
        self.cpus = own_cpus()
        self.start = torch.get_num_threads()
        self.allowed = sorted(range(1, self.start + 1) if counts is None else counts)
        self.fixed = threads > 0 or len(self._under(None)) == 1  # one count: the results would depend on any other
        self._set_ceiling(most)
        self.probe, self.probes_left, self.probed_at = probe, PROBES, None
        self.distance = distance if probe is not None and not self.fixed else None
        self.probed_distance = self.distance() if self.distance is not None else None  # when `most` was timed
        self.moves = 0  # how many times the products were timed again as the distance changed
        if threads > 0:
            torch.set_num_threads(threads)
        elif self.most != self.start:
            torch.set_num_threads(self.most)
        self.last = self._sample() if not self.fixed else None
        self.changes = 0  # how many times it changed the count: the bench and the tests read it

    def _under(self, ceiling):
        """The allowed counts up to `ceiling` (None: torch's count at the start), or that count alone where none is."""
        ceiling = min(ceiling or self.start, self.start)
        return [c for c in self.allowed if c <= ceiling] or [self.start]

    def _set_ceiling(self, ceiling):
        self.counts = self._under(ceiling)
        self.most = self.counts[-1]

    def _sample(self):
        return load_sample(self.cpus, self.read, self.clock, self.own_cpu)

    def _probe_again(self, others, now, distance):
        """Time the step's products again where the ceiling is below all and the machine was quiet (__init__);
        `distance` is this interval's reading, kept as the one the timing was taken at."""
        if (self.probe is None or not self.probes_left or others >= QUIET or self.most >= self.allowed[-1]
                or (self.probed_at is not None and now - self.probed_at < PROBE_AGAIN_S)):
            return
        self.probes_left -= 1
        self._set_ceiling(self.probe())
        self.probed_at = self.clock()
        self.probed_distance = distance

    def _follow_the_cores(self, distance):
        """Time the step's products again where `distance`, this quiet interval's reading of the time between two
        threads (None: not read or unknown), changed by MOVED times since they were last timed (__init__)."""
        if distance is None:
            return
        if self.probed_distance is None:
            self.probed_distance = distance
            return
        if max(distance / self.probed_distance, self.probed_distance / distance) >= MOVED:
            self._set_ceiling(self.probe())
            self.probed_distance, self.probed_at = distance, self.clock()  # a quiet timing: not again at once
            self.moves += 1

    def __call__(self):
        if self.last is None or self.clock() - self.last[0] < self.interval:
            return
        now = self._sample()
        if now is None:
            self.last = None
            return
        others = others_cores(self.last, now)
        self.last = now
        # one reading of where the cores are, on a quiet machine only, for both reasons to time the products again
        distance = self.distance() if self.distance is not None and others < QUIET else None
        self._probe_again(others, now[0], distance)
        self._follow_the_cores(distance)
        free = round(len(self.cpus) - others)
        threads = max((c for c in self.counts if c <= free), default=self.counts[0])
        if threads != torch.get_num_threads():
            torch.set_num_threads(threads)
            self.changes += 1

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        """Give torch back the count it had at the start, for whatever the process does next."""
        torch.set_num_threads(self.start)
