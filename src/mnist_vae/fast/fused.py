"""The training step with its backward pass written out by hand: the fast path of train.py.

Autograd records and replays some sixty small operations per step; on a 2-core CPU
that bookkeeping, not the arithmetic, is what made a plain PyTorch step twice the
cost of its matrix products. Here the gradient of the loss of model.VAE is derived
once on paper and computed directly, with the same random draws in the same order
as model.VAE.loss, so a test can check both give the same losses step by step.
It trains only what `unsupported` finds it computes: the MLPs model.VAE and
model.ConditionalVAE build from settings (the old program's, and any depth of ELU, ReLU or tanh,
with or without dropout; the conditional VAE has the one-hot label as more input columns of
both first layers), under the ELBO with any weight on its KL (beta, KL warm-up) or the
importance-weighted bound (its standard or DReG gradient), and either likelihood; every other
model goes through the autograd step (step.py). The elementwise work of each layer (bias, activation, dropout, and
the factor its backward pass needs) is one call into kernels.py, one loop in C where it is built,
with the layer's product where that goes through torch.mm in float32 (and going back, a layer's loop
with its input gradient), and at a small batch each pass through the encoder or the decoder is one
call (kernels.MLPInOneCall); so are the draws of z with the KL, the loss, the importance weights,
and the gradient back to [mu, s].

Notation, for a batch of B images; each hidden layer i of the encoder or the decoder is
  a_i = h_(i-1) W_i' + b_i     h_i = act_i(a_i) m_i     (m: dropout mask, 0 or 1/(1-p); act: elu, relu, tanh)
with h_0 = x in the encoder and z in the decoder; their last layers are
  [mu, s] = h W' + b           std = softplus(s) + 1e-6          z = mu + std eps
  logits = h W' + b
  loss = mean over the batch of  w KL(q(z|x) || N(0, I)) - log p(target | logits)     (w: kl_weight)
Going back through hidden layer i: d a_i = d h_i f_i with f_i = m_i act_i'(a_i), kept from the
forward pass; d h_(i-1) = d a_i W_i, d W_i = d a_i' h_(i-1), d b_i = d a_i summed over the rows.
A conditional model reads [x, y] for x and [z, y] for z in the first layers (y one-hot);
the gradient with respect to z is the first dim_z columns of that of [z, y].

The importance-weighted bound (Burda et al.) draws K z_k = mu + std eps_k per image and runs the
decoder on the K B rows: loss = -mean over the batch of log (1/K) sum_k exp(l_k), with
l_k = log p(target|z_k) + w (log p(z_k) - log q(z_k|x)). Its gradient weights draw k by the
normalised importance weight v_k = softmax over k of l_k:
  d logits_k = v_k (d -log p(target|z_k) / d logits_k) / B      d z_k = (the decoder's) + w v_k z_k / B
  d mu = sum_k d z_k      d std = sum_k d z_k eps_k - w / (B std)   (log q's -log std; the v_k sum to 1)
With Tucker et al.'s DReG gradient the decoder's gradients stay these; the encoder's come through z
alone, log q(z_k|x) differentiated in z with its parameters held, each draw weighted by
(1 - w + w v_k) once more (model.dreg_surrogate):
  d z_k = (1 - w + w v_k) ((the decoder's) + w v_k (z_k - eps_k / std) / B)      d std = sum_k d z_k eps_k
"""

import torch
from torch import nn

from .. import layers
from ..model import GRADIENTS, LIKELIHOODS, VAE, ConditionalVAE, continuous_bernoulli_log_norm
from . import kernels
from .products import Products, has_avx2, has_avx512

