"""The training step's matrix products, through the fastest float32 routine this process offers.

torch.mm sends float32 products on the CPU to MKL, which runs its generic code on AMD
processors: on an AMD EPYC with AVX-512 oneDNN (which the same torch carries, reached
through torch.ops.mkldnn._linear_pointwise) did this model's products about twice as
fast, while on an AMD EPYC with AVX2 only the two are within a few per cent of each
other (docs/speed.md, from `mnist-vae bench`). The choice is a rule, not a
timing taken at start-up, so that one seed on one machine always gives the same bits:
oneDNN on an AMD CPU with AVX-512 for all but the smallest steps (small_step), torch.mm
everywhere else (other CPUs, CUDA, MPS, a torch without oneDNN). `mnist-vae bench` times
every routine and says whether the rule picked the fastest one on the machine it runs on.
`use(name)` overrides it (the tests train through both).

Each function computes one product of a linear layer y = x W' + b: `linear` (x W'),
`weight_grad` (d_y' x, into `out`) and `input_grad` (d_y W).

With --precision bf16 ("bf16-mixed", as PyTorch Lightning names it) the products take
bfloat16 operands and give bfloat16 results, while the weights, Adam's moments, the loss,
the KL and the elementwise work stay float32. It is offered only where the
hardware multiplies bfloat16 (AVX512_BF16 or AMX on x86, or a CUDA GPU that has it):
elsewhere torch emulates it, slower than float32.
"""

import functools
import platform
from pathlib import Path

import torch

ROUTINES = ("torch.mm", "oneDNN")
RULE = "the rule: oneDNN on an AMD CPU with AVX-512 but for the smallest steps, torch.mm elsewhere"
_override = None


def onednn_available(device):
    return (device.type == "cpu" and torch.backends.mkldnn.is_available()
            and hasattr(torch.ops.mkldnn, "_linear_pointwise"))


@functools.lru_cache(maxsize=None)
def _cpuinfo(path="/proc/cpuinfo"):
    """The text of Linux's CPU description; empty elsewhere."""
    try:
        return Path(path).read_text()
    except OSError:
        return ""


def _cpu_flags(cpuinfo="/proc/cpuinfo"):
    return frozenset(next((line.split(":", 1)[1].split() for line in _cpuinfo(cpuinfo).splitlines()
                           if line.startswith("flags")), []))


# The vector extensions that decide which routine is fastest and whether bfloat16 is offered, as Linux
# (and lscpu) names them.
EXTENSIONS = ("avx2", "avx512f", "avx512_bf16", "amx_bf16")


def cpu(cpuinfo="/proc/cpuinfo"):
    """The CPU as lscpu describes it, from the same source (Linux's /proc/cpuinfo): vendor, model name,
    family, model, and which of EXTENSIONS it has; the processor's name alone where there is no such
    file (macOS, Windows), with the other fields None."""
    fields = {}
    for line in _cpuinfo(cpuinfo).splitlines():
        name, _, value = line.partition(":")
        if not line.strip():
            break  # the first processor's block is every processor's here
        fields.setdefault(name.strip(), value.strip())
    if not fields:
        return {"vendor": None, "model_name": platform.processor() or platform.machine(), "family": None,
                "model": None, "extensions": None}
    flags = set(fields.get("flags", "").split())
    return {"vendor": fields.get("vendor_id"), "model_name": fields.get("model name"),
            "family": _integer(fields.get("cpu family")), "model": _integer(fields.get("model")),
            "extensions": [name for name in EXTENSIONS if name in flags]}


def _integer(text):
    return int(text) if text is not None and text.isdigit() else text


def describe_cpu(described):
    """One line naming a CPU of `cpu()`: model name, vendor, family and model, and its vector extensions."""
    if described["extensions"] is None:
        return described["model_name"]
    extensions = ", ".join(name.upper() for name in described["extensions"]) or "none of " + ", ".join(
        name.upper() for name in EXTENSIONS)
    return (f"{described['model_name']} ({described['vendor']}, family {described['family']}, model "
            f"{described['model']}; {extensions})")


def has_avx512(cpuinfo="/proc/cpuinfo"):
    """Whether the CPU has AVX-512F, as Linux lists its flags (elsewhere it is taken not to)."""
    return "avx512f" in _cpu_flags(cpuinfo)


def has_avx2(cpuinfo="/proc/cpuinfo"):
    """Whether the CPU has AVX2 and FMA, as Linux lists its flags (elsewhere it is taken not to)."""
    return {"avx2", "fma"} <= _cpu_flags(cpuinfo)


def _amd_with_avx512(cpuinfo="/proc/cpuinfo"):
    return "AuthenticAMD" in _cpuinfo(cpuinfo) and has_avx512(cpuinfo)


