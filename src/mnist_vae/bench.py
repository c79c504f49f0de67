"""`mnist-vae bench`: training speed against the matrix-multiply floor, evaluation speed, a busy CPU, memory, start-up.

The floor of an epoch is the time of its matrix products alone: for every batch, the
forward product of each of the model's layers (read from the model the row trains:
its depth, width, label columns, and the decoder on k draws of z per image for IWAE),
the weight-gradient product of each, and the input-gradient product of all but the
first (the images need no gradient); same shapes, batch sizes, dtype, device and threads
as training, by the routine this process has for that dtype that is fastest on the row's
own products (in float32 torch.mm, oneDNN, NumPy's BLAS; in bfloat16 torch.mm and oneDNN):
each is timed before each of the row's epochs and the least of them is that epoch's floor,
and the table says which routine was fastest and which the training step uses. Floors and
epochs are measured in one process, in alternation, and the ratio is the median of each
epoch over the floor measured just before it, so a busy moment of the machine moves both.
Each round takes every row in turn, so that a slow minute of a shared machine falls on one
round of a few rows, which their medians leave out, and not on every round of one row.
Between the two, the same products by the step's own routine, with Adam's update after each step's, give the
`+adam` column: what the step would take if Adam were all it did besides its products,
with Adam's data leaving the cache between its updates as they do in training; the bytes
Adam moves per second there and back to back (`adam GB/s`) beside the machine's own copy
speed within its last-level cache and beyond it, which tell whether the cache or the memory
bounds Adam's update, the largest of a step's costs beyond its products. The
importance-weighted log-likelihood is measured against the decoder's matrix products for
every draw of z, timed just before the estimate and just after it (the mean of the two).
The busy-CPU row times default epochs while a competing process (a bounded busy loop)
takes one core. Every output names the CPU as
lscpu describes it (vendor, model name, family, model, vector extensions).
"""

import json
import math
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from . import checkpoint, files
from .arguments import Parser
from .config import Config, choice, integer, text
from .data import load_tensors
from .evaluation import evaluate, log_likelihood_estimate
from .fast import kernels, machine, products
from .fast.fused import FusedTrainStep
from .fast.products import _onednn, onednn_available
from .fast.threads import ThreadGovernor, product_layers
from .layers import dropout_bits
from .loop import make_model, threads_may_move, train
from .machine import resolve_device
from .model import build
from .outputs import Observer
from .step import make_step

SETTINGS = {
    "defaults": {},
    "dim_z 2": {"dim_z": 2},
    "batch 64": {"batch_size": 64},
    # Models and losses beyond the old program's: each against the floor of its own products.
    "conditional": {"conditional": True},  # ten label columns in both first layers
    "autograd": {"step": "autograd"},  # the defaults through autograd: what the fused step saves
    "iwae k=5": {"objective": "iwae", "k_train": 5},  # the decoder on 5 z per image
    # Burda et al.'s model at their batch size, as the literature table trains it: small products,
    # so a step's fixed costs weigh most here.
    "Burda et al. b20": {"dim_z": 50, "n_hidden": 200, "activation": "tanh", "dropout": 0.0, "batch_size": 20},
    # and their IWAE (k = 5), the literature table's other run
    "Burda IWAE b20": {"dim_z": 50, "n_hidden": 200, "activation": "tanh", "dropout": 0.0, "batch_size": 20,
                       "objective": "iwae", "k_train": 5},
}