# The hidden layers' activations the step computes, by module type: ELU with alpha 1, ReLU, and tanh
# as layers.Tanh rounds it (PyTorch's nn.Tanh rounds otherwise, so a model with it goes to autograd).
ACTIVATIONS = {nn.ELU: "elu", nn.ReLU: "relu", layers.Tanh: "tanh"}
OBJECTIVES = ("elbo", "iwae")
# The most rows whose weight gradients go into Adam's update in AVX2's tiles (kernels.weight_grad_adam): up to the
# 100 rows of Burda et al.'s IWAE's decoder they took less time than the product and Adam, at the default batch
# of 128 no less (docs/speed.md, product routines).
NARROW_TILE_ROWS = 100


def mlp_layers(modules):
    """The layers of an MLP the step computes, [(linear, activation, dropout p)], the last with activation
    None: Linear, then activation and an optional layers.Dropout for each hidden layer, then a last
    Linear; or, where `modules` are not such an MLP, a string saying why."""
    modules, found, i = list(modules), [], 0
    while i < len(modules):
        linear = modules[i]
        if type(linear) is not nn.Linear:
            return (f"its module {i} is {_name(linear)}, where the fused step takes a Linear layer (or, after "
                    f"an activation, the old program's Dropout, layers.Dropout)")
        if linear.bias is None:
            return "it has a layer without a bias"
        if i == len(modules) - 1:
            return found + [(linear, None, 0.0)]
        activation = modules[i + 1]
        if type(activation) not in ACTIVATIONS:
            return (f"its module {i + 1} is {_name(activation)}, and the fused step computes nn.ELU, nn.ReLU and "
                    f"the old program's Tanh (layers.Tanh) only")
        if isinstance(activation, nn.ELU) and (activation.alpha != 1.0 or activation.inplace):
            return "its ELU is not elu with alpha 1"
        i += 2
        p = 0.0
        if i < len(modules) and type(modules[i]) is layers.Dropout:
            p = modules[i].p
            i += 1
        found.append((linear, ACTIVATIONS[type(activation)], p))
    return "it does not end with a Linear layer"


def _name(module):
    """PyTorch's layers as nn.Name, others by their class name: nn.Tanh is not layers.Tanh."""
    kind = type(module)
    return f"nn.{kind.__name__}" if kind.__module__.startswith("torch.nn") else kind.__name__


def unsupported(model, config):
    """Why the fused step would not compute what `model.loss` computes under `config`; None if it does.

    It looks at the model itself (its class, each module's type and settings, the parameters'
    dtype), so a model edited to use another activation or layer goes to the autograd step; and at
    the loss the config asks for.
    """
    reason = unsupported_model(model)
    if reason is not None:
        return reason
    if config.objective not in OBJECTIVES:
        return f"it computes the ELBO and the importance-weighted bound only, not {config.objective!r}"
    if config.gradient not in GRADIENTS:
        return f"it computes the standard and DReG gradients only, not --gradient {config.gradient}"
    if config.gradient != "standard" and config.objective != "iwae":
        return f"--gradient {config.gradient} is a gradient of the iwae objective, not of {config.objective!r}"
    return None


def unsupported_model(model):
    """Why the fast path cannot compute the encoder, the decoder and the likelihood of `model`; None if it can."""
    if type(model) not in (VAE, ConditionalVAE):  # a subclass may encode, decode or lose differently
        return f"it trains model.VAE and model.ConditionalVAE only, not {type(model).__name__}"
    n_y = model.n_classes if model.conditional else 0
    for part, n_in, n_out in (("encoder", 784 + n_y, 2 * model.dim_z), ("decoder", model.dim_z + n_y, 784)):
        mlp = mlp_layers(getattr(model, part))
        if isinstance(mlp, str):
            return f"the {part} is not an MLP it computes: {mlp}"
        shapes = [linear.weight.shape for linear, _, _ in mlp]
        if (shapes[0][1], shapes[-1][0]) != (n_in, n_out) or any(a[0] != b[1] for a, b in zip(shapes, shapes[1:])):
            return f"the {part}'s layers' shapes do not chain from {n_in} inputs to {n_out} outputs"
        if any(not 0 <= p < 1 for _, _, p in mlp):
            return f"the {part} has a dropout rate outside [0, 1)"
    if model.likelihood not in LIKELIHOODS:
        return f"it has no gradient for the likelihood {model.likelihood!r}"
    if any(p.dtype != torch.float32 for p in model.parameters()):
        return "its kernels are float32, and the model's parameters are not"
    return None


