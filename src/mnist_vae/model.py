"""The models: the VAE and the conditional VAE (the old program's MLP, or MLPs of a chosen depth and activation) and the VAE of two stochastic layers, each owning its loss (ELBO, beta, IWAE, DReG), the registry of models, and the importance-weighted bound.

Kingma & Welling, "Auto-Encoding Variational Bayes" (2014), with the MLPs of the
TensorFlow program this project replaces; Burda, Grosse & Salakhutdinov,
"Importance Weighted Autoencoders" (2016) for the log-likelihood estimate and the model of two
stochastic layers;
Loaiza-Ganem & Cunningham, "The continuous Bernoulli" (2019) for grey-level pixels;
Kingma, Rezende, Mohamed & Welling, "Semi-supervised learning with deep generative models"
(2014) and Sohn, Lee & Yan (2015) for the conditional VAE; Higgins et al. (2017) for beta;
Tucker, Lawson, Gu & Maddison, "Doubly reparameterized gradient estimators for Monte Carlo
objectives" (2019) for the DReG gradient of the IWAE objective.
"""

import contextlib
import math

import torch
import torch.nn.functional as F
from torch import nn

from .config import ALIASES
from .errors import UserError
from .layers import Dropout, Tanh

IMAGE_PIXELS = 28 * 28
LIKELIHOODS = ("bernoulli", "continuous_bernoulli")
LOG_2PI = math.log(2 * math.pi)
GRADIENTS = ("standard", "dreg")  # the estimators of the IWAE objective's gradient