def main(prog, args):

    parser = Parser(prog=f"{prog} bench", description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=integer(1, 1000), default=5,
                        help="timed epochs per setting, each after its own floor, after one warm-up pair (5)")
    parser.add_argument("--k", type=integer(0), nargs="+", default=[1000], metavar="K",
                        help="importance samples for the log-likelihood timing, one timing for each K given "
                             "(--k 1000 5000); 0 skips it (1000)")
    parser.add_argument("--json", metavar="PATH", type=text, help="also write the results as JSON here")
    parser.add_argument("--device", default="cpu", type=choice("auto", "cpu", "cuda", "mps"),
                        help="where to measure (default cpu)")
    parser.add_argument("--quick", action="store_true",
                        help="a smoke test: 3000 training and 500 test images, one timed epoch, k=10")
    args = parser.parse_args(args)
    if args.json and not Path(args.json).resolve().parent.is_dir():
        parser.error(f"--json {args.json}: its folder does not exist; create it or choose another path")

    device = resolve_device(args.device)
    base = Config(device=str(device))
    settings = SETTINGS
    epochs, ks = args.epochs, [k for k in dict.fromkeys(args.k) if k > 0]
    if args.quick:
        base = replace(base, n_train=3000, n_test=500)
        settings, epochs, ks = {"defaults": {}}, 1, sorted({min(k, 10) for k in ks})

    results = {"machine": {**machine(), "device": str(device), "lscpu": products.cpu()}, "training": []}
    print(f"bench: on {products.describe_cpu(results['machine']['lscpu'])}", file=sys.stderr)
    print("bench: matrix-product routines ...", file=sys.stderr)
    results["routines"] = bench_routines(base, device, rounds=1 if args.quick else 3)
    best = min(results["routines"], key=lambda row: row["floor_s"])["routine"]
    results["fastest_routine"], results["step_routine"] = best, step_routine(base, device)
    results["memory"] = bench_memory(device)
    candidates = {"fp32": routines(device)}  # each row's floor by the one fastest on its own products
    try:  # mixed precision's row, where the hardware multiplies bfloat16; else why not
        products.check_precision("bf16", device)
    except ValueError as e:
        results["bf16_not_measured"] = str(e)
    else:
        if not args.quick:  # against the floor of its own products: bfloat16, by the fastest routine that has them
            settings = {**settings, "bf16": {"precision": "bf16"}}
            candidates["bf16"] = routines(device, "bf16")
    with tempfile.TemporaryDirectory() as tmp:
        configs = {name: replace(base, output=f"{tmp}/{name.replace(' ', '_')}", **changes)
                   for name, changes in settings.items()}
        rows = bench_training(configs, device, epochs, candidates)
        results["training"] = [{"setting": name, **row} for name, row in rows.items()]
        if device.type == "cpu":
            print("bench: training on a busy CPU ...", file=sys.stderr)
            results["busy"] = bench_busy(replace(base, output=f"{tmp}/busy"), device, epochs,
                                         unloaded_s=results["training"][0]["epoch_s"])
        run_dir = f"{tmp}/defaults"
        print("bench: evaluation ...", file=sys.stderr)
        results["evaluation"] = bench_evaluation(run_dir, device, ks, candidates["fp32"][best])
        print("bench: memory of a default training run ...", file=sys.stderr)
        results["peak_rss_mb"] = peak_rss_of_training_run(base, f"{tmp}/memory")
    results["startup_help_s"] = startup_seconds()

    print(format_table(results))
    if args.json:
        files.write_text(args.json, json.dumps(results, indent=2) + "\n")
    return 0


class StepThreads(Observer):
    """The thread count a training run's step runs on at most (loop.step_threads', or torch's)."""
    threads = None

    def on_epoch_end(self, run, row):
        self.threads = run.step_threads or torch.get_num_threads()


def bench_training(configs, device, epochs, candidates, log=lambda line: print(line, file=sys.stderr)):
    """{name: row} for the settings `configs` ({name: Config}): each setting's training seconds per epoch against
    its floor (TrainingRow), `epochs` rounds after one warm-up epoch of each. A round takes every setting in
    turn, so that a slow moment of the machine, which may last a minute, falls on one round of several rows,
    which their medians leave out, rather than on every round of one. `candidates` are the routines of
    `routines` by precision."""
    rows = {}
    for name, config in configs.items():
        log(f"bench: training, warm-up: {name} ...")
        rows[name] = TrainingRow(config, device, candidates[config.precision])
    for index in range(epochs):
        log(f"bench: training, round {index + 1} of {epochs}: {', '.join(rows)} ...")
        for row in rows.values():
            row.round()
    return {name: row.result() for name, row in rows.items()}


