"""products.py: the rule that picks the step's product routine, and each routine's products."""

import pytest
import torch

from mnist_vae.fast import products


def _cpuinfo(tmp_path, vendor, flags):
    path = tmp_path / f"cpuinfo-{vendor}-{len(flags)}"
    path.write_text(f"processor\t: 0\nvendor_id\t: {vendor}\nflags\t\t: {' '.join(flags)}\n\n")
    return str(path)


def test_the_rule_picks_onednn_on_amd_with_avx512_only(tmp_path, monkeypatch):
    assert products._amd_with_avx512(_cpuinfo(tmp_path, "AuthenticAMD", ["fma", "avx2", "avx512f", "avx512_bf16"]))
    assert not products._amd_with_avx512(_cpuinfo(tmp_path, "AuthenticAMD", ["fma", "avx2"]))
    assert not products._amd_with_avx512(_cpuinfo(tmp_path, "GenuineIntel", ["avx2", "avx512f"]))
    assert not products._amd_with_avx512(str(tmp_path / "no-such-file"))
    monkeypatch.setattr(products, "_amd_with_avx512", lambda: True)
    monkeypatch.setattr(products, "small_step", lambda: products.SMALL_STEP)
    expected = "oneDNN" if products.onednn_available(torch.device("cpu")) else "torch.mm"
    assert products.rule(torch.device("cpu")) == expected
    assert products.rule(torch.device("cpu"), products.SMALL_STEP) == expected
    # a step too small for oneDNN's cost per call: torch.mm, as for Burda et al.'s model at batch 20
    assert products.rule(torch.device("cpu"), products.SMALL_STEP - 1) == "torch.mm"
    assert products.rule(torch.device("meta")) == "torch.mm"  # not a CPU: never oneDNN
    monkeypatch.setattr(products, "_amd_with_avx512", lambda: False)
    assert products.rule(torch.device("cpu")) == "torch.mm"


def test_a_step_is_small_by_the_cpu_family_s_own_bound(tmp_path):
    """A Zen 4 (AMD family 25) takes MKL for steps up to 40 million multiply-adds, so that Burda et al.'s IWAE at
    batch 20 (25 million) goes through it; other families keep SMALL_STEP; a CPU that names no family too."""
    def cpuinfo(family):
        path = tmp_path / f"cpuinfo-{family}"
        path.write_text(f"processor\t: 0\nvendor_id\t: AuthenticAMD\ncpu family\t: {family}\n"
                        f"flags\t\t: avx2 avx512f\n\n")
        return str(path)

    assert products.small_step(cpuinfo(25)) == products.SMALL_STEP_BY_FAMILY[25] > 25_000_000
    assert products.small_step(cpuinfo(26)) == products.SMALL_STEP
    assert products.small_step(str(tmp_path / "no-such-file")) == products.SMALL_STEP


def test_use_overrides_the_rule_and_refuses_unknown_names():
    try:
        products.use("torch.mm")
        assert products.routine(torch.device("cpu")) == "torch.mm"
        with pytest.raises(ValueError, match="no product routine"):
            products.use("openblas")
    finally:
        products.use(None)


@pytest.mark.parametrize("name", products.ROUTINES)
def test_each_routine_computes_the_three_products_of_a_layer(name):
    if name == "oneDNN" and not products.onednn_available(torch.device("cpu")):
        pytest.skip("this torch has no oneDNN")
    products.use(name)
    try:
        p = products.Products(torch.device("cpu"))
    finally:
        products.use(None)
    assert p.name == name
    g = torch.Generator().manual_seed(0)
    x, weight, d_y = (torch.randn(shape, generator=g) for shape in ((64, 30), (20, 30), (64, 20)))
    x64, weight64, d_y64 = x.double(), weight.double(), d_y.double()
    torch.testing.assert_close(p.linear(x, weight).double(), x64 @ weight64.T, rtol=1e-5, atol=1e-5)
    out = torch.empty(20, 30)
    assert p.weight_grad(d_y, x, out=out) is out
    torch.testing.assert_close(out.double(), d_y64.T @ x64, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(p.input_grad(d_y, weight).double(), d_y64 @ weight64, rtol=1e-5, atol=1e-5)


def test_the_cpu_is_described_as_lscpu_does(tmp_path):
    """Vendor, model name, family, model and the vector extensions that matter here, from the first
    processor's block (lscpu's source); the processor's name alone where there is no such file."""
    path = tmp_path / "cpuinfo"
    block = ("processor\t: {n}\nvendor_id\t: AuthenticAMD\ncpu family\t: 25\nmodel\t\t: 17\n"
             "model name\t: AMD EPYC 9B14\nflags\t\t: fpu sse2 avx2 avx512f avx512_bf16 avx512vl\n\n")
    path.write_text(block.format(n=0) + block.format(n=1))
    cpu = products.cpu(str(path))
    assert cpu == {"vendor": "AuthenticAMD", "model_name": "AMD EPYC 9B14", "family": 25, "model": 17,
                   "extensions": ["avx2", "avx512f", "avx512_bf16"]}
    assert products.describe_cpu(cpu) == "AMD EPYC 9B14 (AuthenticAMD, family 25, model 17; AVX2, AVX512F, AVX512_BF16)"
    (tmp_path / "old").write_text(block.format(n=0).replace(" avx2 avx512f avx512_bf16", ""))
    assert products.describe_cpu(products.cpu(str(tmp_path / "old"))).endswith(
        "model 17; none of AVX2, AVX512F, AVX512_BF16, AMX_BF16)")
    elsewhere = products.cpu(str(tmp_path / "no-such-file"))
    assert elsewhere["vendor"] is None and elsewhere["model_name"] and products.describe_cpu(elsewhere)


def test_the_training_step_tells_the_rule_the_size_of_its_products(monkeypatch):
    """make_step's fused step counts its forward pass's multiply-adds from the model, the batch and the draws
    of z: the defaults take oneDNN where the rule gives it, Burda et al.'s model at batch 20 torch.mm, and its
    IWAE at batch 20 (the decoder on 5 draws per image) oneDNN again, where the CPU family bounds small steps at
    SMALL_STEP."""
    from dataclasses import replace

    from mnist_vae.config import Config
    from mnist_vae.loop import make_model
    from mnist_vae.step import make_step

    monkeypatch.setattr(products, "_amd_with_avx512", lambda: True)
    monkeypatch.setattr(products, "small_step", lambda: products.SMALL_STEP)
    large = "oneDNN" if products.onednn_available(torch.device("cpu")) else "torch.mm"
    burda = dict(dim_z=50, n_hidden=200, activation="tanh", dropout=0.0, batch_size=20)
    for changes, expected in (({}, large), (burda, "torch.mm"), (dict(burda, objective="iwae", k_train=5), large)):
        config = replace(Config(), **changes)
        model, optimizer = make_model(config, torch.device("cpu"))
        assert make_step(model, optimizer, config).products.name == expected, changes
