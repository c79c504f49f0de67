"""--precision bf16: bfloat16 products with float32 weights, Adam and loss, and a clear refusal where the
hardware has no bfloat16 instructions."""

import pytest
import torch

from conftest import make_idx_dataset
from mnist_vae.fast import products
from mnist_vae.config import Config
from mnist_vae.data import load_dataset
from mnist_vae.step import make_step
from mnist_vae.loop import make_model


# Steps of each training: where torch emulates bfloat16 (no AVX512_BF16 or AMX), a bfloat16 step takes some
# fifteen times a float32 one, and 80 steps show the same as 150.
STEPS = 150 if products.bf16_instructions(torch.device("cpu")) else 80


@pytest.fixture(scope="module")
def mnist_x():
    dataset = load_dataset("mnist", log=lambda *a: None)
    return torch.from_numpy(dataset.train_images[:128 * STEPS].reshape(-1, 784).copy()).float() / 255


def _train(x, **settings):
    torch.manual_seed(0)
    config = Config(**settings)
    model, optimizer = make_model(config, torch.device("cpu"))
    step = make_step(model, optimizer, config)
    terms = torch.stack([step(x[128 * i: 128 * (i + 1)], None, None) for i in range(len(x) // 128)])
    return model, optimizer, step, terms


@pytest.mark.parametrize("step", ["fused", "autograd"])
def test_bf16_trains_as_float32_does_within_bfloat16_rounding(mnist_x, step):
    _, _, _, fp32 = _train(mnist_x, step=step)
    model, optimizer, train_step, bf16 = _train(mnist_x, step=step, precision="bf16")
    if step == "fused":
        assert train_step.products.bf16
    assert bf16[-20:, 0].mean() < bf16[:20, 0].mean() - 100  # it learned
    # The same path within bfloat16's 8-bit mantissa: each step's loss within a fraction of a per cent.
    torch.testing.assert_close(bf16[:, 0], fp32[:, 0], rtol=1e-2, atol=0.5)
    assert abs(bf16[-20:, 0].mean() - fp32[-20:, 0].mean()) < 1.0
    # Master weights, gradients and Adam's moments stay float32.
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert all(s["exp_avg"].dtype == torch.float32 for s in optimizer.state.values())
    assert torch.all(torch.isfinite(bf16))


def test_bf16_is_refused_in_one_line_without_bfloat16_instructions(tmp_path, monkeypatch, capsys):
    from mnist_vae.cli import main

    monkeypatch.setattr(products, "bf16_instructions", lambda device: False)
    data = make_idx_dataset(tmp_path / "data")
    out = tmp_path / "out"
    code = main(["--precision", "bf16", "--data_dir", str(data), "--num_epochs", "1", "--output", str(out)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1 and len(err) == 1, err
    assert "--precision bf16" in err[0] and "use --precision fp32" in err[0] and "Traceback" not in err[0]
    assert not out.exists()


def test_bf16_instructions_are_read_from_the_cpu_flags(monkeypatch):
    monkeypatch.setattr(products, "_cpu_flags", lambda: frozenset({"avx2", "avx512f"}))
    assert not products.bf16_instructions(torch.device("cpu"))
    monkeypatch.setattr(products, "_cpu_flags", lambda: frozenset({"avx512f", "avx512_bf16"}))
    assert products.bf16_instructions(torch.device("cpu"))
    monkeypatch.setattr(products, "_cpu_flags", lambda: frozenset({"amx_bf16", "amx_tile"}))
    assert products.bf16_instructions(torch.device("cpu"))
    with pytest.raises(ValueError, match="use --precision fp32"):
        monkeypatch.setattr(products, "_cpu_flags", lambda: frozenset())
        products.check_precision("bf16", torch.device("cpu"))
    products.check_precision("fp32", torch.device("cpu"))  # float32 is always there


def test_the_bf16_step_sees_weights_changed_outside_it(mnist_x):
    """The step keeps each weight's bfloat16 copy from step to step (Adam's C loop writes it as it updates the
    weight); a weight changed otherwise, as a checkpoint loads it, is copied again before its next product."""
    model, _, step, _ = _train(mnist_x[:128 * 3], precision="bf16")
    assert step.products.bf16
    assert all(torch.equal(step._weight_operand(i), w.bfloat16()) for i, w in enumerate(step.weights))
    model.load_state_dict({name: value + 0.01 for name, value in model.state_dict().items()})
    assert all(torch.equal(step._weight_operand(i), w.bfloat16()) for i, w in enumerate(step.weights))