def supports(model, config):
    """Whether the fused step computes exactly what the model's own loss does under `config`."""
    return unsupported(model, config) is None


class FusedTrainStep:
    """Calls of this object take one optimizer step on a batch (images, targets, labels); they return
    the batch means of [-ELBO, reconstruction -log p(x|z), KL, loss] as one tensor, as model.VAE.loss,
    without synchronising. `loss_options` are model.VAE.loss's (kl_weight, objective, k, gradient), and
    kl_weight may change between calls (KL warm-up). `batch_size`, the training batch's, lets the
    product routine's rule see the size of the step's products. Use it only where `supports(model, config)`."""

    def __init__(self, model, optimizer, precision="fp32", batch_size=None, **loss_options):
        self.model, self.optimizer = model, optimizer
        self.loss_options = {"kl_weight": 1.0, "objective": "elbo", "k": 1, **loss_options}
        # Each MLP as [(index in self.layers, activation, dropout p)], its last layer's activation None.
        encoder, decoder = mlp_layers(model.encoder), mlp_layers(model.decoder)
        self.layers = [linear for linear, _, _ in encoder + decoder]
        # The parameters, looked up once: Adam and checkpoints change them in place, and nn.Module's
        # attribute lookup costs more than the arithmetic of a small layer's bias.
        self.weights = [layer.weight for layer in self.layers]
        self.biases = [layer.bias for layer in self.layers]
        self.weight_operands = [None] * len(self.layers)  # this step's, as the products take them
        # With --precision bf16, each weight's bfloat16 copy, which Adam's C loop writes as it updates the weight,
        # and the weight's version (torch's count of its in-place changes) it was made from: anything else that
        # changes the weight (torch's Adam, a checkpoint) counts a version, and the copy is made again.
        self.weight_copies, self.copy_versions = [None] * len(self.layers), [None] * len(self.layers)
        self.encoder = [(i, activation, p) for i, (_, activation, p) in enumerate(encoder)]
        self.decoder = [(len(encoder) + i, activation, p) for i, (_, activation, p) in enumerate(decoder)]
        # torch.mm, or oneDNN where the rule says for this size of step (batch_size None: any size); bfloat16
        # copies of the operands with --precision bf16
        k = self.loss_options["k"] if self.loss_options["objective"] == "iwae" else 1
        multiply_adds = None if batch_size is None else batch_size * sum(
            layer.in_features * layer.out_features * (1 if index < len(encoder) else k)
            for index, layer in enumerate(self.layers))
        self.products = Products(self.layers[0].weight.device, precision, multiply_adds=multiply_adds)
        self.n_classes = model.n_classes if model.conditional else 0
        # Through torch.mm in float32 on the CPU, a hidden layer's product and its activation are one call into C, and
        # so are a layer's backward loop and its input gradient (kernels.linear_activation, linear_backward): the
        # products by the sgemm that torch.mm calls, where it gives torch.mm's bits, without torch's dispatch.
        self.sgemm_in_c = (self.products.name == "torch.mm" and self.layers[0].weight.is_cpu
                           and kernels.sgemm_gives_torch_mm())
        group = optimizer.param_groups[0]
        self.weight_grad_adam_rows = 0  # the most rows (a batch or its k draws) whose weight gradients Adam takes in C
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
            # oneDNN gives its products as new tensors: their weight gradients go to Adam as they are,
            # where a copy into the buffer would move every weight's size once more a step.
            # So does the bfloat16 one, which Adam's C loop reads as it is.
            self.weight_grads_into_buffer = not (self.products.onednn or self.products.bf16)
            # A small batch's weight gradients go tile by tile into Adam's update (kernels.weight_grad_adam), in
            # the tiles that fit the CPU's vector registers: on AVX2 up to NARROW_TILE_ROWS rows (docs/speed.md).
            self.narrow_tiles = not has_avx512()
            if self.weight_grads_into_buffer and (has_avx512() or has_avx2()):
                self.weight_grad_adam_rows = NARROW_TILE_ROWS if self.narrow_tiles else kernels.WEIGHT_GRAD_ADAM_ROWS
            self.counts, self.steps = None, None  # Adam's step counts: one tensor and its 0-d views
        else:  # optimizer.step() after the backward pass, from the parameters' .grad
            for layer in self.layers:
                for parameter in (layer.weight, layer.bias):
                    if parameter.grad is None:
                        parameter.grad = torch.zeros_like(parameter)
            self.grads = [(layer.weight.grad, layer.bias.grad) for layer in self.layers]
        # Where a batch's weight gradients go into Adam's update in C, and its products through torch's sgemm, each
        # pass through an MLP is one call into C (kernels.MLPInOneCall), kept for each MLP and number of rows.
        self.in_one_call = self.adam_by_layer and self.weight_grad_adam_rows > 0 and not self.products.bf16
        self.plans = {}

    def _key(self, p):
        """The key of one layer's dropout mask, drawn where model.VAE.forward draws that mask's bits."""
        return None if p == 0 else layers.dropout_key()

    def __call__(self, x, target=None, labels=None):
        target = x if target is None else target
        if self.n_classes:
            x = kernels.with_labels(x, labels, self.n_classes)
        batch, dim_z = x.shape[0], self.model.dim_z
        kl_weight, objective = self.loss_options["kl_weight"], self.loss_options["objective"]
        if objective not in OBJECTIVES:
            raise ValueError(f"objective must be elbo or iwae, not {objective!r}")
        iwae = objective == "iwae"
        k = self.loss_options["k"] if iwae else 1

        with torch.no_grad():
            # Forward, keeping what the backward pass needs: each layer's input and each hidden
            # layer's factor f = m act'(a) that turns d(loss)/dh into d(loss)/da. Biases are added in the
            # kernels.
            encoder_inputs, encoder_factors, h = self._hidden_layers(self.encoder, x, keep_float=True)
            index = self.encoder[-1][0]
            W, b = self.weights[index], self.biases[index]
            W_operand = self._weight_operand(index)
            if self.products.onednn:
                gaussian = self.products.linear(encoder_inputs[-1], W_operand).add_(b)
            else:  # in float32, also with --precision bf16
                gaussian = torch.addmm(b, h, W.t())
            if not iwae:
                eps = torch.randn(batch, dim_z, device=x.device)
                z, std, kl = kernels.gaussian_sample(gaussian, eps, by_row=True)  # each image's KL
            else:  # K draws per image, row k B + i for image i, as model.VAE.loss lays them out
                eps = torch.randn(k * batch, dim_z, device=x.device)
                z, std, kl, log_ratio = kernels.gaussian_draws(gaussian, eps, k)  # log_ratio: log p(z) - log q(z|x)
            if self.n_classes:
                z = kernels.with_labels(z, labels, self.n_classes)
            decoder_inputs, decoder_factors, _ = self._hidden_layers(self.decoder, z)
            index = self.decoder[-1][0]
            b = self.biases[index]
            logits = self.products.linear(decoder_inputs[-1], self._weight_operand(index)).float()

            # log p = target logits - softplus(logits), as model.log_likelihood; and
            # d(loss)/d(logits) = (sigmoid(logits) - target) / B for the Bernoulli part; row k B + i is
            # draw k of image i.
            reconstruction, d_logits = kernels.bernoulli_loss(logits, b, target, 1 / batch, by_row=True)
            if self.model.likelihood == "continuous_bernoulli":
                logits.add_(b)
                log_norm = continuous_bernoulli_log_norm(logits)
                reconstruction = reconstruction + log_norm.sum(dim=1)
                d_logits.sub_(_continuous_bernoulli_log_norm_grad(logits).div_(batch))
            if not iwae:  # reconstruction and kl: each image's
                terms = kernels.elbo_terms(reconstruction, kl, kl_weight)
            else:  # v_k, the normalised importance weights, and each image's bound
                weights, log_mean_w = kernels.importance_weights(reconstruction, log_ratio, kl_weight, k)
                loss = -log_mean_w.mean()
                d_logits.mul_(weights.view(k * batch, 1))
                reconstruction, kl = reconstruction.mean(), kl / batch
                terms = torch.stack([kl - reconstruction, -reconstruction, kl, loss])

            # Backward.
            if self.adam_by_layer:
                self._begin_adam_step()
            d_z = self._backward(self.decoder, d_logits, decoder_inputs, decoder_factors).float()
            if self.n_classes:
                d_z = d_z[:, :dim_z].contiguous()
            if not iwae:
                d_gaussian = kernels.gaussian_backward(gaussian, eps, std, d_z, kl_weight / batch)
            else:
                d_gaussian = kernels.importance_gaussian_backward(
                    gaussian, eps, std, z, d_z, weights, kl_weight, 1 / batch,
                    dreg=self.loss_options.get("gradient", "standard") == "dreg")
            self._backward(self.encoder, d_gaussian, encoder_inputs, encoder_factors, need_input_grad=False)

        if not self.adam_by_layer:
            self.optimizer.step()
        return terms  # [-ELBO, -log p(x|z), KL, loss], as model.VAE.loss

    def _in_one_call(self, mlp, rows):
        """The kernels.MLPInOneCall of `mlp` on batches of `rows` rows, where the step takes its passes in one call;
        else None."""
        if not (self.in_one_call and self.sgemm_in_c and rows <= self.weight_grad_adam_rows):
            return None
        key = (mlp[0][0], rows)
        if key not in self.plans:
            if len(self.plans) >= 8:  # batches of many sizes: keep the buffers of the latest few
                self.plans.clear()
            weights, biases = [self.weights[i] for i, _, _ in mlp], [self.biases[i] for i, _, _ in mlp]
            self.plans[key] = kernels.MLPInOneCall(
                weights, biases, [activation for _, activation, _ in mlp[:-1]], [p for _, _, p in mlp[:-1]], rows,
                need_input_grad=mlp is self.decoder) if kernels.MLPInOneCall.suits(weights, biases, rows) else None
        return self.plans[key]

    def _weight_operand(self, index):
        """Layer `index`'s weight as the products take it, kept for its input gradient in the backward pass,
        before Adam changes the weight (with bf16, Adam's C loop writes the next step's copy after that)."""
        weight = self.weights[index]
        if not self.products.bf16:
            self.weight_operands[index] = weight
        else:
            if self.weight_copies[index] is None or self.copy_versions[index] != weight._version:
                self.weight_copies[index], self.copy_versions[index] = weight.bfloat16(), weight._version
            self.weight_operands[index] = self.weight_copies[index]
        return self.weight_operands[index]

    def _hidden_layers(self, mlp, v, keep_float=False):
        """The hidden layers of `mlp` on v: the input of each of its layers as the products take it (the
        last's is the hidden layers' output), each hidden layer's factor, and their output itself.

        With --precision bf16 the activation loops read their products and write the next operand in
        bfloat16, used by the forward product and the weight gradient's; the output in float32 too only where
        `keep_float` (the encoder's, whose last layer multiplies in float32)."""
        keys = [self._key(p) for _, _, p in mlp[:-1]]
        plan = self._in_one_call(mlp, v.shape[0])
        if plan is not None and (done := plan.forward(v, keys)):
            for index, _, _ in mlp[:-1]:
                self._weight_operand(index)
            return done
        inputs, factors = [self.products.operand(v)], []
        for j, ((index, activation, p), key) in enumerate(zip(mlp[:-1], keys)):
            weight = self._weight_operand(index)
            done = self.sgemm_in_c and kernels.linear_activation(activation, inputs[-1], weight, self.biases[index],
                                                                 key, p)
            if done:
                v, factor = done
                h = v
            elif self.products.bf16:
                a = self.products.linear(inputs[-1], weight)
                h, factor, v = kernels.activation_bf16(activation, a, self.biases[index], key, p,
                                                       keep_float=keep_float and j == len(mlp) - 2)
            else:
                a = self.products.linear(inputs[-1], weight)
                v, factor = kernels.ACTIVATION_DROPOUT[activation](a, self.biases[index], key, p)
                h = v
            inputs.append(h)
            factors.append(factor)
        return inputs, factors, v

    def _backward(self, mlp, d_out, inputs, factors, need_input_grad=True):
        """Back through `mlp` from d(loss)/d(its output): every layer's gradients (and Adam's update);
        d(loss)/d(its input) where `need_input_grad`."""
        plan = self.plans.get((mlp[0][0], d_out.shape[0]))
        if plan is not None and inputs is plan.inputs and self.adam_in_c:
            indices = [index for index, _, _ in mlp]
            done = plan.backward(d_out, inputs[0], [self.grads[i][1] for i in indices],
                                 [self.adam_tensors[i][1] for i in indices], [self.adam_tensors[i][2] for i in indices],
                                 self.adam_scalars, self.narrow_tiles)
            if done is not False:
                return done
        last = len(mlp) - 1
        d = self._linear_backward(mlp[last][0], d_out, None, inputs[last], need_input_grad or last > 0)
        for j in reversed(range(last)):  # d(loss)/dh_j times the factor is d(loss)/da_j
            d = self._linear_backward(mlp[j][0], d, factors[j], inputs[j], need_input_grad or j > 0)
        return d

    def _linear_backward(self, index, d_out, factor, inputs, need_input_grad=True):
        """The gradients of layer `index`, y = inputs W' + b, from d(loss)/dy times `factor` (None: d(loss)/dy
        itself), and with adam_by_layer its Adam update (after W's last use in this step); return d(inputs)."""
        grad_weight, grad_bias = self.grads[index]
        weight, d_transposed, done = self.weight_operands[index], None, None
        if self.products.bf16:  # d_out in bfloat16 from the product before, or float32 from the loss
            d_operand = kernels.factor_bias_grad_bf16(d_out, factor, grad_bias)
        elif self.products.onednn:  # which reads the weight gradient's first operand, d', contiguous
            d_operand, d_transposed = kernels.factor_bias_grad(d_out, factor, grad_bias, transposed=True)
        elif self.sgemm_in_c and (done := kernels.linear_backward(d_out, factor, grad_bias, weight, need_input_grad)):
            d_operand, d_inputs = done
        else:
            d_operand = kernels.factor_bias_grad(d_out, factor, grad_bias)
        if not done:
            d_inputs = self.products.input_grad(d_operand, weight) if need_input_grad else None
        # The input gradient first: kernels.weight_grad_adam changes W as it sums W's gradient.
        if self.adam_by_layer and d_operand.shape[0] <= self.weight_grad_adam_rows and self.adam_in_c:
            parameters, exp_avgs, exp_avg_sqs, _ = self.adam_tensors[index]
            if kernels.weight_grad_adam(d_operand, inputs, parameters, grad_bias, exp_avgs, exp_avg_sqs,
                                        self.adam_scalars, narrow=self.narrow_tiles):
                return d_inputs
        into = grad_weight if not self.adam_by_layer or self.weight_grads_into_buffer else None
        grad_weight = self.products.weight_grad(d_operand, inputs, out=into, d_y_t=d_transposed)
        if self.adam_by_layer:
            self._adam(index, grad_weight, grad_bias)
        return d_inputs

    def adam_step(self):
        """Adam's update of every parameter from the gradients of the last step, as the step applies
        it (the benchmark times this alone)."""
        if not self.adam_by_layer:
            self.optimizer.step()
            return
        self._begin_adam_step()
        for index in range(len(self.layers)):
            self._adam(index, *self.grads[index])

    def _begin_adam_step(self):
        """Add 1 to every parameter's step count, first creating Adam's state as torch.optim.Adam would on
        its first step; read this step's options (the learning rate may change from step to step). Adam's
        state holds the counts as 0-d views of one tensor (self.counts), so that one add counts them all
        (torch's _foreach_add_ makes a call of each on the CPU); counts that are not, as a checkpoint loads
        them, are put there first, and each layer's tensors are gathered again for _adam."""
        state = self.optimizer.state
        parameters = self.optimizer.param_groups[0]["params"]
        if not state:
            for p in parameters:
                state[p] = {"step": torch.tensor(0.0, device=p.device),
                            "exp_avg": torch.zeros_like(p), "exp_avg_sq": torch.zeros_like(p)}
        if self.steps is None or any(state[p]["step"] is not view for p, view in zip(parameters, self.steps)):
            counts = torch.stack([state[p]["step"] for p in parameters])
            self.steps = list(counts)  # views of `counts`, in order
            for p, view in zip(parameters, self.steps):
                state[p]["step"] = view
            self.counts = counts
            # Each layer's tensors as _fused_adam_ and kernels.adam take them, gathered once for every step that
            # follows.
            self.adam_tensors = [
                ([w, b], [state[w]["exp_avg"], state[b]["exp_avg"]], [state[w]["exp_avg_sq"], state[b]["exp_avg_sq"]],
                 [state[w]["step"], state[b]["step"]]) for w, b in zip(self.weights, self.biases)]
            # kernels.adam takes one step count for all: the count every parameter has, as Adam's own steps
            # and checkpoints leave them.
            self.adam_c_ready = bool((counts == counts[0]).all()) and all(
                kernels.adam_suits(*parameters, *exp_avgs, *exp_avg_sqs)
                for parameters, exp_avgs, exp_avg_sqs, _ in self.adam_tensors)
            self.count = float(counts[0])
        group = self.optimizer.param_groups[0]
        beta1, beta2 = group["betas"]
        self.adam_options = dict(amsgrad=False, lr=group["lr"], beta1=beta1, beta2=beta2,
                                 weight_decay=group["weight_decay"], eps=group["eps"], maximize=False)
        self.counts.add_(1)
        self.count += 1
        options = (group["lr"], beta1, beta2, group["eps"], group["weight_decay"])
        self.adam_in_c = self.adam_c_ready and not any(torch.is_tensor(x) for x in options)
        if self.adam_in_c:  # this step's scalars, computed once for all its layers
            self.adam_scalars = kernels.adam_scalars(self.count, *options)

    def _adam(self, index, grad_weight, grad_bias):
        """torch.optim.Adam(fused=True).step() for the weight and bias of one layer, without its
        per-call Python bookkeeping (its tensors and options come from _begin_adam_step); in the C loop
        (kernels.adam) where it was built."""
        parameters, exp_avgs, exp_avg_sqs, steps = self.adam_tensors[index]
        if self.adam_in_c and kernels.adam(parameters, [grad_weight, grad_bias], exp_avgs, exp_avg_sqs,
                                           self.adam_scalars, weight_copy=self.weight_copies[index]):
            return
        torch._fused_adam_(parameters, [grad_weight.float(), grad_bias], exp_avgs, exp_avg_sqs, [], steps,
                           **self.adam_options)


def _continuous_bernoulli_log_norm_grad(logits):
    """d/dl log C(l) = 1/l - 1/sinh(l), which tends to l/6 near 0."""
    small = logits.abs() < 1e-2
    safe = torch.where(small, torch.ones_like(logits), logits)
    return torch.where(small, logits / 6, 1 / safe - 1 / torch.sinh(safe))