class TrainingRow:
    """One setting's training seconds per epoch and the floor (the products of the model `config` builds by
    the fastest of `matmuls`, routines of `routines` for config.precision, on this model's own shapes: a small
    batch may favour another routine than the defaults), measured in alternation, one `round` at a time: the
    floor by each routine, the same products by the step's own routine with Adam's update after each step's,
    then an epoch of train() itself (the real loop), then the floor by the round's fastest routine again; then
    `result`: medians, and the ratios of each epoch to its round's floor, the mean of the least floor before it
    and that routine's after it. Built, it trains one warm-up epoch, whose step's thread count (fewer than all
    where its products ran faster on fewer) the floors are timed on, and on one thread and torch's count too;
    each round's epoch trains as a user's run does, from torch's thread count, its governor choosing the count
    and following the cores' placement (fast/threads.py)."""

    def __init__(self, config, device, matmuls):
        self.config, self.device, self.matmuls = config, device, matmuls
        self.n_train = config.n_train or 60000
        self.layers = product_shapes(config)
        watch = StepThreads()
        train(replace(config, num_epochs=1), overwrite=True, log=lambda *a: None, observers=[watch])
        self.threads = watch.threads
        # +adam's products go through the step's own routine (the floor's may differ, and NumPy's BLAS threads,
        # which wait for work after each product, would fight the OpenMP threads of Adam's loop, as they never do
        # in training)
        self.used = step_routine(config, device)
        self.adam_routine = self.used if self.used in matmuls else "torch.mm"
        self.for_adam = step_for_adam(config, device)
        # each round's (epoch, floor, +adam), every routine's floor before its epoch, and the fastest's after it
        self.triples, self.round_floors, self.floors_after = [], [], []
        # each round's floor's thread count (the row's, or one or torch's where its products ran faster there) and its
        # timing before the epoch
        self.floor_threads, self.floors_before = [], []
        self.distances = []  # ns for a write to pass between two threads, just before each epoch (None: unknown)
        self.epoch_threads = []  # the count each epoch's step ended on
        self.step = None  # the step train() used: fused or autograd

    def round(self):
        """One round: the floors, +adam's epoch, an epoch of train(), and the fastest floor again."""
        config, device, n_train, layers = self.config, self.device, self.n_train, self.layers
        most = torch.get_num_threads()  # the count each epoch starts from
        with ThreadGovernor(threads=self.threads):  # fixed at that count, torch's own restored after
            # Every routine in every round, the round's floor the fastest of them: a slow moment of the machine
            # then costs one round's floor, where a routine chosen once, in that moment, would set every floor.
            floors = {name: seconds for name, (seconds,) in routine_floors(
                n_train, config.batch_size, layers, device, self.matmuls, rounds=1, dtype=config.precision).items()}
            with_adam = floor_epoch_seconds(n_train, config.batch_size, layers, device, repeats=1,
                                            matmul=self.matmuls[self.adam_routine], dtype=config.precision,
                                            after_step=self.for_adam.adam_step)[0]
            fastest = min(floors, key=floors.get)
            before, threads = floors[fastest], self.threads
            # Training may move to one thread while the CPUs are on two dies, and back to torch's count once they are
            # together (fast/threads.py): the floor is the fastest of the three counts, where the count may move.
            for count in sorted({1, most} - {self.threads}) if threads_may_move(config, device) else ():
                before, threads = min((before, threads), (self._floor_on(count, fastest), count))
        self.distances.append(kernels.core_distance_ns())  # where the host has put the CPUs (fast/threads.py)
        # Not held at the warm-up's count: a warm-up that fell while the CPUs were apart would keep every round on
        # one thread, where training goes back to two once they are together.
        watch = StepThreads()
        row = train(replace(config, num_epochs=1), overwrite=True, log=lambda *a: None, observers=[watch])
        # The fastest routine again, just after the epoch: the round's floor is the mean of its two timings, as
        # the estimate's is, so that where the machine's speed changes between them the floor moves with the epoch.
        after = self._floor_on(threads, fastest)
        self.epoch_threads.append(watch.threads)
        self.triples.append((row["seconds"], (before + after) / 2, with_adam))
        self.floor_threads.append(threads)
        self.floors_before.append(before)
        self.round_floors.append(floors)
        self.floors_after.append(after)
        self.step = row["step"]

    def _floor_on(self, threads, routine):
        """The floor by `routine` on `threads` threads, timed once."""
        with ThreadGovernor(threads=threads):
            return floor_epoch_seconds(self.n_train, self.config.batch_size, self.layers, self.device, repeats=1,
                                       matmul=self.matmuls[routine], dtype=self.config.precision)[0]

    def result(self):
        """The row of the table and the JSON, from the rounds so far (one at least)."""
        config, triples, round_floors = self.config, self.triples, self.round_floors
        least = {name: min(floors[name] for floors in round_floors) for name in self.matmuls}
        epochs_s, floors_s = [e for e, _, _ in triples], [f for _, f, _ in triples]
        epoch = statistics.median(epochs_s)
        n_steps = math.ceil(self.n_train / config.batch_size)
        with ThreadGovernor(threads=self.threads):
            fixed = fixed_costs_seconds(config, self.for_adam, self.device, self.n_train)
        # Adam between the products: +adam's epoch less the same products alone, by the same routine, in the same round
        adam_in_step = statistics.median(a - floors[self.adam_routine]
                                         for (_, _, a), floors in zip(triples, round_floors))
        adam_bytes = n_steps * adam_bytes_per_step(self.for_adam.model)
        return {"threads": self.threads, "dim_z": config.dim_z, "batch_size": config.batch_size,
                "layers": self.layers, "step": self.step, "epoch_s": epoch, "epochs_s": epochs_s, "steps": n_steps,
                # what a step costs beyond its products: the fixed costs that small batches pay more often
                "over_floor_us_per_step": statistics.median((e - f) / n_steps * 1e6 for e, f, _ in triples),
                "floor_s": statistics.median(floors_s), "floors_s": floors_s, "floors_after_s": self.floors_after,
                "floor_threads": self.floor_threads, "floors_before_s": self.floors_before,
                "epoch_threads": self.epoch_threads,
                "core_distances_ns": self.distances,
                "ratio": statistics.median(e / f for e, f, _ in triples),
                # the routine of the least floor, each routine's least, and which was fastest in each round
                "floor_routine": min(least, key=least.get), "routine_floors_s": least,
                "floor_routines": [min(floors, key=floors.get) for floors in round_floors],
                "step_routine": self.used,
                "images_per_s": self.n_train / epoch, **fixed,
                # an epoch in which nothing but the products and Adam's updates take time, Adam's data leaving the
                # cache between its updates as in training: what the step could reach with its other work free
                "products_and_adam_s": [a for _, _, a in triples],
                "products_and_adam_ratio": statistics.median(a / f for _, f, a in triples),
                # the bytes Adam's update moves per second back to back, and between each step's products
                "adam_in_step_s": adam_in_step, "adam_gb_per_s": adam_bytes / fixed["adam_s"] / 1e9,
                "adam_in_step_gb_per_s": adam_bytes / adam_in_step / 1e9 if adam_in_step > 0 else None}