class VAE(nn.Module):
    """The VAE: MLP encoder q(z|x) and decoder p(x|z), prior N(0, I); by default the old program's MLP.

    Every model offers encode(x, labels), decode(z, labels) and mean_image(logits), owns its loss
    (`loss`, and `forward` for the ELBO's terms), and records its constructor's arguments in
    `model_args`, from which a checkpoint rebuilds it; the training loop, the evaluation and the
    pictures use nothing else.
    """

    name = "vae"  # its key in MODELS, recorded in checkpoints
    conditional = False  # whether encoder and decoder see the label y

    def __init__(self, dim_z=4, n_hidden=500, dropout=0.1, likelihood="bernoulli", n_classes=10, n_layers=2,
                 activation="elu_tanh"):
        super().__init__()
        activation = ALIASES["activation"].get(activation, activation)
        if likelihood not in LIKELIHOODS:
            raise ValueError(f"likelihood must be one of {LIKELIHOODS}, not {likelihood!r}")
        if activation == "elu_tanh" and n_layers != 2:
            raise ValueError(f"the old program's MLP has two hidden layers, not {n_layers}; choose another activation")
        # nanoGPT's model_args: what a checkpoint records so that loading builds exactly this model
        self.model_args = dict(dim_z=dim_z, n_hidden=n_hidden, dropout=dropout, likelihood=likelihood,
                               n_classes=n_classes, n_layers=n_layers, activation=activation)
        self.dim_z, self.n_hidden, self.likelihood, self.n_classes = dim_z, n_hidden, likelihood, n_classes
        n_y = n_classes if self.conditional else 0  # one-hot label columns beside x and z
        if activation != "elu_tanh":  # the MLPs of Burda et al. and of most papers: one activation throughout
            self.encoder = mlp(IMAGE_PIXELS + n_y, n_hidden, n_layers, 2 * dim_z, activation, dropout)
            self.decoder = mlp(dim_z + n_y, n_hidden, n_layers, IMAGE_PIXELS, activation, dropout)
            return
        # q(z|x): 784 -> ELU -> tanh -> (mu, pre-std), as in the original TensorFlow VAE.
        self.encoder = nn.Sequential(
            nn.Linear(IMAGE_PIXELS + n_y, n_hidden), nn.ELU(), Dropout(dropout),
            nn.Linear(n_hidden, n_hidden), Tanh(), Dropout(dropout),
            nn.Linear(n_hidden, 2 * dim_z),
        )
        # p(x|z): z -> tanh -> ELU -> 784 logits of the pixel distribution.
        self.decoder = nn.Sequential(
            nn.Linear(dim_z + n_y, n_hidden), Tanh(), Dropout(dropout),
            nn.Linear(n_hidden, n_hidden), nn.ELU(), Dropout(dropout),
            nn.Linear(n_hidden, IMAGE_PIXELS),
        )

    @classmethod
    def from_config(cls, config):
        return cls(config.dim_z, config.n_hidden, config.dropout, config.likelihood, n_layers=config.n_layers,
                   activation=config.activation)

    def with_label(self, v, labels):
        """The input of a first layer: v itself here; [v, one-hot y] in a conditional model."""
        return v

    def encode(self, x, labels=None):
        """Mean and standard deviation of the Gaussian q(z|x) (q(z|x, y) in a conditional model)."""
        # Under autocast (--precision bf16) the layers give bfloat16; the Gaussian keeps x's dtype.
        mu, pre_std = self.encoder(self.with_label(x, labels)).to(x.dtype).chunk(2, dim=-1)
        # softplus keeps std positive (the program this replaces used the raw output,
        # which can go negative); the floor keeps log(std) finite.
        std = F.softplus(pre_std) + 1e-6
        return mu, std

    def decode(self, z, labels=None):
        """Logits of p(x|z) (p(x|z, y)), one per pixel."""
        return self.decoder(self.with_label(z, labels)).to(z.dtype)  # z's dtype under autocast too

    def mean_image(self, logits):
        """The expected pixel values under p(x|z): what the image grids show."""
        if self.likelihood == "bernoulli":
            return torch.sigmoid(logits)
        return continuous_bernoulli_mean(logits)

    def log_px_given_z(self, logits, x):
        """log p(x|z) summed over pixels, from logits (numerically stable)."""
        return log_likelihood(logits, x, self.likelihood)

    def forward(self, x, target=None, eps=None, labels=None):
        """Per-image ELBO terms for a batch: (elbo, reconstruction log-likelihood, kl).

        `x` is what the encoder sees; `target` is what the decoder must explain
        (the clean image when x is a noisy copy). Both are (batch, 784) in [0, 1].
        `eps` are the standard normal draws of the reparameterisation, if given;
        `labels` the class of each image, for a conditional model.
        """
        target = x if target is None else target
        mu, std = self.encode(x, labels)
        eps = torch.randn_like(std) if eps is None else eps
        z = mu + std * eps  # the reparameterisation trick
        reconstruction = self.log_px_given_z(self.decode(z, labels), target)
        kl = gaussian_kl(mu, std)
        return reconstruction - kl, reconstruction, kl

    def loss(self, x, target=None, labels=None, kl_weight=1.0, objective="elbo", k=1, gradient="standard"):
        """The loss a training step minimises on a batch, and the batch means the metrics report,
        detached (no host synchronisation): [-ELBO, reconstruction -log p(x|z), KL, loss].

        objective "elbo": the mean of KL_weight KL - log p(x|z), one z per image, the KL in closed
        form (beta-VAE; KL warm-up). "iwae": minus the k-sample importance-weighted bound,
        log (1/k) sum_i p(x|z_i) (p(z_i)/q(z_i|x))^kl_weight with z_i ~ q(z|x) (Burda et al.).
        The reported -ELBO is the true one, weight 1, whatever is minimised.

        gradient "dreg" (with "iwae" only): the same loss value, and its gradient by Tucker et al.'s
        doubly reparameterised estimator: the decoder's as usual, the encoder's through z alone
        (see dreg_surrogate).
        """
        target = x if target is None else target
        check_gradient(gradient, objective)
        if objective == "elbo":
            elbo, reconstruction, kl = self(x, target, labels=labels)
            loss = -(reconstruction - kl_weight * kl).mean()
        elif objective == "iwae":
            mu, std = self.encode(x, labels)
            eps = torch.randn((k, *mu.shape), device=mu.device, dtype=mu.dtype)
            z = mu + std * eps  # (k, batch, dim_z)
            log_px = self.log_px_given_z(self.decode(z, labels), target.expand(k, *target.shape))
            if gradient == "dreg":
                # log q(z|x) with its parameters held fixed: the encoder reaches the loss through z only
                mu_fixed, std_fixed = mu.detach(), std.detach()
                log_ratio = (0.5 * (((z - mu_fixed) / std_fixed).square() - z.square()) + std_fixed.log()).sum(-1)
                log_w = log_px + kl_weight * log_ratio
                bound = torch.logsumexp(log_w.detach(), dim=0) - math.log(k)
                loss = dreg_surrogate(log_w, bound, [z], kl_weight)
            else:
                # log p(z) - log q(z|x); the 2 pi terms cancel
                log_ratio = (0.5 * (eps.square() - z.square()) + std.log()).sum(-1)
                bound = torch.logsumexp(log_px + kl_weight * log_ratio, dim=0) - math.log(k)
                loss = -bound.mean()
            reconstruction, kl = log_px.mean(0), gaussian_kl(mu, std)
            elbo = reconstruction - kl
        else:
            raise ValueError(f"objective must be elbo or iwae, not {objective!r}")
        return loss, torch.stack([-elbo.mean(), -reconstruction.mean(), kl.mean(), loss]).detach()


