"""DReG gradients of the IWAE objective (Tucker, Lawson, Gu & Maddison 2019): the same objective value,
the same expected gradient as the standard estimator, the decoder's gradient unchanged, the encoder's of
lower variance; and --gradient dreg where it applies only."""

import math
from dataclasses import replace

import pytest
import torch

import mnist_vae.model
from conftest import assert_one_line_error, main
from mnist_vae import step
from mnist_vae.config import Config
from mnist_vae.fast import fused
from mnist_vae.model import VAE, TwoLayerVAE, build


@pytest.fixture(autouse=True)
def one_thread():
    """Thousands of products of a few rows: one thread does them fastest, and a second one only waits
    for a core that other processes may hold."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def tiny(kind="vae", seed=0):
    """A small model in float64 (so that the two estimators' differences are the estimators', not
    rounding), trained a few steps so that its weights are not the initial ones, and a few images."""
    torch.manual_seed(seed)
    if kind == "vae":
        model = VAE(dim_z=2, n_hidden=8, dropout=0.0, activation="tanh")
    else:
        model = TwoLayerVAE(dim_z=2, dim_z1=3, n_hidden=8, n_hidden2=4)
    model = model.double()
    x = (torch.rand(2, 784, dtype=torch.float64) ** 3 > 0.4).double()
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(20):
        loss, _ = model.loss(x)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model, x


def encoder_and_decoder(model):
    """The encoder's and the decoder's parameters: (names, names)."""
    names = [name for name, _ in model.named_parameters()]
    encoder = [name for name in names if name.startswith(("encoder", "q_"))]
    return encoder, [name for name in names if name not in encoder]


def gradients(model, x, gradient, seed, k, kl_weight=1.0):
    """(loss, the encoder's gradient, the decoder's) of one draw of the IWAE loss, each one flat vector."""
    torch.manual_seed(seed)  # the draws of eps: the same seed gives both estimators the same z
    model.zero_grad()
    loss, _ = model.loss(x, objective="iwae", k=k, gradient=gradient, kl_weight=kl_weight)
    loss.backward()
    encoder, decoder = encoder_and_decoder(model)
    parameters = dict(model.named_parameters())
    flat = [torch.cat([parameters[name].grad.flatten() for name in part]) for part in (encoder, decoder)]
    return loss.item(), *flat


def last_layers(model):
    """The last layer of each encoder MLP: q(z|x)'s, or q(z1|x)'s and q(z2|z1)'s."""
    return [model.encoder[-1]] if isinstance(model, VAE) else [model.q_z1[-1], model.q_z2[-1]]


def many_draws(model, x, gradient, n, k, kl_weight=1.0, per_pass=200):
    """The gradient of the last layer (weights and bias) of each encoder MLP for n independent draws of
    the IWAE loss of the images x: (n, parameters).

    Many draws per pass: the batch holds copies of x, each copy's rows draw their own z, and the gradient
    of a copy is its share of the batch's, which hooks take from each layer's input and output gradient.
    (Every other weight of q(z|x) gets a gradient that is a fixed linear map of its last layer's output
    gradient, so these layers decide whether the expected gradients agree.)"""
    layers = last_layers(model)
    draws = []
    torch.manual_seed(12)
    for start in range(0, n, per_pass):
        copies = min(per_pass, n - start)
        records = {layer: [] for layer in layers}

        def record(layer, inputs, output):
            if records[layer]:  # DReG runs q(z2|z1) a second time, with its weights held fixed
                return
            entry = {"input": inputs[0].detach()}
            output.register_hook(lambda grad: entry.__setitem__("grad", grad))
            records[layer].append(entry)

        handles = [layer.register_forward_hook(record) for layer in layers]
        model.zero_grad()
        loss, _ = model.loss(x.repeat(copies, 1), objective="iwae", k=k, gradient=gradient, kl_weight=kl_weight)
        loss.backward()
        for handle in handles:
            handle.remove()
        parts = []
        for layer in layers:
            entry = records[layer][0]
            # rows (..., copies * batch, features) -> (..., copies, batch, features); a copy's loss is the mean
            # over its batch, the batch's over all copies: its gradient is `copies` times its share
            grad = entry["grad"].reshape(-1, copies, len(x), layer.out_features) * copies
            inputs = entry["input"].reshape(-1, copies, len(x), layer.in_features)
            weight = torch.einsum("acbo,acbi->coi", grad, inputs).flatten(1)
            bias = grad.sum((0, 2))
            # the hooks saw what autograd summed into the layer's gradient
            torch.testing.assert_close(weight.mean(0), layer.weight.grad.flatten())
            torch.testing.assert_close(bias.mean(0), layer.bias.grad)
            parts += [weight, bias]
        draws.append(torch.cat(parts, dim=1))
    return torch.cat(draws)


def z_scores(a, b):
    """The paired differences' means over their standard errors, for each component with any spread."""
    difference = a - b  # the same z in both, so the noise they share cancels
    kept = difference.std(0) > 1e-9
    return difference.mean(0)[kept] / (difference.std(0)[kept] / math.sqrt(len(a)))