def routine_floors(n_train, batch_size, layers, device, matmuls, rounds, dtype="fp32"):
    """{name: [seconds]}: `rounds` epoch floors for `layers` by each routine of `matmuls`, taken in alternation."""
    floors = {name: [] for name in matmuls}
    for _ in range(rounds):
        for name, matmul in matmuls.items():
            floors[name] += floor_epoch_seconds(n_train, batch_size, layers, device, repeats=1, matmul=matmul,
                                                dtype=dtype)
    return floors


def step_routine(config, device):
    """The product routine of the step train() builds for `config`, named as the floors name theirs (its
    bfloat16 products are torch.mm's); None where that is the autograd step, whose products are torch's."""
    with torch.random.fork_rng(devices=[]):  # building draws initial weights; the bench's draws stay as they were
        model, optimizer = make_model(config, device)
    step = make_step(model, optimizer, config)
    if not isinstance(step, FusedTrainStep):
        return None
    return "torch.mm" if step.products.bf16 else step.products.name


# The competing process of the busy-CPU row: a busy loop that ends by itself even if the bench is killed.
SPIN = "import time\nend = time.monotonic() + {seconds}\nwhile time.monotonic() < end: pass\n"


def bench_busy(config, device, epochs, unloaded_s):
    """Default epochs while another process keeps one core busy, as training runs them (the thread count
    following the load, threads.py), and one epoch with the count fixed at torch's, as it was before;
    each against the unloaded epoch of the defaults row."""

    def epoch(**changes):
        return train(replace(config, num_epochs=1, **changes), overwrite=True, log=lambda *a: None)["seconds"]

    competitor = subprocess.Popen([sys.executable, "-c", SPIN.format(seconds=120 * (epochs + 2))])
    try:
        time.sleep(0.5)  # let it start
        adaptive = [epoch() for _ in range(epochs)]
        fixed = epoch(threads=torch.get_num_threads())
    finally:
        competitor.kill()
        competitor.wait()
    return {"epoch_s": statistics.median(adaptive), "epochs_s": adaptive, "unloaded_s": unloaded_s,
            "ratio": statistics.median(adaptive) / unloaded_s, "fixed_threads": torch.get_num_threads(),
            "fixed_epoch_s": fixed, "fixed_ratio": fixed / unloaded_s}


def step_for_adam(config, device):
    """A fused step of the model `config` builds whose adam_step() applies Adam's update to every parameter as
    training does (in float32), from gradients of a step's size; Adam's state already created."""
    model, optimizer = make_model(config, device)
    step = FusedTrainStep(model, optimizer)
    for grad_weight, grad_bias in step.grads:  # never-written memory may hold denormals
        grad_weight.normal_(0, 1e-3)
        grad_bias.normal_(0, 1e-3)
    step.adam_step()  # creates Adam's state
    return step


def fixed_costs_seconds(config, step, device, n_train):
    """Seconds per epoch of two parts of a step that are not matrix products but belong to the algorithm:
    Adam's update of every parameter (by `step`, a step_for_adam of `config`), and drawing the bits of the
    model's dropout masks; each timed alone, back to back (Adam's data stay in the cache from one update to
    the next, as they do not in training)."""

    n_steps = math.ceil(n_train / config.batch_size)
    k = config.z_per_image
    masks = [config.batch_size * (1 if index < len(step.encoder) else k) * step.layers[index].out_features
             for index, _, p in step.encoder + step.decoder if p > 0]
    _synchronize(device)
    started = time.perf_counter()
    for _ in range(n_steps):
        step.adam_step()
    _synchronize(device)
    adam_s = time.perf_counter() - started
    started = time.perf_counter()
    for _ in range(n_steps):
        for size in masks:  # the bits the step's activation loops draw, one mask at a time
            dropout_bits(size, device)
    _synchronize(device)
    return {"adam_s": adam_s, "masks_s": time.perf_counter() - started}