class ConditionalVAE(VAE):
    """The conditional VAE (Kingma et al. 2014's M2 with the label observed; Sohn et al. 2015):
    q(z|x, y) and p(x|z, y) see the one-hot label beside x and z; the prior stays N(0, I).
    The same MLPs with n_classes more input columns in each first layer."""

    name = "cvae"
    conditional = True

    def with_label(self, v, labels):
        if labels is None:
            raise ValueError("a conditional model needs the labels of its inputs")
        y = F.one_hot(labels, self.n_classes).to(v.dtype)
        return torch.cat([v, y.expand(*v.shape[:-1], self.n_classes)], dim=-1)


# tanh and dropout as the fused step computes them (kernels.py: tanh through the sigmoid, dropout's
# SplitMix64 bits), so that the fused and the autograd step train these MLPs alike.
ACTIVATIONS = {"tanh": Tanh, "relu": nn.ReLU, "elu": nn.ELU}


def mlp(n_in, n_hidden, n_layers, n_out, activation, dropout):
    """n_in -> n_layers hidden layers of n_hidden units, each with the activation (and dropout) -> n_out."""
    layers = []
    for n in [n_in] + [n_hidden] * (n_layers - 1):
        layers += [nn.Linear(n, n_hidden), ACTIVATIONS[activation]()] + ([Dropout(dropout)] if dropout else [])
    return nn.Sequential(*layers, nn.Linear(n_hidden, n_out))