@pytest.mark.parametrize("kind", ["vae", "vae2"])
def test_same_value_and_same_decoder_gradient_given_the_same_draws(kind):
    model, x = tiny(kind)
    for seed in range(3):
        standard_loss, standard_encoder, standard_decoder = gradients(model, x, "standard", seed, k=5)
        dreg_loss, dreg_encoder, dreg_decoder = gradients(model, x, "dreg", seed, k=5)
        assert dreg_loss == pytest.approx(standard_loss, rel=1e-12)
        torch.testing.assert_close(dreg_decoder, standard_decoder, rtol=1e-9, atol=1e-12)
        # the encoder's is another estimate of the same expectation, not the same number
        assert not torch.allclose(dreg_encoder, standard_encoder, rtol=1e-3, atol=1e-6)


@pytest.mark.parametrize("kind, kl_weight", [("vae", 1.0), ("vae", 0.5), ("vae2", 1.0)])
def test_expected_encoder_gradient_is_the_standard_one_and_its_variance_lower(kind, kl_weight):
    """Both estimators on the same 2000 draws: the mean of their difference is zero within its standard
    error, component by component; DReG's variance is lower."""
    model, x = tiny(kind)
    n, k = 2000, 5
    standard = many_draws(model, x, "standard", n, k, kl_weight)
    dreg = many_draws(model, x, "dreg", n, k, kl_weight)
    z = z_scores(dreg, standard)
    assert len(z) > 20
    # Unbiased: each z is about standard normal. (The components are not independent: all come from the
    # few coordinates of mu and std, so the mean of z^2 varies more than a chi-square's of as many; over
    # five models it was 0.4 to 2.4, and that of the biased estimator below 760 to 2350.)
    assert z.square().mean() < 4 and z.abs().max() < 5, (z.square().mean(), z.abs().max())
    ratio = (dreg.var(0).sum() / standard.var(0).sum()).item()
    assert ratio < 0.7, f"DReG's encoder gradient variance is {ratio:.3f} of the standard estimator's"
    print(f"{kind}, KL weight {kl_weight}: variance ratio {ratio:.3f}, mean z^2 {z.square().mean():.2f}")


def test_the_unbiasedness_test_tells_a_biased_estimator(monkeypatch):
    """The same comparison finds the bias of the estimator without the squared weights (the path
    gradient alone, 'sticking the landing', which is biased for k > 1): the test above can fail."""
    model, x = tiny("vae")
    standard = many_draws(model, x, "standard", 2000, 5)

    def path_gradient_only(log_w, bound, latents, kl_weight=1.0):
        surrogate = -(torch.softmax(log_w.detach(), dim=0) * log_w).sum(0).mean()
        return surrogate + (-bound.mean() - surrogate).detach()

    monkeypatch.setattr(mnist_vae.model, "dreg_surrogate", path_gradient_only)
    z = z_scores(many_draws(model, x, "dreg", 2000, 5), standard)
    assert z.square().mean() > 50, z.square().mean()


# ---------------------------------------------------------------- the setting

def test_dreg_reaches_the_fused_step_and_the_models_loss(monkeypatch):
    config = Config(n_hidden=16, dim_z=3, objective="iwae", k_train=4, gradient="dreg")
    model = build(config)
    fast = step.make_step(model, torch.optim.Adam(model.parameters()), config)
    assert isinstance(fast, fused.FusedTrainStep) and fast.loss_options["gradient"] == "dreg"
    # the gradient alone, without the iwae objective, is not something the fused step computes
    plain = Config(n_hidden=16, dim_z=3, gradient="dreg")
    assert "--gradient dreg" in fused.unsupported(build(plain), plain)
    seen = {}
    original = VAE.loss

    def loss(self, *args, **kwargs):
        seen.update(kwargs)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(VAE, "loss", loss)
    train_step = step.make_step(model, torch.optim.Adam(model.parameters()), replace(config, step="autograd"))
    assert isinstance(train_step, step.AutogradTrainStep)
    train_step(torch.rand(4, 784))
    assert seen["gradient"] == "dreg" and seen["objective"] == "iwae" and seen["k"] == 4
    # the standard gradient is not passed at all, so a registered model's loss need not know the option
    standard = Config(n_hidden=16, dim_z=3, objective="iwae", k_train=4, step="autograd")
    assert "gradient" not in step.make_step(model, torch.optim.Adam(model.parameters()), standard).loss_options


def test_gradient_without_iwae_is_one_line(tmp_path, capsys):
    result = main(capsys, "--gradient", "dreg", "--output", tmp_path / "x")
    assert_one_line_error(result, "--gradient dreg needs --objective iwae")
    assert not (tmp_path / "x").exists()


def test_two_layer_dreg_with_dropout_is_one_line(tmp_path, capsys):
    result = main(capsys, "--model", "vae2", "--objective", "iwae", "--k_train", "2", "--gradient", "dreg",
                  "--output", tmp_path / "x")
    assert_one_line_error(result, "--gradient dreg with --model vae2 needs --dropout 0")
    assert not (tmp_path / "x").exists()


def test_a_model_refuses_dreg_of_the_elbo():
    model, x = tiny("vae")
    with pytest.raises(ValueError, match="the dreg gradient is one of the iwae objective"):
        model.loss(x, gradient="dreg")