def adam_bytes_per_step(model):
    """The bytes Adam's update of `model` reads and writes in one step: for each float32 parameter it reads
    the parameter, its gradient and the two moments, and writes the parameter and the moments back."""
    return sum(p.numel() for p in model.parameters()) * 7 * 4


def last_level_cache_bytes(cpu=0):
    """The size of the largest cache of a CPU as Linux describes it (as lscpu's L3 line); None where unknown."""
    units, sizes = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}, []
    for index in Path(f"/sys/devices/system/cpu/cpu{cpu}/cache").glob("index*"):
        try:
            text = (index / "size").read_text().strip()
        except OSError:
            continue
        sizes.append(int(text[:-1]) * units[text[-1]] if text[-1] in units else int(text))
    return max(sizes, default=None)


def bench_memory(device, repeats=10):
    """GB/s of a tensor copy (each byte read and written) of a quarter of the last-level cache, which stays
    in it, and of eight times that cache, which cannot: the speed of a stream from the cache and from memory,
    against which the table sets Adam's (32 MB taken for the cache where Linux does not say its size)."""
    if device.type != "cpu":
        return None
    cache = last_level_cache_bytes()
    rows, taken = [], cache or 32 << 20
    for size in (taken // 4, taken * 8):
        source, target = torch.ones(size // 4), torch.empty(size // 4)
        target.copy_(source)
        best = math.inf
        for _ in range(repeats):
            started = time.perf_counter()
            target.copy_(source)
            best = min(best, time.perf_counter() - started)
        rows.append({"bytes": size, "gb_per_s": 2 * size / best / 1e9})
    return {"last_level_cache_bytes": cache, "copies": rows}


def routines(device, dtype="fp32"):
    """The routines that compute a product a @ b into `out` (b may be a transposed view), by name: in
    float32 torch.mm everywhere, and on the CPU also oneDNN (through torch) and NumPy's BLAS where they
    exist; in bfloat16 ("bf16", the products of --precision bf16) torch.mm, and oneDNN where it has a
    bfloat16 path on this CPU (NumPy has none)."""

    found = {"torch.mm": lambda a, b, out: torch.mm(a, b, out=out)}
    if onednn_available(device) and (dtype == "fp32" or torch.ops.mkldnn._is_mkldnn_bf16_supported()):
        found["oneDNN"] = lambda a, b, out: _onednn(a, b.t())
    if device.type == "cpu" and dtype == "fp32":
        found["NumPy"] = lambda a, b, out: np.matmul(a.numpy(), b.numpy(), out=out.numpy())
    return found


def product_shapes(config):
    """The products of a training step of the model `config` builds, read from its layers: (inputs, outputs,
    rows per image) of each Linear layer, the encoder's then the decoder's, whose rows are k per image
    for the importance-weighted bound."""

    with torch.random.fork_rng(devices=[]):  # building draws initial weights; the bench's draws stay as they were
        model = build(config)
    return product_layers(model, config.z_per_image)


def floor_epoch_seconds(n_train, batch_size, layers, device, repeats=3, matmul=None, dtype="fp32", after_step=None):
    """Seconds of one epoch's matrix products alone, `repeats` times, by `matmul` (a routine of
    `routines` for `dtype`; torch.mm by default), for the layers `layers` (product_shapes), on operands
    of `dtype` (float32, or bfloat16 for "bf16"); with `after_step`, a function called after each timed step's
    products (Adam's update), that too."""

    matmul = matmul or routines(device, dtype)["torch.mm"]
    batches = [batch_size] * (n_train // batch_size) + ([n_train % batch_size] if n_train % batch_size else [])
    options = dict(device=device, dtype=torch.bfloat16 if dtype == "bf16" else torch.float32)

    def layer_buffers(n, n_in, n_out):
        grad = torch.randn(n, n_out, **options)
        # d(loss)/dy also as a contiguous d', the weight gradient's first operand as the step's backward loop
        # writes it for oneDNN, which would otherwise copy the transposed view before each product
        return dict(x=torch.randn(n, n_in, **options), weight=torch.randn(n_out, n_in, **options), grad=grad,
                    grad_t=grad.t().contiguous(), y=torch.empty(n, n_out, **options),
                    grad_weight=torch.empty(n_out, n_in, **options), grad_x=torch.empty(n, n_in, **options))

    def buffers(batch):
        return [layer_buffers(batch * rows, n_in, n_out) for n_in, n_out, rows in layers]

    by_size = {size: buffers(size) for size in set(batches)}

    def products(batch):
        for index, b in enumerate(by_size[batch]):
            matmul(b["x"], b["weight"].t(), b["y"])  # forward
            matmul(b["grad_t"], b["x"], b["grad_weight"])  # dL/dW
            if index > 0:  # dL/dx; the images need none
                matmul(b["grad"], b["weight"], b["grad_x"])

    for _ in range(20):  # warm-up
        products(batches[0])
    seconds = []
    for _ in range(repeats):
        _synchronize(device)
        started = time.perf_counter()
        for batch in batches:
            products(batch)
            if after_step is not None:
                after_step()
        _synchronize(device)
        seconds.append(time.perf_counter() - started)
    return seconds


def epoch_gflop(n_train, layers):
    """The floating-point operations (GFLOP) of one epoch's products for the layers `layers`
    (product_shapes): 2 m n k each; three products a layer, two for the first (no input gradient)."""
    return 2 * n_train * sum(rows * n_in * n_out * (3 if index else 2)
                             for index, (n_in, n_out, rows) in enumerate(layers)) / 1e9


def bench_routines(config, device, rounds=3):
    """Each float32 routine's floor of an epoch of the model `config` builds (its median over `rounds`, taken
    in alternation) and its peak: GFLOP/s of one 2048 x 2048 by 2048 x 2048 product, the best of three."""

    n_train = config.n_train or 60000
    layers = product_shapes(config)
    found = routines(device)
    floors = routine_floors(n_train, config.batch_size, layers, device, found, rounds)
    gflop = epoch_gflop(n_train, layers)
    rows = []
    for name, matmul in found.items():
        a, b, out = (torch.randn(2048, 2048, device=device) for _ in range(3))
        matmul(a, b, out)
        peak = []
        for _ in range(3):
            _synchronize(device)
            started = time.perf_counter()
            matmul(a, b, out)
            _synchronize(device)
            peak.append(2 * 2048**3 / 1e9 / (time.perf_counter() - started))
        floor = statistics.median(floors[name])
        rows.append({"routine": name, "floor_s": floor, "gflop_per_s": gflop / floor, "peak_gflop_per_s": max(peak)})
    return rows


def _synchronize(device):

    if device.type == "cuda":
        torch.cuda.synchronize()
    elif device.type == "mps":
        torch.mps.synchronize()


def bench_evaluation(run_dir, device, ks, matmul=None):
    """Test -ELBO in images per second, and for each k in `ks` the importance-weighted log-likelihood's
    seconds over the test images against its floor (the decoder's products for every draw of z)."""

    config, _, tensors = checkpoint.load(run_dir)
    model = checkpoint.build_model(config, tensors).to(device)
    test = load_tensors(config, device, log=lambda *a: None).test
    times = []
    for _ in range(3):
        _synchronize(device)
        started = time.perf_counter()
        evaluate(model, test)
        _synchronize(device)
        times.append(time.perf_counter() - started)
    result = {"test_images": len(test), "elbo_images_per_s": len(test) / statistics.median(times),
              "log_likelihood": []}
    decoder = [(m.in_features, m.out_features) for m in model.decoder.modules() if isinstance(m, torch.nn.Linear)]
    for k in ks:
        print(f"bench: evaluation, the log-likelihood at k={k} ...", file=sys.stderr)
        # An estimate runs for minutes, over which the machine's speed drifts by some per cent: its floor
        # is measured just before it and just after, and the ratio taken against their mean.
        before = iw_floor_seconds(len(test) * k, decoder, device, matmul=matmul)
        started = time.perf_counter()
        nll, stderr = log_likelihood_estimate(model, test, k, progress=False)
        _synchronize(device)
        seconds = time.perf_counter() - started
        after = iw_floor_seconds(len(test) * k, decoder, device, matmul=matmul)
        floor = (before + after) / 2
        result["log_likelihood"].append({"k": k, "seconds": seconds, "floor_s": floor, "floors_s": [before, after],
                                         "ratio": seconds / floor, "nll": nll, "nll_stderr": stderr})
    return result


def iw_floor_seconds(rows, layers, device, chunk=1024, most=500_000, matmul=None):
    """Seconds of the decoder's matrix products for `rows` draws of z, in chunks as the estimator
    draws them, by `matmul` (torch.mm by default): measured on at most `most` rows and scaled, so the
    bench need not spend a minute on it. `layers`: (inputs, outputs) of each of the decoder's Linear layers."""

    matmul = matmul or routines(device)["torch.mm"]
    buffers = [(torch.randn(chunk, n_in, device=device), torch.randn(n_out, n_in, device=device),
                torch.empty(chunk, n_out, device=device)) for n_in, n_out in layers]
    measured = min(rows, most)

    def products(n_chunks):
        for _ in range(n_chunks):
            for x, weight, y in buffers:
                matmul(x, weight.t(), y)

    products(10)  # warm-up
    _synchronize(device)
    started = time.perf_counter()
    products(math.ceil(measured / chunk))
    _synchronize(device)
    return (time.perf_counter() - started) * rows / measured


def peak_rss_of_training_run(base, output):
    """Peak resident memory (MB) of `mnist-vae --num_epochs 1` at the bench's data size, in its own process."""
    command = [sys.executable, "-m", "mnist_vae", "--num_epochs", "1", "--output", output,
               "--device", base.device, "--n_train", str(base.n_train), "--n_test", str(base.n_test)]
    subprocess.run(command, check=True, capture_output=True)
    return resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024  # Linux reports KiB


def startup_seconds(repeats=3):
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        subprocess.run([sys.executable, "-m", "mnist_vae", "--help"], check=True, capture_output=True)
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def _rounds(row):
    """The least and the most of a training row's ratios of each epoch to its floor, as "1.28-1.35"."""
    ratios = [e / f for e, f in zip(row["epochs_s"], row["floors_s"])]
    return f"{min(ratios):.2f}-{max(ratios):.2f}"


def _threads(row, machine_threads):
    """The threads a training row's epochs ended on, as "2", or "1-2" where they differed; where a row does not
    list them, the count it was held at."""
    counts = row.get("epoch_threads") or [row.get("threads", machine_threads)]
    return f"{min(counts)}" if min(counts) == max(counts) else f"{min(counts)}-{max(counts)}"


def _adam_speeds(row):
    """Adam's GB/s back to back and between the products, as "190/80"; "-" for what a row lacks."""
    speeds = [row.get("adam_gb_per_s"), row.get("adam_in_step_gb_per_s")]
    return "/".join("-" if speed is None else f"{speed:.0f}" for speed in speeds)


def format_table(results):
    m = results["machine"]
    lines = [f"mnist-vae bench: {products.describe_cpu(m['lscpu'])}, {m['cores']} cores, {m['device']}, "
             f"torch {m['torch']} ({m['threads']} threads), step kernels in {m.get('kernels', 'torch ops')}", "",
             f"{'products':<9} {'floor s':>8} {'GFLOP/s':>8} {'peak GFLOP/s':>13}"]
    for row in results["routines"]:
        mark = "  (the training step's)" if row["routine"] == results["step_routine"] else ""
        lines.append(f"{row['routine']:<9} {row['floor_s']:>8.2f} {row['gflop_per_s']:>8.0f} "
                     f"{row['peak_gflop_per_s']:>13.0f}{mark}")
    fastest, used = results["fastest_routine"], results["step_routine"]
    lines += ["(floor s: a default epoch's products alone by each float32 routine; peak: one 2048^3 product)",
              f"fastest on a default epoch: {fastest}" + ("" if fastest == used else
              f"; the training step uses {used} ({products.RULE}"
              + ("" if fastest in products.ROUTINES else f"; {fastest} is not one it can use") + ")")]
    if results.get("memory"):
        memory = results["memory"]
        small, large = memory["copies"]
        cache = memory["last_level_cache_bytes"]
        within = f", within the {cache >> 20} MB last-level cache," if cache else ""
        lines.append(f"memory: a copy (each byte read and written) of {small['bytes'] >> 20} MB{within} "
                     f"{small['gb_per_s']:.0f} GB/s; of {large['bytes'] >> 20} MB {large['gb_per_s']:.0f} GB/s")
    lines += ["",
              f"{'training':<16} {'step':<8} {'dim_z':>5} {'batch':>5} {'thr':>3} {'epoch s':>8} {'floor s':>8} {'ratio':>6} "
             f"{'rounds':>9} {'images/s':>9} {'adam s':>7} {'masks s':>8} {'over us/step':>12} {'+adam':>6} "
             f"{'adam GB/s':>9}  floor by"]
    for row in results["training"]:
        lines.append(f"{row['setting']:<16} {row['step']:<8} {row['dim_z']:>5} {row['batch_size']:>5} "
                     f"{_threads(row, m['threads']):>3} {row['epoch_s']:>8.2f} "
                     f"{row['floor_s']:>8.2f} {row['ratio']:>6.2f} {_rounds(row):>9} {row['images_per_s']:>9.0f}"
                     f" {row['adam_s']:>7.2f} {row['masks_s']:>8.2f} {row.get('over_floor_us_per_step', math.nan):>12.0f}"
                     f" {row.get('products_and_adam_ratio', math.nan):>6.2f} {_adam_speeds(row):>9}"
                     f"  {row.get('floor_routine', '')}"
                     + (f" (the step's: {row['step_routine']})" if row.get("step_routine") not in (None, row.get("floor_routine"))
                        else ""))
    lines.append("(floor s: the products of each row's own model, timed by every routine for its precision before\n"
                 " each epoch, and the fastest of them (floor by: the routine of the least) again just after it:\n"
                 " the mean of its two timings;\n"
                 " rounds: the least and the most of the epochs' ratios to their floors, whose median is the ratio:\n"
                 " far apart where the machine's speed changed during the row;\n"
                 " adam s, masks s: Adam's updates and the dropout masks of one epoch, each timed alone, back to back;\n"
                 " over us/step: (epoch - floor) / steps, what a step costs beyond its products;\n"
                 " +adam: an epoch of nothing but its products, by the step's routine, and after each step's Adam's\n"
                 " update, over the floor (medians; each timed just after its floor): what the step would take with\n"
                 " its other work free;\n"
                 " adam GB/s: the bytes Adam's update reads and writes per second, back to back / in +adam's epoch;\n"
                 " thr: the threads the step ran on (the least and the most of its epochs'), and its floor: fewer\n"
                 " than all where they were faster)")
    lines += _placement_lines(results["training"])
    by_setting = {row["setting"]: row for row in results["training"]}
    if "bf16" in by_setting:
        bf16 = by_setting["bf16"]
        others = ", ".join(f"{name} {seconds:.2f} s" for name, seconds in bf16["routine_floors_s"].items())
        lines.append(f"bf16: epoch {bf16['epoch_s'] / by_setting['defaults']['epoch_s']:.2f} x the float32 "
                     f"defaults'; its floor is its own bfloat16 products by {bf16['floor_routine']}, "
                     + (f"the fastest of {others}" if others else "the one routine here that multiplies bfloat16"))
    elif "bf16_not_measured" in results:
        lines.append(f"bf16: not measured: {results['bf16_not_measured']}")
    if "busy" in results:
        b = results["busy"]
        lines += ["", f"busy CPU (another process takes a core): default epoch {b['epoch_s']:.2f} s, "
                      f"{b['ratio']:.2f} x the unloaded {b['unloaded_s']:.2f} s; with the threads fixed at "
                      f"{b['fixed_threads']}: {b['fixed_epoch_s']:.2f} s, {b['fixed_ratio']:.2f} x"]
    e = results["evaluation"]
    lines += ["", f"evaluation: test -ELBO {e['elbo_images_per_s']:,.0f} images/s"]
    for row in e["log_likelihood"]:
        lines.append(f"evaluation: IW log-likelihood, k={row['k']}, {e['test_images']} test images: "
                     f"{row['seconds']:.1f} s, floor {row['floor_s']:.1f} s (before {row['floors_s'][0]:.1f}, "
                     f"after {row['floors_s'][1]:.1f}), ratio {row['ratio']:.2f} "
                     f"(NLL {row['nll']:.2f} ± {row['nll_stderr']:.2f} of the 1-epoch model)")
    lines += [f"peak resident memory of a training run: {results['peak_rss_mb']:.0f} MB",
              f"start-up, mnist-vae --help: {results['startup_help_s']:.2f} s"]
    return "\n".join(lines)


def _placement_lines(rows):
    """Where the time for a write to pass between two threads, taken before each epoch, was over twice its least
    (the host had moved the CPUs apart, docs/speed.md): each row's epochs then and their ratios against the rest's."""
    distances = [d for row in rows for d in row.get("core_distances_ns", []) if d]
    if not distances:
        return []
    least, most = min(distances), max(distances)
    apart = []
    for row in rows:
        readings = [(e / f, d) for e, f, d in zip(row["epochs_s"], row["floors_s"], row.get("core_distances_ns", []))
                    if d]
        far = [ratio for ratio, d in readings if d > 2 * least]
        near = [ratio for ratio, d in readings if d <= 2 * least]
        if far:
            rest = f", against {statistics.median(near):.2f} for the other {len(near)}" if near else ""
            apart.append(f"  {row['setting']}: {len(far)} of {len(row['epochs_s'])} epochs, ratio "
                         f"{statistics.median(far):.2f}" + rest)
    heading = f"cores: a write passed between two threads in {least:.0f}-{most:.0f} ns before the epochs"
    if not apart:
        return [f"{heading}, never over {2 * least:.0f} ns"]
    return [f"{heading}; where it took over {2 * least:.0f} ns (the CPUs moved apart):", *apart]


if __name__ == "__main__":
    sys.exit(main("bench", sys.argv[1:]))