class TwoLayerVAE(nn.Module):
    """Burda et al.'s model with two stochastic layers: x -> z1 -> z2 in the encoder, z2 -> z1 -> x in the decoder.

    q(z1|x) q(z2|z1), both Gaussian; p(z2) = N(0, I), p(z1|z2) Gaussian, p(x|z1) Bernoulli (or continuous
    Bernoulli). Each of the four is an MLP of n_layers hidden layers: n_hidden units between x and z1,
    n_hidden2 between z1 and z2. Burda et al.'s is dim_z 50, dim_z1 100, n_hidden 200, n_hidden2 100,
    two tanh layers each, no dropout: what from_config builds from --dim_z 50 --n_hidden 200 --activation tanh
    --dropout 0.

    The seam's single z is z2, the top layer, whose prior is N(0, I): encode(x) gives q(z2|x) reached
    through the mean of q(z1|x), decode(z2) the logits of p(x|z1) at the mean of p(z1|z2). The ELBO's KL
    column is log q(z1, z2|x) - log p(z1, z2) at the sampled z, a one-sample estimate (no closed form).
    """

    name = "vae2"
    conditional = False
    stochastic_layers = 2  # the commands that assume one z (the explore page) look at this

    def __init__(self, dim_z=50, dim_z1=100, n_hidden=200, n_hidden2=100, n_layers=2, activation="tanh",
                 dropout=0.0, likelihood="bernoulli"):
        super().__init__()
        if likelihood not in LIKELIHOODS:
            raise ValueError(f"likelihood must be one of {LIKELIHOODS}, not {likelihood!r}")
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {tuple(ACTIVATIONS)}, not {activation!r}")
        self.model_args = dict(dim_z=dim_z, dim_z1=dim_z1, n_hidden=n_hidden, n_hidden2=n_hidden2,
                               n_layers=n_layers, activation=activation, dropout=dropout, likelihood=likelihood)
        self.dim_z, self.dim_z1, self.likelihood = dim_z, dim_z1, likelihood
        self.dim_eps = dim_z1 + dim_z  # the standard normal draws of one sample of the chain (z1, then z2)
        self.q_z1 = mlp(IMAGE_PIXELS, n_hidden, n_layers, 2 * dim_z1, activation, dropout)  # q(z1|x)
        self.q_z2 = mlp(dim_z1, n_hidden2, n_layers, 2 * dim_z, activation, dropout)  # q(z2|z1)
        self.p_z1 = mlp(dim_z, n_hidden2, n_layers, 2 * dim_z1, activation, dropout)  # p(z1|z2)
        self.p_x = mlp(dim_z1, n_hidden, n_layers, IMAGE_PIXELS, activation, dropout)  # p(x|z1)

    @classmethod
    def from_config(cls, config):
        """--dim_z is z2's size and z1 has twice it; --n_hidden units between x and z1, half as many between
        z1 and z2; --n_layers and --activation for all four MLPs, where elu_tanh (the default, the one-layer
        old program's mix) means tanh, Burda et al.'s."""
        activation = "tanh" if config.activation == "elu_tanh" else config.activation
        return cls(config.dim_z, 2 * config.dim_z, config.n_hidden, max(1, config.n_hidden // 2), config.n_layers,
                   activation, config.dropout, config.likelihood)

    def encode(self, x, labels=None):
        """Mean and standard deviation of q(z2|z1) at z1 = the mean of q(z1|x): where the image lies in z2."""
        mu1, _ = gaussian(self.q_z1(x).to(x.dtype))
        return gaussian(self.q_z2(mu1).to(x.dtype))

    def decode(self, z, labels=None):
        """Logits of p(x|z1) at z1 = the mean of p(z1|z2), for z2 = z."""
        mu1, _ = gaussian(self.p_z1(z).to(z.dtype))
        return self.p_x(mu1).to(z.dtype)

    def mean_image(self, logits):
        """The expected pixel values under p(x|z1)."""
        return torch.sigmoid(logits) if self.likelihood == "bernoulli" else continuous_bernoulli_mean(logits)

    def chain(self, mu1, std1, eps):
        """One draw of the whole chain per row of `eps` (..., dim_z1 + dim_z), given q(z1|x)'s mu1, std1
        (broadcast against it): z1 ~ q(z1|x), z2 ~ q(z2|z1) by reparameterisation, and
        log p(z1, z2) - log q(z1, z2|x) of each draw (the 2 pi terms cancel)."""
        eps1, eps2 = eps.split([self.dim_z1, self.dim_z], dim=-1)
        z1 = mu1 + std1 * eps1
        mu2, std2 = gaussian(self.q_z2(z1).to(z1.dtype))
        z2 = mu2 + std2 * eps2
        log_q = -(0.5 * eps1.square() + std1.log()).sum(-1) - (0.5 * eps2.square() + std2.log()).sum(-1)
        return z1, z2, self.log_prior(z1, z2) - log_q

    def log_prior(self, z1, z2):
        """log p(z2) + log p(z1|z2), without the 2 pi terms."""
        prior_mu1, prior_std1 = gaussian(self.p_z1(z2).to(z2.dtype))
        return (-0.5 * z2.square()).sum(-1) - (0.5 * ((z1 - prior_mu1) / prior_std1).square()
                                               + prior_std1.log()).sum(-1)

    def forward(self, x, target=None, eps=None, labels=None):
        """Per-image (elbo, reconstruction log p(x|z1), kl) from one draw of the chain; `eps` (batch,
        dim_z1 + dim_z) are its standard normal draws (z1's, then z2's). The kl is the one-sample estimate
        log q(z1, z2|x) - log p(z1, z2), not a closed form: it varies with the draw and can be negative."""
        target = x if target is None else target
        mu1, std1 = gaussian(self.q_z1(x).to(x.dtype))
        eps = torch.randn((len(x), self.dim_eps), device=x.device, dtype=x.dtype) if eps is None else eps
        z1, _, log_ratio = self.chain(mu1, std1, eps)
        reconstruction = log_likelihood(self.p_x(z1).to(x.dtype), target, self.likelihood)
        kl = -log_ratio
        return reconstruction - kl, reconstruction, kl

    def loss(self, x, target=None, labels=None, kl_weight=1.0, objective="elbo", k=1, gradient="standard"):
        """As VAE.loss: [-ELBO, reconstruction, KL, loss] and the loss of the ELBO (one draw of the chain
        per image, the KL sampled) or of the IWAE bound (k draws of the whole chain per image), with the
        standard gradient or DReG's."""
        target = x if target is None else target
        check_gradient(gradient, objective)
        if objective == "elbo":
            elbo, reconstruction, kl = self(x, target)
            loss = -(reconstruction - kl_weight * kl).mean()
        elif objective == "iwae":
            mu1, std1 = gaussian(self.q_z1(x).to(x.dtype))
            eps = torch.randn((k, len(x), self.dim_eps), device=x.device, dtype=x.dtype)
            if gradient == "dreg":
                log_px, log_ratio, latents = self._dreg_terms(mu1, std1, eps, target)
                log_w = log_px + kl_weight * log_ratio
                bound = torch.logsumexp(log_w.detach(), dim=0) - math.log(k)
                loss = dreg_surrogate(log_w, bound, latents, kl_weight)
            else:
                z1, _, log_ratio = self.chain(mu1, std1, eps)  # (k, batch, .)
                log_px = log_likelihood(self.p_x(z1).to(x.dtype), target.expand(k, *target.shape), self.likelihood)
                bound = torch.logsumexp(log_px + kl_weight * log_ratio, dim=0) - math.log(k)
                loss = -bound.mean()
            reconstruction, kl = log_px.mean(0), -log_ratio.mean(0)
            elbo = reconstruction - kl
        else:
            raise ValueError(f"objective must be elbo or iwae, not {objective!r}")
        return loss, torch.stack([-elbo.mean(), -reconstruction.mean(), kl.mean(), loss]).detach()

    def _dreg_terms(self, mu1, std1, eps, target):
        """(log p(x|z1), log p(z1, z2) - log q(z1, z2|x), the latents to hook) for DReG, with the encoder's
        parameters held fixed in log q, so that the encoder reaches the log weights only through the
        reparameterised z1 and z2. Without dropout only: q(z2|z1) is evaluated twice."""
        eps1, eps2 = eps.split([self.dim_z1, self.dim_z], dim=-1)
        z1 = mu1 + std1 * eps1
        mu2, std2 = gaussian(self.q_z2(z1).to(z1.dtype))
        z2 = mu2 + std2 * eps2
        # z1 as log w sees it: a copy, so that the gradient reaching z2 (and from there z1) is weighted once
        z1_seen = z1.clone()
        fixed = {name: value.detach() for name, value in self.q_z2.named_parameters()}
        mu2_fixed, std2_fixed = gaussian(torch.func.functional_call(self.q_z2, fixed, (z1_seen,)).to(z1.dtype))
        log_q = (-(0.5 * ((z1_seen - mu1.detach()) / std1.detach()).square() + std1.detach().log()).sum(-1)
                 - (0.5 * ((z2 - mu2_fixed) / std2_fixed).square() + std2_fixed.log()).sum(-1))
        log_px = log_likelihood(self.p_x(z1_seen).to(z1.dtype), target.expand(len(eps), *target.shape),
                                self.likelihood)
        return log_px, self.log_prior(z1_seen, z2) - log_q, [z1_seen, z2]

    @torch.no_grad()
    def log_importance_weights(self, x, n, labels=None, generator=None):
        """log p(x, z1, z2) - log q(z1, z2|x) for n draws of the whole chain per image: (batch, n); what
        importance_weighted_log_likelihood sums. Call in eval mode (no dropout)."""
        mu1, std1 = gaussian(self.q_z1(x).to(x.dtype))
        eps = torch.randn((len(x), n, self.dim_eps), device=x.device, dtype=x.dtype, generator=generator)
        z1, _, log_ratio = self.chain(mu1[:, None], std1[:, None], eps)  # (batch, n, .)
        return log_likelihood_of_draws(self.p_x(z1).to(x.dtype), x, self.likelihood) + log_ratio


# Every model by the name a checkpoint records. Adding a model is a class and its entry here, made by
# register() (also from outside the package); --model NAME (Python: model="NAME") then trains it.
MODELS = {"vae": VAE, "cvae": ConditionalVAE, "vae2": TwoLayerVAE}


def register(cls):
    """Add a model class to MODELS under its `name`; returns the class, so it serves as a decorator.

    The class needs what VAE offers: `name`, `conditional`, `from_config(config)`, `model_args`,
    `encode`, `decode`, `mean_image`, `forward`, `loss`, and `dim_z` and `likelihood` attributes."""
    MODELS[cls.name] = cls
    return cls


def model_name(config):
    """The MODELS key of the model `config` trains: --model, else vae, or cvae with --conditional."""
    return config.model or ("cvae" if config.conditional else "vae")


def model_class(name):
    if name not in MODELS:
        raise UserError(f"--model {name}: no such model; the models are {', '.join(MODELS)} (a class of your own "
                        f"joins them through mnist_vae.model.register)")
    return MODELS[name]


def build(config):
    """A fresh model as `config` says."""
    cls = model_class(model_name(config))
    if config.conditional and not cls.conditional:
        raise UserError(f"--model {config.model} is not a conditional model; drop --conditional, or drop --model "
                        f"(--conditional alone trains the conditional VAE, cvae)")
    return cls.from_config(config)


def loss_function(model, x, target=None):
    """-ELBO in nats per image (sum over pixels and latent dimensions, mean over the batch), and the
    batch means of [-ELBO, reconstruction -log p(x|z), KL], detached: the plain step the tests use."""
    loss, terms = model.loss(x, target)
    return loss, terms[:3]


def noise_size(model):
    """The standard normal draws per image one forward pass of `model` takes (its `eps`): dim_z, or
    `dim_eps` for a model with more than one stochastic layer."""
    return getattr(model, "dim_eps", model.dim_z)


def gaussian(params):
    """(mu, std) of a Gaussian from a layer's 2 d outputs: the first d are mu, softplus of the rest (and
    a floor that keeps log std finite) the standard deviation, as VAE.encode does."""
    mu, pre_std = params.chunk(2, dim=-1)
    return mu, F.softplus(pre_std) + 1e-6


def check_gradient(gradient, objective):
    if gradient not in GRADIENTS:
        raise ValueError(f"gradient must be one of {GRADIENTS}, not {gradient!r}")
    if gradient != "standard" and objective != "iwae":
        raise ValueError(f"the {gradient} gradient is one of the iwae objective, not of {objective!r}")


def dreg_surrogate(log_w, bound, latents, kl_weight=1.0):
    """A loss whose value is -bound.mean() and whose gradient is Tucker et al.'s doubly reparameterised
    estimator of the IWAE objective's: the decoder's as usual, the encoder's through the latents alone.

    log_w (k, batch): the log importance weights, computed with the encoder's distributions' parameters
    held fixed (detached) in log q, so that the encoder reaches log_w only through the reparameterised
    `latents` (each (k, batch, d)). The gradient of log (1/k) sum_i w_i is sum_i w~_i d log w_i, w~ the
    normalised weights; its score-function part, w~_i times the derivative of -log q(z_i|x) in the
    encoder's parameters at fixed z_i, is in expectation a path derivative (Tucker et al., eq. 5), which
    leaves the encoder the gradient sum_i w~_i^2 (d log w_i / dz_i)(dz_i / dphi). With the weight b of
    the KL (beta, warm-up) the weight is (1 - b) w~_i + b w~_i^2. Here the surrogate -sum_i w~_i log w_i
    gives the decoder sum_i w~_i d log w_i, and a hook on each latent multiplies the gradient reaching it
    by (1 - b + b w~_i), which makes the encoder's.
    """
    weights = torch.softmax(log_w.detach(), dim=0)  # w~_i, (k, batch)
    scale = (1 - kl_weight + kl_weight * weights)[..., None]
    for z in latents:
        if z.requires_grad:
            z.register_hook(lambda grad: grad * scale)
    surrogate = -(weights * log_w).sum(0).mean()
    return surrogate + (-bound.mean() - surrogate).detach()


def gaussian_kl(mu, std):
    """KL( N(mu, std^2) || N(0, I) ) in closed form, summed over latent dimensions."""
    return 0.5 * (mu.square() + std.square() - 1).sum(-1) - std.log().sum(-1)


def log_likelihood(logits, x, likelihood="bernoulli"):
    """log p(x|logits) summed over the last dimension."""
    # -BCE(logits, x) = x*logits - softplus(logits): exact for binary x, and the usual
    # cross-entropy (not a normalised density) for grey levels. Its gradient is
    # sigmoid(logits) - x, as the fused training step computes it.
    log_p = -F.binary_cross_entropy_with_logits(logits, x, reduction="none").sum(-1)
    if likelihood == "continuous_bernoulli":
        log_p = log_p + continuous_bernoulli_log_norm(logits).sum(-1)
    return log_p


def log_likelihood_of_draws(logits, x, likelihood="bernoulli"):
    """log_likelihood for many draws of z per image: logits (batch, n, pixels), x (batch, pixels).

    The same quantity written as x.l - sum softplus(l), with x.l one batched product: five
    times cheaper than the cross-entropy over the k x 784 logits per image of the estimate below.
    """
    log_p = torch.einsum("bnj,bj->bn", logits, x) - F.softplus(logits).sum(-1)
    if likelihood == "continuous_bernoulli":
        log_p = log_p + continuous_bernoulli_log_norm(logits).sum(-1)
    return log_p


def continuous_bernoulli_log_norm(logits):
    """log C(lambda) for lambda = sigmoid(logits); C = logits / tanh(logits / 2), C(0) = 2."""
    # Near 0 the ratio is 0/0; its Taylor series log 2 + l^2/12 is exact to O(l^4) there.
    small = logits.abs() < 1e-2
    safe = torch.where(small, torch.ones_like(logits), logits)
    exact = torch.log(safe / torch.tanh(safe / 2))
    return torch.where(small, math.log(2.0) + logits.square() / 12, exact)


def continuous_bernoulli_mean(logits):
    """E[x] under the continuous Bernoulli: lambda/(2 lambda - 1) + 1/(2 artanh(1 - 2 lambda))."""
    # In logits: 1/(1 - exp(-l)) - 1/l, which tends to 1/2 as l -> 0. Near 0 the two terms cancel,
    # so there it is its Taylor series, 1/2 + l/12 - l^3/720 + l^5/30240 - l^7/1209600 (error below
    # 3e-8 for |l| < 1). The closed form is used only where it loses nothing to cancellation, so that
    # a runtime with a less exact expm1 (ONNX has none: exp(x) - 1) computes the same pixels.
    small = logits.abs() < 1
    safe = torch.where(small, torch.ones_like(logits), logits)
    exact = -1 / torch.expm1(-safe) - 1 / safe
    square = logits.square()
    series = 0.5 + logits * (1 / 12 - square * (1 / 720 - square * (1 / 30240 - square / 1209600)))
    return torch.where(small, series, exact)


@torch.no_grad()
def importance_weighted_log_likelihood(model, x, k, max_rows=None, labels=None, generator=None, log_px_of_draws=None):
    """Per-image estimate of log p(x) with k importance samples from q(z|x) (of log p(x|y), with
    q(z|x, y) and p(x|z, y), given the `labels` of a conditional model).

    log (1/k) sum_i p(x, z_i) / q(z_i|x), computed with logsumexp. Samples are drawn
    in chunks so that at most `max_rows` decoder rows exist at once, whatever k is,
    and the chunks are combined with a running logsumexp. On the CPU 1024 rows keep a
    chunk's logits (3 MB) in cache, and chunks of 32768 rows ran twice as slow; a GPU
    wants large chunks (65536 rows, 200 MB of logits). Call in eval mode (no dropout).
    A model with a method `log_importance_weights(x, n, labels, generator)` (one of more than
    one z, such as TwoLayerVAE) gives each chunk's log weights, (batch, n), itself.
    `log_px_of_draws(z, x, labels)`, where given, computes log p(x|z) of the draws (batch, n) in place of
    the model's decoder and likelihood (the fast path's, fast/estimate.py).
    """
    if max_rows is None:
        max_rows = 1024 if x.device.type == "cpu" else 65536
    log_importance_weights = getattr(model, "log_importance_weights", None)
    if log_importance_weights is not None:  # a model of more than one z draws its whole chain itself
        per_chunk = max(1, min(k, max_rows // len(x)))
        total = torch.full((len(x),), -math.inf, device=x.device, dtype=x.dtype)
        for done in range(0, k, per_chunk):
            log_w = log_importance_weights(x, min(per_chunk, k - done), labels=labels, generator=generator)
            total = torch.logaddexp(total, torch.logsumexp(log_w, dim=1))
        return total - math.log(k)
    mu, std = model.encode(x, labels)
    batch, dim_z = mu.shape
    draw_labels = None if labels is None else labels[:, None]
    per_chunk = max(1, min(k, max_rows // batch))
    total = torch.full((batch,), -math.inf, device=x.device, dtype=x.dtype)
    for done in range(0, k, per_chunk):
        n = min(per_chunk, k - done)
        eps = torch.randn((batch, n, dim_z), device=x.device, dtype=x.dtype, generator=generator)
        z = mu[:, None] + std[:, None] * eps  # (batch, n, dim_z)
        log_q = (-0.5 * eps.square() - std[:, None].log() - 0.5 * LOG_2PI).sum(-1)
        log_prior = (-0.5 * z.square() - 0.5 * LOG_2PI).sum(-1)
        if log_px_of_draws is not None:
            log_px = log_px_of_draws(z, x, labels)
        else:
            log_px = log_likelihood_of_draws(model.decode(z, draw_labels), x, model.likelihood)
        log_w = log_px + log_prior - log_q  # (batch, n)
        total = torch.logaddexp(total, torch.logsumexp(log_w, dim=1))
    return total - math.log(k)


# ---------------------------------------------------------------- what a conditional model does

@contextlib.contextmanager
def evaluating(model):
    """Dropout off and no gradients inside; the model's mode as it was after."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield model
    finally:
        model.train(was_training)


def class_log_likelihoods(model, x, k=1, seed=0):
    """A bound on log p(x|y) for every class y: (batch, n_classes).

    k = 1: the ELBO, one z per image, the KL in closed form; k > 1: the k-sample importance-weighted
    bound, tighter. Every class sees the same standard normal draws, so their differences come from
    the model, not from the draws.
    """
    scores = []
    with evaluating(model):
        for y in range(model.n_classes):
            labels = torch.full((len(x),), y, dtype=torch.long, device=x.device)
            generator = torch.Generator(device=x.device).manual_seed(seed)
            if k == 1:
                eps = torch.randn((len(x), model.dim_z), generator=generator, device=x.device, dtype=x.dtype)
                scores.append(model(x, eps=eps, labels=labels)[0])
            else:
                scores.append(importance_weighted_log_likelihood(model, x, k, labels=labels, generator=generator))
    return torch.stack(scores, dim=1)


def classify(model, x, k=1, seed=0):
    """log p(y|x) for every class, (batch, n_classes): log p(x|y) + log p(y) normalised over y, with
    log p(x|y) bounded as in class_log_likelihoods and p(y) uniform (the classes are balanced)."""
    return torch.log_softmax(class_log_likelihoods(model, x, k, seed), dim=1)


def samples_by_class(model, z):
    """Mean images of p(x|z, y) for each class y and each z: (n_classes, len(z), 784); row y holds
    class y, and a column one z, so a column shows one style written as every class."""
    classes = torch.arange(model.n_classes, device=z.device)
    with evaluating(model):
        logits = model.decode(z.expand(model.n_classes, *z.shape), classes[:, None].expand(-1, len(z)))
        return model.mean_image(logits)


def analogies(model, x, labels):
    """Each image's style, the mean of q(z|x, y) under its label, decoded with every class
    (Kingma et al. 2014's analogies): (batch, n_classes, 784)."""
    with evaluating(model):
        mu, _ = model.encode(x, labels)
        classes = torch.arange(model.n_classes, device=x.device)
        logits = model.decode(mu[:, None].expand(-1, model.n_classes, -1), classes.expand(len(x), -1))
        return model.mean_image(logits)
