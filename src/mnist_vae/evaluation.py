"""Measuring a model: the test -ELBO, the importance-weighted log-likelihood estimate, the accuracy as a classifier, and the metrics' names."""

import math

import torch
from tqdm import tqdm

from .fast import memory
from .fast.estimate import log_px_of_draws
from .fast.threads import ThreadGovernor
from .model import classify, evaluating, importance_weighted_log_likelihood, noise_size


EVAL_SEED = 1312  # the z samples of the test -ELBO


IW_SEED = 6114  # the importance samples of the log-likelihood estimate


TERMS = ("neg_elbo", "recon", "kl", "loss")
"""What a training step returns, by column: the batch means of the -ELBO, the reconstruction term
-log p(x|z), the KL and the loss minimised; the test -ELBO (`evaluate`) has the first three. Each
is a metric's name after "train_" or "test_" (the -ELBO's as elbo_name says)."""


def term(terms, name):
    """The column `name` (one of TERMS) of the step results `terms`, a tensor (..., len(TERMS))."""
    return terms[..., TERMS.index(name)]


METRIC_FIELDS = ["epoch", "train_neg_elbo", "train_recon", "train_kl",
                 "test_neg_elbo", "test_recon", "test_kl", "seconds", "likelihood", "binarize"]


def elbo_name(config):
    """The metrics' name of the -ELBO: of log p(x), or of log p(x|y) for a conditional model, so the
    two never share a column."""
    return "neg_elbo_given_y" if config.conditional else "neg_elbo"


def metric_fields(config):
    """metrics.csv's columns for this run: METRIC_FIELDS, with the -ELBO named for what it bounds, and
    the training loss actually minimised (beta, warm-up, IWAE), the test K-sample bound (IWAE) and the
    test accuracy of the model as a classifier (conditional) where the run has them."""
    fields = [field.replace("neg_elbo", elbo_name(config)) for field in METRIC_FIELDS]
    if config.beta != 1 or config.kl_warmup or config.objective != "elbo":
        fields.insert(fields.index("train_kl") + 1, "train_loss")
    extra = [f"test_neg_iw_bound{'_given_y' if config.conditional else ''}"] if config.objective == "iwae" else []
    extra += ["test_accuracy"] if config.conditional else []
    at = fields.index("seconds")
    return fields[:at] + extra + fields[at:]


def epoch_row(model, config, tensors, train_terms, epoch, seconds):
    """The row of metrics.csv for `epoch` (counted from 1): the training terms `train_terms` (a dict by
    TERMS' names: means over the epoch's images), the test -ELBO and its terms, and where the run has
    them the test K-sample bound it trains on (IWAE, with fixed draws) and the accuracy as a classifier."""
    labels = tensors.test_y if model.conditional else None
    test_terms = dict(zip(TERMS, evaluate(model, tensors.test, labels=labels)))
    elbo = elbo_name(config)
    row = {"epoch": epoch,
           **{f"train_{name.replace('neg_elbo', elbo)}": value for name, value in train_terms.items()},
           **{f"test_{name.replace('neg_elbo', elbo)}": value for name, value in test_terms.items()},
           "seconds": seconds, "likelihood": config.likelihood, "binarize": config.binarize}
    if config.objective == "iwae":
        bound, _ = log_likelihood_estimate(model, tensors.test, config.k_train, progress=False, labels=labels,
                                           generator=torch.Generator(device=tensors.test.device).manual_seed(IW_SEED))
        row["test_neg_iw_bound" + ("_given_y" if model.conditional else "")] = bound
    if model.conditional:
        row["test_accuracy"] = classifier_accuracy(model, tensors.test, tensors.test_y)
    fields = metric_fields(config)
    return {key: value for key, value in row.items() if key in fields}


@torch.no_grad()
def evaluate(model, x, batch_size=2000, labels=None):
    """Test -ELBO, reconstruction -log p(x|z) and KL, nats per image, dropout off, fixed z draws
    (given the `labels`, for a conditional model: the -ELBO of log p(x|y))."""
    was_training = model.training
    model.eval()
    generator = torch.Generator(device=x.device).manual_seed(EVAL_SEED)
    sums = torch.zeros(3, device=x.device, dtype=torch.float64)
    for start in range(0, len(x), batch_size):
        batch = x[start: start + batch_size]
        eps = torch.randn((len(batch), noise_size(model)), generator=generator, device=x.device)
        batch_labels = None if labels is None else labels[start: start + batch_size]
        elbo, reconstruction, kl = model(batch, eps=eps, labels=batch_labels)
        sums += torch.stack([-elbo.sum(), -reconstruction.sum(), kl.sum()]).double()
    model.train(was_training)
    return (sums / len(x)).tolist()


@torch.no_grad()
def log_likelihoods(model, x, k, batch_size=100, progress=True, labels=None, generator=None, stop=None,
                    governor=None):
    """Importance-weighted estimate of log p(x) (of log p(x|y) given the `labels`, for a conditional
    model) for each image of `x`: a tensor (n,). Draws from `generator`, else from the global generator
    seeded with IW_SEED. Returns None if `stop` (a StopSignal) received a signal on the way. The
    `governor` (threads.ThreadGovernor; by default one that follows the machine's load) sets the threads."""
    if governor is None:
        with ThreadGovernor() as governor:
            return log_likelihoods(model, x, k, batch_size, progress, labels, generator, stop, governor)
    was_training = model.training
    model.eval()
    if generator is None:
        torch.manual_seed(IW_SEED)  # the estimator draws from the global generator; fix it for repeatability
    fast = log_px_of_draws(model)  # the decoder's products and loops of the training step, where they fit
    memory.keep_freed_memory()  # its outputs of megabytes on pages already mapped (fast/memory.py)
    per_image = []
    for start in tqdm(range(0, len(x), batch_size), desc=f"log-likelihood, k={k}", disable=None if progress else True,
                      leave=False):
        if stop is not None and stop.received is not None:
            model.train(was_training)
            return None
        governor()
        batch_labels = None if labels is None else labels[start: start + batch_size]
        per_image.append(importance_weighted_log_likelihood(model, x[start: start + batch_size], k,
                                                            labels=batch_labels, generator=generator,
                                                            log_px_of_draws=fast))
    model.train(was_training)
    return torch.cat(per_image)


def log_likelihood_estimate(model, x, k, batch_size=100, progress=True, labels=None, generator=None, stop=None,
                            governor=None):
    """Importance-weighted NLL over `x`: (mean, standard error) in nats per image; the standard error is
    NaN for a single image. None if `stop` received a signal on the way (see log_likelihoods)."""
    log_p = log_likelihoods(model, x, k, batch_size, progress, labels, generator, stop, governor)
    if log_p is None:
        return None
    nll = -log_p.double()
    stderr = nll.std().item() / math.sqrt(len(nll)) if len(nll) > 1 else float("nan")
    return nll.mean().item(), stderr


def classifier_accuracy(model, x, labels, batch_size=1000):
    """How often the conditional model, as a classifier (the label of highest ELBO), is right on `x`."""
    right = 0
    for start in range(0, len(x), batch_size):
        predicted = classify(model, x[start: start + batch_size], k=1, seed=EVAL_SEED).argmax(1)
        right += (predicted == labels[start: start + batch_size]).sum().item()
    return right / len(x)


def reconstruct(model, x, labels=None):
    """Decoded posterior means: what the reconstruction grids show."""
    with evaluating(model):
        mu, _ = model.encode(x, labels)
        return model.mean_image(model.decode(mu, labels))


def decode_images(model, z, labels=None):
    with evaluating(model):
        return model.mean_image(model.decode(z, labels))
