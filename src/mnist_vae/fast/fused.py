"""The training step with its backward pass written out by hand: the fast path of the training loop.

Autograd records and replays some sixty small operations per step; on a 2-core CPU
that bookkeeping, not the arithmetic, is what made a plain PyTorch step twice the
cost of its matrix products. Here the gradient of the -ELBO of model.VAE is derived
once on paper and computed directly, with the same random draws in the same order
as model.VAE.forward, so a test can check both give the same losses step by step.
It trains only what `supports` finds it computes: the old program's MLP (and the conditional
VAE, the same MLP with the one-hot label as more input columns of both first layers),
the plain ELBO; every other model or loss goes through the autograd step (step.py).
The elementwise work of each layer (bias, activation, dropout, and the factor its
backward pass needs) is one call into kernels.py, one loop in C where it is built.

Notation, for a batch of B images (h: hidden activations after dropout):
  a1 = x W1' + b1        e1 = elu(a1)      h1 = e1 m1     (m: dropout mask, 0 or 1/(1-p))
  a2 = h1 W2' + b2       t2 = tanh(a2)     h2 = t2 m2
  [mu, s] = h2 W3' + b3  std = softplus(s) + 1e-6          z = mu + std eps
  a4 = z W4' + b4        t4 = tanh(a4)     h4 = t4 m4
  a5 = h4 W5' + b5       e5 = elu(a5)      h5 = e5 m5
  logits = h5 W6' + b6
  loss = mean over the batch of  KL(q(z|x) || N(0, I)) - log p(target | logits)
A conditional model reads [x, y] for x and [z, y] for z in the first layers (y one-hot);
the gradient with respect to z is the first dim_z columns of that of [z, y].
"""

import torch
from torch import nn

from .. import layers
from ..model import LIKELIHOODS, VAE, ConditionalVAE, continuous_bernoulli_log_norm
from . import kernels
from .products import Products

# The old program's MLP, module by module: what the step below computes, and nothing else.
ENCODER = (nn.Linear, nn.ELU, layers.Dropout, nn.Linear, layers.Tanh, layers.Dropout, nn.Linear)
DECODER = (nn.Linear, layers.Tanh, layers.Dropout, nn.Linear, nn.ELU, layers.Dropout, nn.Linear)


def unsupported(model, config):
    """Why the fused step would not compute what `model.loss` computes under `config`; None if it does.

    It looks at the model itself (its class, each module's type and settings, the parameters'
    dtype), so a model edited to use another activation or layer goes to the autograd step; and at
    the loss the config asks for, since only the plain ELBO is written out here.
    """
    if type(model) not in (VAE, ConditionalVAE):  # a subclass may encode, decode or lose differently
        return f"it trains model.VAE and model.ConditionalVAE only, not {type(model).__name__}"
    for part, expected in (("encoder", ENCODER), ("decoder", DECODER)):
        modules = list(getattr(model, part))
        if tuple(type(m) for m in modules) != expected:
            found = ", ".join(type(m).__name__ for m in modules)
            return f"the {part} is not the old program's MLP ({found})"
        if any(isinstance(m, nn.ELU) and (m.alpha != 1.0 or m.inplace) for m in modules):
            return f"the {part}'s ELU is not elu with alpha 1"
        if any(isinstance(m, nn.Linear) and m.bias is None for m in modules):
            return f"the {part} has a layer without a bias"
    n_y = model.n_classes if model.conditional else 0
    shapes = [m.weight.shape for m in (*model.encoder, *model.decoder) if isinstance(m, nn.Linear)]
    h = model.n_hidden
    if shapes != [(h, 784 + n_y), (h, h), (2 * model.dim_z, h), (h, model.dim_z + n_y), (h, h), (784, h)]:
        return "its layers' shapes are not the old program's MLP's"
    if len({m.p for m in (*model.encoder, *model.decoder) if isinstance(m, layers.Dropout)}) != 1:
        return "its dropout rates differ between layers"
    if model.likelihood not in LIKELIHOODS:
        return f"it has no gradient for the likelihood {model.likelihood!r}"
    if any(p.dtype != torch.float32 for p in model.parameters()):
        return "its kernels are float32, and the model's parameters are not"
    if config.objective != "elbo" or config.beta != 1 or config.kl_warmup != 0:
        return "it computes the plain ELBO only (no --objective iwae, --beta or --kl_warmup)"
    if config.gradient != "standard":
        return f"it computes the standard gradient only, not --gradient {config.gradient}"
    return None


