"""The training step with its backward pass written out by hand: the fast path of train.py.

Autograd records and replays some sixty small operations per step; on a 2-core CPU
that bookkeeping, not the arithmetic, is what made a plain PyTorch step twice the
cost of its matrix products. Here the gradient of the -ELBO of model.VAE is derived
once on paper and computed directly, with the same random draws in the same order
as model.VAE.forward, so a test can check both give the same losses step by step.
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
"""

import torch

from . import kernels
from .model import continuous_bernoulli_log_norm


class FusedTrainStep:
    """Calls of this object take one optimizer step on a batch; they return the batch means of
    [-ELBO, reconstruction -log p(x|z), KL] as one tensor, without synchronising."""

    def __init__(self, model, optimizer):
        self.model, self.optimizer = model, optimizer
        encoder, decoder = model.encoder, model.decoder
        self.layers = [encoder[0], encoder[3], encoder[6], decoder[0], decoder[3], decoder[6]]
        self.p = encoder[2].p
        for layer in self.layers:
            for parameter in (layer.weight, layer.bias):
                if parameter.grad is None:
                    parameter.grad = torch.zeros_like(parameter)

    def _bits(self, like):
        """The dropout bits of one layer, drawn where model.VAE.forward draws its mask."""
        return None if self.p == 0 else kernels.dropout_bits(like.numel(), like.device)

    def __call__(self, x, target=None):
        target = x if target is None else target
        (W1, b1), (W2, b2), (W3, b3), (W4, b4), (W5, b5), (W6, b6) = (
            (layer.weight, layer.bias) for layer in self.layers)
        batch, dim_z, p = x.shape[0], self.model.dim_z, self.p

        with torch.no_grad():
            # Forward, keeping what the backward pass needs: each layer's output h and the factor
            # f = m act'(a) that turns d(loss)/dh into d(loss)/da. Biases are added in the kernels.
            a1 = torch.mm(x, W1.t())
            h1, f1 = kernels.elu_dropout(a1, b1, self._bits(a1), p)
            h2, f2 = kernels.tanh_dropout(torch.mm(h1, W2.t()), b2, self._bits(h1), p)
            gaussian = torch.addmm(b3, h2, W3.t())
            eps = torch.randn(batch, dim_z, device=x.device)
            z, std, kl = kernels.gaussian_sample(gaussian, eps)
            a4 = torch.mm(z, W4.t())
            h4, f4 = kernels.tanh_dropout(a4, b4, self._bits(a4), p)
            h5, f5 = kernels.elu_dropout(torch.mm(h4, W5.t()), b5, self._bits(h4), p)
            logits = torch.mm(h5, W6.t())

            # log p = target logits - softplus(logits), as model.log_likelihood; and
            # d(loss)/d(logits) = (sigmoid(logits) - target) / B for the Bernoulli part.
            reconstruction, d_logits = kernels.bernoulli_loss(logits, b6, target, 1 / batch)
            if self.model.likelihood == "continuous_bernoulli":
                logits.add_(b6)
                reconstruction = reconstruction + continuous_bernoulli_log_norm(logits).sum()
                d_logits.sub_(_continuous_bernoulli_log_norm_grad(logits).div_(batch))
            reconstruction, kl = reconstruction / batch, kl / batch

            # Backward.
            d_h5 = self._linear_backward(d_logits, h5, W6, b6)
            d_h4 = self._linear_backward(d_h5.mul_(f5), h4, W5, b5)
            d_z = self._linear_backward(d_h4.mul_(f4), z, W4, b4)
            d_gaussian = kernels.gaussian_backward(gaussian, eps, std, d_z, 1 / batch)
            d_h2 = self._linear_backward(d_gaussian, h2, W3, b3)
            d_h1 = self._linear_backward(d_h2.mul_(f2), h1, W2, b2)
            self._linear_backward(d_h1.mul_(f1), x, W1, b1, need_input_grad=False)

        self.adam_step()
        return torch.stack([kl - reconstruction, -reconstruction, kl])

    def adam_step(self):
        """optimizer.step() for a fused Adam, less its per-call Python bookkeeping (0.4 ms here)."""
        optimizer = self.optimizer
        group = optimizer.param_groups[0]
        params = group["params"]
        if not (group.get("fused") and hasattr(torch, "_fused_adam_")) or len(optimizer.param_groups) > 1:
            optimizer.step()
            return
        if not optimizer.state:  # the state torch.optim.Adam would create on its first step
            for p in params:
                optimizer.state[p] = {"step": torch.tensor(0.0, device=p.device),
                                      "exp_avg": torch.zeros_like(p), "exp_avg_sq": torch.zeros_like(p)}
        states = [optimizer.state[p] for p in params]
        steps = [state["step"] for state in states]
        torch._foreach_add_(steps, 1)
        beta1, beta2 = group["betas"]
        torch._fused_adam_(
            params, [p.grad for p in params], [state["exp_avg"] for state in states],
            [state["exp_avg_sq"] for state in states], [], steps, amsgrad=False, lr=group["lr"],
            beta1=beta1, beta2=beta2, weight_decay=group["weight_decay"], eps=group["eps"],
            maximize=False)

    @staticmethod
    def _linear_backward(d_out, inputs, weight, bias, need_input_grad=True):
        """Write the gradients of y = inputs W' + b into W.grad and b.grad; return d(inputs)."""
        torch.mm(d_out.t(), inputs, out=weight.grad)
        torch.sum(d_out, dim=0, out=bias.grad)
        return torch.mm(d_out, weight) if need_input_grad else None


def _continuous_bernoulli_log_norm_grad(logits):
    """d/dl log C(l) = 1/l - 1/sinh(l), which tends to l/6 near 0."""
    small = logits.abs() < 1e-2
    safe = torch.where(small, torch.ones_like(logits), logits)
    return torch.where(small, logits / 6, 1 / safe - 1 / torch.sinh(safe))
