"""The training step: autograd through the model's own loss for any model, or the fused fast path where it computes the same.

The autograd step knows nothing of the model: it calls `model.loss(x, target, labels, ...)`,
back-propagates and lets Adam update, as minGPT's trainer knows nothing of GPT. The fused step
(fused.py) is the same step with the backward pass written out for the MLPs the models build and
their losses; `--step auto` uses it exactly where fused.supports() says it computes the same thing.
"""

import math

import torch

from .errors import UserError
from .fast import fused

STEPS = ("auto", "fused", "autograd")


class AutogradTrainStep:
    """Calls of this object take one optimizer step on a batch through the model's loss; they return
    the batch means of [-ELBO, reconstruction, KL, loss] as one tensor (the columns evaluation.TERMS
    names), without synchronising.
    `loss_options` (kl_weight, objective, k, and gradient where it is not the standard one) are passed
    to model.loss; kl_weight may change between
    calls (KL warm-up). With precision "bf16" the model runs under torch.autocast, whose layers multiply
    in bfloat16; the models hand their encoder's and decoder's outputs on as float32, so that the
    loss, the KL and the weights' updates are float32."""

    def __init__(self, model, optimizer, precision="fp32", **loss_options):
        self.model, self.optimizer, self.loss_options = model, optimizer, loss_options
        device_type = next(model.parameters()).device.type
        self.autocast = torch.autocast(device_type, dtype=torch.bfloat16, enabled=precision == "bf16")

    def __call__(self, x, target=None, labels=None):
        with self.autocast:
            loss, terms = self.model.loss(x, target, labels, **self.loss_options)
        self.optimizer.zero_grad()
        loss.backward()
        self.optimizer.step()
        return terms


def make_step(model, optimizer, config):
    """The step `config.step` asks for: auto picks the fused step where it supports the model and
    loss, else autograd; fused where it cannot be had is a UserError saying why."""
    loss_options = dict(kl_weight=config.beta, objective=config.objective, k=config.k_train)
    # The gradient estimator is passed only when it is not the standard one, so that a registered model
    # whose loss does not know the option trains as before.
    if config.gradient != "standard":
        loss_options["gradient"] = config.gradient
    reason = fused.unsupported(model, config)
    if config.step == "fused" and reason is not None:
        raise UserError(f"--step fused cannot train this run: {reason}; use --step auto or autograd")
    if config.step != "autograd" and reason is None:
        return fused.FusedTrainStep(model, optimizer, config.precision, batch_size=config.batch_size, **loss_options)
    return AutogradTrainStep(model, optimizer, config.precision, **loss_options)


def kl_weight(config, epoch, step, n_steps):
    """The KL's weight in the training loss at this step: beta, raised linearly from 0 over the first
    kl_warmup epochs (Bowman et al. 2016; Sønderby et al. 2016), step by step."""
    if config.kl_warmup == 0:
        return config.beta
    return config.beta * min(1.0, (epoch + step / n_steps) / config.kl_warmup)


def learning_rate(config, epoch, step, n_steps):
    """Adam's learning rate at this step of the run, under config.lr_schedule, with its linear warm-up
    from 0 over the first warmup_epochs (step by step).

    paper: Burda et al.'s schedule, passes i = 0..7 of 3^i epochs at learning_rate * 10^(-i/7), 3280
    epochs in all, scaled to the run: pass i takes 3^i/3280 of num_epochs, so a shorter run follows
    the same shape (a run of 3280 epochs is the paper's). cosine: half a cosine from learning_rate
    after the warm-up to 0 at the end of the run (Loshchilov & Hutter, SGDR, 2017, without restarts).
    """
    epochs_done = epoch + step / n_steps
    rate = config.learning_rate
    if config.lr_schedule == "paper":
        paper_epochs = epochs_done / config.num_epochs * 3280
        i = 0
        while i < 7 and paper_epochs >= (3 ** (i + 1) - 1) / 2:  # the end of pass i: 1 + 3 + ... + 3^i epochs
            i += 1
        rate *= 10 ** (-i / 7)
    elif config.lr_schedule == "cosine":
        span = config.num_epochs - config.warmup_epochs
        progress = min(1.0, max(0.0, (epochs_done - config.warmup_epochs) / span)) if span > 0 else 0.0
        rate *= 0.5 * (1 + math.cos(math.pi * progress))
    if config.warmup_epochs:
        rate *= min(1.0, (epoch * n_steps + step + 1) / (config.warmup_epochs * n_steps))
    return rate