def supports(model, config):
    """Whether the fused step computes exactly what the model's own loss does under `config`."""
    return unsupported(model, config) is None


class FusedTrainStep:
    """Calls of this object take one optimizer step on a batch (images, targets, labels); they return
    the batch means of [-ELBO, reconstruction -log p(x|z), KL, loss] as one tensor, as model.VAE.loss,
    without synchronising. Use it only where `supports(model, config)`."""

    def __init__(self, model, optimizer, precision="fp32"):
        self.model, self.optimizer = model, optimizer
        encoder, decoder = model.encoder, model.decoder
        self.layers = [encoder[0], encoder[3], encoder[6], decoder[0], decoder[3], decoder[6]]
        self.p = encoder[2].p
        # torch.mm, or oneDNN where the rule says; bfloat16 copies of the operands with --precision bf16
        self.products = Products(self.layers[0].weight.device, precision)
        self.n_classes = model.n_classes if model.conditional else 0
        group = optimizer.param_groups[0]
        self.adam_by_layer = bool(group.get("fused") and hasattr(torch, "_fused_adam_") and not group["amsgrad"]
                                  and not group["maximize"] and len(optimizer.param_groups) == 1)
        if self.adam_by_layer:
            # Adam is applied to each layer as soon as the backward pass has its gradient, and all
            # weight gradients share one buffer: the gradient is still in cache when Adam reads it,
            # and the step touches 3.5 MB less memory, which keeps more of Adam's moments in the
            # L3 cache between steps (measured: 0.1 s less per default epoch).
            weight = self.layers[0].weight
            shared = torch.empty(max(layer.weight.numel() for layer in self.layers), dtype=weight.dtype,
                                 device=weight.device)
            self.grads = [(shared[:layer.weight.numel()].view_as(layer.weight), torch.empty_like(layer.bias))
                          for layer in self.layers]
        else:  # optimizer.step() after the backward pass, from the parameters' .grad
            for layer in self.layers:
                for parameter in (layer.weight, layer.bias):
                    if parameter.grad is None:
                        parameter.grad = torch.zeros_like(parameter)
            self.grads = [(layer.weight.grad, layer.bias.grad) for layer in self.layers]

    def _key(self):
        """The key of one layer's dropout mask, drawn where model.VAE.forward draws that mask's bits."""
        return None if self.p == 0 else layers.dropout_key()

    def __call__(self, x, target=None, labels=None):
        target = x if target is None else target
        y = None
        if self.n_classes:
            y = torch.nn.functional.one_hot(labels, self.n_classes).to(x.dtype)
            x = torch.cat([x, y], dim=1)
        (W1, b1), (W2, b2), (W3, b3), (W4, b4), (W5, b5), (W6, b6) = (
            (layer.weight, layer.bias) for layer in self.layers)
        batch, dim_z, p = x.shape[0], self.model.dim_z, self.p

        with torch.no_grad():
            # Forward, keeping what the backward pass needs: each layer's output h and the factor
            # f = m act'(a) that turns d(loss)/dh into d(loss)/da. Biases are added in the kernels.
            mm = self.products.linear
            h1, f1 = kernels.elu_dropout(mm(x, W1), b1, self._key(), p)
            h2, f2 = kernels.tanh_dropout(mm(h1, W2), b2, self._key(), p)
            gaussian = mm(h2, W3).add_(b3) if self.products.onednn else torch.addmm(b3, h2, W3.t())
            eps = torch.randn(batch, dim_z, device=x.device)
            z, std, kl = kernels.gaussian_sample(gaussian, eps)
            if y is not None:
                z = torch.cat([z, y], dim=1)
            h4, f4 = kernels.tanh_dropout(mm(z, W4), b4, self._key(), p)
            h5, f5 = kernels.elu_dropout(mm(h4, W5), b5, self._key(), p)
            logits = mm(h5, W6)

            # log p = target logits - softplus(logits), as model.log_likelihood; and
            # d(loss)/d(logits) = (sigmoid(logits) - target) / B for the Bernoulli part.
            reconstruction, d_logits = kernels.bernoulli_loss(logits, b6, target, 1 / batch)
            if self.model.likelihood == "continuous_bernoulli":
                logits.add_(b6)
                reconstruction = reconstruction + continuous_bernoulli_log_norm(logits).sum()
                d_logits.sub_(_continuous_bernoulli_log_norm_grad(logits).div_(batch))
            reconstruction, kl = reconstruction / batch, kl / batch

            # Backward.
            if self.adam_by_layer:
                self._count_adam_step()
            d_h5 = self._linear_backward(5, d_logits, h5)
            d_h4 = self._linear_backward(4, d_h5.mul_(f5), h4)
            d_z = self._linear_backward(3, d_h4.mul_(f4), z)
            if y is not None:
                d_z = d_z[:, :dim_z].contiguous()
            d_gaussian = kernels.gaussian_backward(gaussian, eps, std, d_z, 1 / batch)
            d_h2 = self._linear_backward(2, d_gaussian, h2)
            d_h1 = self._linear_backward(1, d_h2.mul_(f2), h1)
            self._linear_backward(0, d_h1.mul_(f1), x, need_input_grad=False)

        if not self.adam_by_layer:
            self.optimizer.step()
        neg_elbo = kl - reconstruction
        return torch.stack([neg_elbo, -reconstruction, kl, neg_elbo])  # as model.VAE.loss: the loss is -ELBO

    def _linear_backward(self, index, d_out, inputs, need_input_grad=True):
        """The gradients of layer `index`, y = inputs W' + b, and with adam_by_layer its Adam update
        (after W's last use in this step); return d(inputs)."""
        weight = self.layers[index].weight
        grad_weight, grad_bias = self.grads[index]
        self.products.weight_grad(d_out, inputs, out=grad_weight)
        torch.sum(d_out, dim=0, out=grad_bias)
        d_inputs = self.products.input_grad(d_out, weight) if need_input_grad else None
        if self.adam_by_layer:
            self._adam(index)
        return d_inputs

    def adam_step(self):
        """Adam's update of every parameter from the gradients of the last step, as the step applies
        it (the benchmark times this alone)."""
        if not self.adam_by_layer:
            self.optimizer.step()
            return
        self._count_adam_step()
        for index in range(len(self.layers)):
            self._adam(index)

    def _count_adam_step(self):
        """Create Adam's state as torch.optim.Adam would on its first step; add 1 to every step count."""
        state = self.optimizer.state
        parameters = self.optimizer.param_groups[0]["params"]
        if not state:
            for p in parameters:
                state[p] = {"step": torch.tensor(0.0, device=p.device),
                            "exp_avg": torch.zeros_like(p), "exp_avg_sq": torch.zeros_like(p)}
        torch._foreach_add_([state[p]["step"] for p in parameters], 1)

    def _adam(self, index):
        """torch.optim.Adam(fused=True).step() for the weight and bias of one layer, without its
        per-call Python bookkeeping."""
        group = self.optimizer.param_groups[0]
        layer = self.layers[index]
        states = [self.optimizer.state[layer.weight], self.optimizer.state[layer.bias]]
        beta1, beta2 = group["betas"]
        torch._fused_adam_(
            [layer.weight, layer.bias], list(self.grads[index]), [s["exp_avg"] for s in states],
            [s["exp_avg_sq"] for s in states], [], [s["step"] for s in states], amsgrad=False,
            lr=group["lr"], beta1=beta1, beta2=beta2, weight_decay=group["weight_decay"], eps=group["eps"],
            maximize=False)


def _continuous_bernoulli_log_norm_grad(logits):
    """d/dl log C(l) = 1/l - 1/sinh(l), which tends to l/6 near 0."""
    small = logits.abs() < 1e-2
    safe = torch.where(small, torch.ones_like(logits), logits)
    return torch.where(small, logits / 6, 1 / safe - 1 / torch.sinh(safe))