def bf16_instructions(device):
    """Whether `device` multiplies bfloat16 in hardware: a CUDA GPU that supports it, or an x86 CPU
    with AVX512_BF16 or AMX (as Linux lists its flags; elsewhere the CPU is taken not to)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return device.type == "cpu" and bool({"avx512_bf16", "amx_bf16"} & _cpu_flags())


def check_precision(precision, device):
    """Raise ValueError with a one-line reason where `precision` cannot be had on `device`."""
    if precision == "bf16" and not bf16_instructions(device):
        raise ValueError(f"--precision bf16 needs bfloat16 instructions (AVX512_BF16 or AMX on the CPU, or a CUDA "
                         f"GPU with bfloat16), and {device.type} here has none, so torch would emulate them, "
                         f"slower than float32; use --precision fp32")


# Below this many multiply-adds in the forward pass of a step, oneDNN's cost per call outweighs its faster
# arithmetic, and MKL is the faster on an AMD CPU with AVX-512 too: in mnist-vae bench's floors on a Zen 5,
# Burda et al.'s model at batch 20 (8.5 million) against their IWAE at batch 20 (25 million; docs/speed.md).
SMALL_STEP = 20_000_000
# Where the CPU family's steps cross over elsewhere: on a Zen 4 (family 25; its parts with AVX-512 are all
# Zen 4) that IWAE's whole step ran faster through MKL, whose small weight gradients also go straight into
# Adam's update, and the defaults at batch 64 (66 million) through either alike (docs/speed.md).
SMALL_STEP_BY_FAMILY = {25: 40_000_000}


def small_step(cpuinfo="/proc/cpuinfo"):
    """SMALL_STEP for this CPU's family."""
    return SMALL_STEP_BY_FAMILY.get(cpu(cpuinfo)["family"], SMALL_STEP)


def rule(device, multiply_adds=None):
    """The routine the rule picks for `device`, for a step whose forward pass takes `multiply_adds` (None:
    products of any size, as the estimate's chunks of draws are)."""
    if onednn_available(device) and _amd_with_avx512() and (multiply_adds is None or multiply_adds >= small_step()):
        return "oneDNN"
    return "torch.mm"


def routine(device, multiply_adds=None):
    """The routine the training step uses on `device` (for `multiply_adds`, as `rule`): `use`'s choice where it
    is available, else the rule's."""
    if _override is not None and (_override == "torch.mm" or onednn_available(device)):
        return _override
    return rule(device, multiply_adds)


def use(name):
    """Train through `name` (one of ROUTINES) from now on; None goes back to the rule."""
    global _override
    if name is not None and name not in ROUTINES:
        raise ValueError(f"no product routine {name!r}; choose from {ROUTINES}")
    _override = name


def _onednn(a, b_t):
    """a b_t', by oneDNN; b_t may be a transposed view (it reads strides)."""
    return torch.ops.mkldnn._linear_pointwise(a, b_t, None, "none", [], "")


def _bf16(t):
    """t in bfloat16; t itself where it is (a test, cheaper than the call that would return it)."""
    return t if t.dtype is torch.bfloat16 else t.bfloat16()


class Products:
    """The three products of a layer through one routine, fixed when the step is built; with
    precision "bf16", torch.mm on bfloat16 operands, giving bfloat16 (as the floor's products do: the
    step's C loops read them and write the next operands in bfloat16, with no passes of their own)."""

    def __init__(self, device, precision="fp32", name=None, multiply_adds=None):
        self.bf16 = precision == "bf16"
        self.name = "torch.mm, bfloat16" if self.bf16 else name or routine(device, multiply_adds)
        self.onednn = self.name == "oneDNN"

    def operand(self, t):
        """t as the products take it: in bfloat16 with precision bf16 (the methods below take one
        as it is, so that an operand used by two products is converted once), else t itself."""
        return _bf16(t) if self.bf16 else t

    def linear(self, x, weight):
        if self.bf16:
            return torch.mm(_bf16(x), _bf16(weight).t())
        return _onednn(x, weight) if self.onednn else torch.mm(x, weight.t())

    def weight_grad(self, d_y, x, out=None, d_y_t=None):
        """d_y' x, into `out` where it is given, else a new tensor (oneDNN gives only new ones; with bf16 a
        bfloat16 one). `d_y_t`: d_y' as a contiguous tensor, where the caller has one (oneDNN would copy
        the transposed view)."""
        if self.bf16:
            product = torch.mm(_bf16(d_y).t(), _bf16(x))
        elif self.onednn:
            product = _onednn(d_y.t() if d_y_t is None else d_y_t, x.t())
        else:
            return torch.mm(d_y.t(), x, out=out)
        return product if out is None else out.copy_(product)

    def input_grad(self, d_y, weight):
        if self.bf16:
            return torch.mm(_bf16(d_y), _bf16(weight))
        return _onednn(d_y, weight.t()) if self.onednn else torch.mm(d_y, weight)
