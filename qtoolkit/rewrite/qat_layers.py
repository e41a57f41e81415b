"""Training-time layers for quantization-aware training (paper section 3).

    act = QATQuantizeActivation(RangeQuantizer(8), ema_decay=0.999)   # EMA ranges
    conv = QATFoldedConv(kind="conv2d", ..., bn=(gamma, beta, mean, var, eps, momentum))

`QATFoldedConv` is the paper's batch-norm folding for training (figure C.8):
during training, before the batch-norm freeze, it computes the batch
statistics with a float convolution, quantizes the weights folded with the
*moving* standard deviation, W·γ/σ (the weights that will be deployed), and
corrects the output by σ/σ_B (c = σ_B/σ in the paper) so that training sees
batch normalisation with batch statistics; after the freeze (and at
inference) it is exactly the deployed layer: conv(x, fq(W·γ/σ)) + β − γμ/σ.

Schedule switches are non-trainable variables that `QuantizationCallback`
assigns: `quant_active` (fake quant applied, after the quantization delay),
`bn_frozen`, `ranges_frozen`.
"""

from __future__ import annotations

import numpy as np
import tensorflow as tf
import tf_keras as keras

from qtoolkit import quantizers as q
from qtoolkit.schemes import QAT_WEIGHT_RANGES
from qtoolkit.rewrite.layers import FUSABLE_ACTIVATIONS, QuantizeActivation, RangeQuantizer, activate, conv_op


_FIRST = tf.VariableAggregation.ONLY_FIRST_REPLICA


def _flag(layer, name, value):
    return layer.add_weight(name, shape=(), dtype=tf.bool, trainable=False,
                            initializer=keras.initializers.Constant(value), aggregation=_FIRST)


class QATActivationMath:
    """The EMA range and fake quant of a QAT activation quantizer, shared by both Keras versions' layers.

    The layer mixing it in holds `range` ({"min", "max"} variables), the flags `initialized`, `quant_active`,
    `ranges_frozen`, `ema_decay`, and `_qat_bits()` / `_training(training)`.
    """

    def _qat_call(self, inputs, training):
        if self._training(training):
            self._update_range(inputs)
        lo, hi = self._current_range()
        bits, narrow_range = self._qat_bits()
        if self._learns_range():
            quantized = q.tf_learned_fake_quant(inputs, lo, hi, bits, narrow_range)
        else:
            quantized = q.tf_fake_quant(inputs, lo, hi, bits, narrow_range)
        on = tf.logical_and(tf.convert_to_tensor(self.quant_active), tf.convert_to_tensor(self.initialized))
        return tf.cond(on, lambda: quantized, lambda: tf.identity(inputs))

    def _learns_range(self) -> bool:
        return self.learned_range and self.fixed_range is None

    def _build_learned(self):
        """The learned factors' variable (log scale of min and max), created last, in both Keras versions."""
        if self._learns_range():
            self.range_log_scale = self._learned_weight("range_log_scale", (2,))

    def _current_range(self):
        """(min, max) used now: the EMA range, times the learned factors when the range is learned."""
        lo = tf.minimum(self.range["min"], 0.0)
        hi = tf.maximum(self.range["max"], lo + 1e-8)
        if self._learns_range():
            factor = tf.exp(LOG_SCALE_GAIN * self.range_log_scale)
            lo, hi = lo * factor[0], hi * factor[1]
            hi = tf.maximum(hi, lo + 1e-8)
        return lo, hi

    def deployed_range(self) -> tuple[float, float]:
        """The range export writes (the learned one when learned)."""
        if not self._learns_range():
            return self.get_range()
        lo, hi = self._current_range()
        return float(lo.numpy()), float(hi.numpy())

    def _update_range(self, inputs):
        x = tf.stop_gradient(inputs)
        bmin, bmax = tf.reduce_min(x), tf.reduce_max(x)
        # Synchronization points stay outside control flow (tf.distribute forbids them in a cond).
        replica = tf.distribute.get_replica_context()
        if replica is not None and replica.num_replicas_in_sync > 1:
            # The same ranges as one device on the global batch.
            bmin = tf.reduce_min(replica.all_gather(bmin[None], 0))
            bmax = tf.reduce_max(replica.all_gather(bmax[None], 0))

        # Variable writes, too, stay outside control flow (a mirrored variable's
        # write is a synchronization point): frozen ranges are written unchanged.
        d = self.ema_decay
        keep = tf.convert_to_tensor(self.ranges_frozen)
        initialized = tf.convert_to_tensor(self.initialized)
        lo, hi = tf.convert_to_tensor(self.range["min"]), tf.convert_to_tensor(self.range["max"])
        new_min = tf.where(initialized, d * lo + (1 - d) * bmin, bmin)
        new_max = tf.where(initialized, d * hi + (1 - d) * bmax, bmax)
        self.range["min"].assign(tf.where(keep, lo, new_min))
        self.range["max"].assign(tf.where(keep, hi, new_max))
        self.initialized.assign(tf.logical_or(tf.logical_and(keep, initialized), tf.logical_not(keep)))


class QATQuantizeActivation(QATActivationMath, QuantizeActivation):
    """Activation fake quant whose range is an EMA of batch min/max while training.

    Args:
      quantizer: RangeQuantizer (per-tensor).
      fixed_range: as QuantizeActivation (then no EMA).
      ema_decay: decay of the moving average.
      learned_range: the EMA range times learned factors (schemes.QATOptions.activation_range "learned").
    """

    def __init__(self, quantizer=None, fixed_range=None, ema_decay=0.999, learned_range=False, **kwargs):
        super().__init__(quantizer, fixed_range, **kwargs)
        self.ema_decay = float(ema_decay)
        self.learned_range = bool(learned_range)

    def build(self, input_shape):
        super().build(input_shape)
        self.initialized = _flag(self, "initialized", self.fixed_range is not None)
        self.quant_active = _flag(self, "quant_active", True)
        self.ranges_frozen = _flag(self, "ranges_frozen", self.fixed_range is not None)
        self._build_learned()

    def _learned_weight(self, name, shape):
        return self.add_weight(name, shape=shape, initializer="zeros", trainable=True)

    def set_range(self, lo, hi) -> None:
        super().set_range(lo, hi)
        if self.built:
            self.initialized.assign(True)

    def call(self, inputs, training=None):
        return self._qat_call(inputs, training)

    def _qat_bits(self):
        return self.quantizer.bits, self.quantizer.narrow_range

    def _training(self, training) -> bool:
        return _is_training(training)

    def get_config(self):
        return {**super().get_config(), "ema_decay": self.ema_decay, "learned_range": self.learned_range}


def _is_training(training) -> bool:
    """Keras passes a Python bool (or None: the learning phase) to layers of a functional model."""
    if training is None:
        training = keras.backend.learning_phase()
    if not isinstance(training, (bool, int)):
        training = tf.get_static_value(training)
    return bool(training)


# Learned ranges are base * exp(LOG_SCALE_GAIN * theta) with theta trainable, starting at 0. The gain sets
# how fast an optimizer moves them: Adam's steps are about its learning rate in theta whatever the gradient's
# size, so at 1e-4 a range can change by e^0.3 (35%) in 100 steps, where theta unscaled would move it 1%.
LOG_SCALE_GAIN = 30.0
WEIGHT_RATIOS = tuple(0.3 + 0.05 * i for i in range(15))  # fractions of max |w| tried by "mse" (0.3 ... 1.0)


def _mse_bound(flat, a, bits, narrow_range, axes):
    """Per channel (last axis; all of `flat` when `axes` is None) the bound r * a, r in WEIGHT_RATIOS, whose
    symmetric quantization of `flat` has the least squared error (ties: the larger r)."""
    top = float(2 ** (bits - 1) - 1) if narrow_range else float(2 ** (bits - 1)) - 0.5
    ratios = tf.constant(WEIGHT_RATIOS[::-1], tf.float32)
    w = tf.reshape(flat, (-1, flat.shape[-1] if axes is not None else 1))  # (K, C)
    bounds = ratios[:, None] * tf.reshape(a, (1, -1))  # (R, C)
    step = bounds[:, None, :] / top  # (R, 1, C)
    err = tf.reduce_sum(tf.square(tf.clip_by_value(tf.round(w[None] / step), -top, top) * step - w[None]), axis=1)
    best = tf.gather(tf.transpose(bounds), tf.argmin(err, axis=0), batch_dims=1)  # (C,)
    return tf.reshape(best, tf.shape(a))


class QATFoldedConvMath:
    """The training-time batch-norm folding of QATFoldedConv (see the module docstring), for either Keras.

    The layer mixing it in provides `_weight(name, shape, initializer, trainable, first_replica)`,
    `_flag(name, value)` and `_training(training)`; `_build_weights` creates the variables in one order,
    the same in both Keras versions (a Keras 3 QAT model's weights load into its tf_keras twin by order).
    """

    def __init__(self, kind, kernel_shape, units, activation="linear", weight_quantizer=None, has_bn=True,
                 epsilon=1e-3, momentum=0.99, strides=(1, 1), padding="valid", dilation_rate=(1, 1),
                 bn_correction=True, weight_range="max", **kwargs):
        super().__init__(**kwargs)
        self.bn_correction = bool(bn_correction)
        if weight_range not in QAT_WEIGHT_RANGES:  # schemes.QATOptions: "max", "mse" or "learned"
            raise ValueError(f"weight_range must be one of {QAT_WEIGHT_RANGES}, got {weight_range!r}")
        self.weight_range = weight_range
        if activation not in FUSABLE_ACTIVATIONS:
            raise ValueError(f"activation must be one of {FUSABLE_ACTIVATIONS}, got {activation!r}")
        if isinstance(weight_quantizer, dict):
            weight_quantizer = RangeQuantizer.from_config(weight_quantizer)
        self.kind, self.kernel_shape, self.units = kind, tuple(kernel_shape), int(units)
        self.activation, self.weight_quantizer, self.has_bn = activation, weight_quantizer, has_bn
        self.epsilon, self.momentum = float(epsilon), float(momentum)
        self.strides, self.padding, self.dilation_rate = tuple(strides), padding, tuple(dilation_rate)

    def _build_weights(self):
        self.kernel = self._weight("kernel", self.kernel_shape, "glorot_uniform")
        self.bias = self._weight("bias", (self.units,), "zeros")
        if self.has_bn:
            self.gamma = self._weight("gamma", (self.units,), "ones")
            self.beta = self._weight("beta", (self.units,), "zeros")
            # Synchronized across replicas (all-reduced batch statistics), written once.
            self.moving_mean = self._weight("moving_mean", (self.units,), "zeros", trainable=False,
                                            first_replica=True)
            self.moving_variance = self._weight("moving_variance", (self.units,), "ones", trainable=False,
                                                first_replica=True)
            self.bn_frozen = self._flag("bn_frozen", False)
        self.quant_active = self._flag("quant_active", True)
        if self.weight_range == "learned" and self.weight_quantizer is not None:
            shape = (self.units,) if self.weight_quantizer.per_channel else ()
            self.weight_log_scale = self._weight("weight_log_scale", shape, "zeros")

    # -- the pieces -----------------------------------------------------------------
    def _channel_scale(self, kernel, scale):
        if self.kind == "depthwise":
            return kernel * tf.reshape(scale, self.kernel_shape[2:])
        return kernel * scale

    def _op(self, x, kernel):
        return conv_op(self.kind, x, kernel, self.strides, self.padding, self.dilation_rate)

    def _quantize_kernel(self, kernel, always=False):
        """Per-channel (or per-tensor) symmetric fake quant of the current values.

        The range is max |w| (TFMOT's LastValue) or, with weight_range "mse", max |w| scaled per channel by
        the ratio of WEIGHT_RATIOS with the least squared rounding + clipping error (recomputed each step;
        no gradient flows into the range), or with "learned", max |w| times exp(LOG_SCALE_GAIN * theta) per
        channel, theta trained with learned-step-size gradients (`quantizers.tf_learned_fake_quant`).
        `always`: quantize whatever `quant_active` says (export).
        """
        wq = self.weight_quantizer
        if wq is None:
            return kernel
        flat = tf.reshape(kernel, (*self.kernel_shape[:2], self.units)) if self.kind == "depthwise" else kernel
        axes = list(range(flat.shape.rank - 1)) if wq.per_channel else None
        a = self._weight_bound(flat, axes)
        if self.weight_range == "learned":
            out = q.tf_learned_fake_quant(flat, -a, a, wq.bits, wq.narrow_range, per_channel=wq.per_channel)
        else:
            out = q.tf_fake_quant(flat, -a, a, wq.bits, wq.narrow_range, axis=-1 if wq.per_channel else None)
        out = tf.reshape(out, self.kernel_shape) if self.kind == "depthwise" else out
        if always:
            return out
        return tf.cond(tf.convert_to_tensor(self.quant_active), lambda: out, lambda: tf.identity(kernel))

    def _weight_bound(self, flat, axes):
        """The symmetric weight range's bound a (per channel): see `_quantize_kernel`."""
        wq = self.weight_quantizer
        a = tf.maximum(tf.reduce_max(tf.abs(flat), axis=axes), 1e-8)
        if self.weight_range == "mse":
            a = _mse_bound(tf.stop_gradient(flat), tf.stop_gradient(a), wq.bits, wq.narrow_range, axes)
        elif self.weight_range == "learned":
            a = tf.stop_gradient(a) * tf.exp(LOG_SCALE_GAIN * self.weight_log_scale)
        return a

    def deployed_bound(self):
        """The bound a of the deployed kernel's symmetric range [-a, a] (per channel), or None without one."""
        if self.weight_quantizer is None:
            return None
        kernel, _ = self.folded()
        flat = tf.reshape(kernel, (*self.kernel_shape[:2], self.units)) if self.kind == "depthwise" else kernel
        axes = list(range(flat.shape.rank - 1)) if self.weight_quantizer.per_channel else None
        return self._weight_bound(flat, axes).numpy()

    def deployed(self):
        """(kernel, bias) as exported: folded with the moving statistics, the kernel fake-quantized."""
        kernel, bias = self.folded()
        return self._quantize_kernel(kernel, always=True), bias

    def folded(self):
        """(kernel, bias) folded with the moving statistics: what is deployed."""
        if not self.has_bn:
            return self.kernel, self.bias
        sigma = tf.sqrt(self.moving_variance + self.epsilon)
        kernel = self._channel_scale(self.kernel, self.gamma / sigma)
        bias = self.beta + self.gamma * (self.bias - self.moving_mean) / sigma
        return kernel, bias

    def set_folded(self, kernel, bias) -> bool:
        """Sets the weights so that `folded()` is (kernel, bias) with the current batch-norm parameters (the
        inverse of the folding); False, leaving the layer as it is, where a channel's gamma is 0."""
        kernel, bias = np.asarray(kernel, np.float32), np.asarray(bias, np.float32)
        if not self.has_bn:
            self.kernel.assign(kernel)
            self.bias.assign(bias)
            return True
        sigma = np.sqrt(self.moving_variance.numpy() + self.epsilon)
        scale = self.gamma.numpy() / sigma
        if np.any(np.abs(scale) < 1e-12):
            return False
        self.kernel.assign(self._channel_scale(kernel, 1.0 / scale))
        self.bias.assign((bias - self.beta.numpy()) / scale + self.moving_mean.numpy())
        return True

    def call(self, inputs, training=None):
        def inference():
            kernel, bias = self.folded()
            return tf.nn.bias_add(self._op(inputs, self._quantize_kernel(kernel)), bias)

        if not self.has_bn or not self._training(training):
            y = inference()
        else:
            # Batch statistics from a float convolution (the paper's figure C.8),
            # synchronized across replicas outside any control flow.
            y_float = tf.nn.bias_add(self._op(inputs, self.kernel), self.bias)
            axes = list(range(y_float.shape.rank - 1))
            mean_b, var_b = tf.nn.moments(y_float, axes)
            replica = tf.distribute.get_replica_context()
            if replica is not None and replica.num_replicas_in_sync > 1:
                mean_sq = replica.all_reduce("mean", var_b + tf.square(mean_b))
                mean_b = replica.all_reduce("mean", mean_b)
                var_b = mean_sq - tf.square(mean_b)

            m = self.momentum  # as Keras' BatchNormalization: biased batch variance
            frozen = tf.convert_to_tensor(self.bn_frozen)
            # Written outside control flow (synchronization points under tf.distribute).
            self.moving_mean.assign(tf.where(frozen, self.moving_mean,
                                             m * self.moving_mean + (1 - m) * tf.stop_gradient(mean_b)))
            self.moving_variance.assign(tf.where(frozen, self.moving_variance,
                                                 m * self.moving_variance + (1 - m) * tf.stop_gradient(var_b)))

            def train():
                sigma = tf.sqrt(self.moving_variance + self.epsilon)
                sigma_b = tf.sqrt(var_b + self.epsilon)
                if not self.bn_correction:  # naive folding with the batch sigma (an ablation, not deployed as is)
                    kernel = self._quantize_kernel(self._channel_scale(self.kernel, self.gamma / sigma_b))
                    return self._op(inputs, kernel) + self.beta + self.gamma * (self.bias - mean_b) / sigma_b
                kernel = self._quantize_kernel(self._channel_scale(self.kernel, self.gamma / sigma))
                # Correction: undo the moving sigma, apply the batch one (c = sigma_B / sigma).
                y = self._op(inputs, kernel) * (sigma / sigma_b)
                return y + self.beta + self.gamma * (self.bias - mean_b) / sigma_b

            y = tf.cond(tf.convert_to_tensor(self.bn_frozen), inference, train)
        return activate(y, self.activation)

    def get_config(self):
        return {**super().get_config(), "kind": self.kind, "kernel_shape": self.kernel_shape, "units": self.units,
                "activation": self.activation,
                "weight_quantizer": None if self.weight_quantizer is None else self.weight_quantizer.get_config(),
                "has_bn": self.has_bn, "epsilon": self.epsilon, "momentum": self.momentum,
                "strides": self.strides, "padding": self.padding, "dilation_rate": self.dilation_rate,
                "bn_correction": self.bn_correction, "weight_range": self.weight_range}


class QATFoldedConv(QATFoldedConvMath, keras.layers.Layer):
    """Conv2D / DepthwiseConv2D / Dense with its batch norm folded for training.

    Args:
      kind: "conv2d", "depthwise" or "dense".
      kernel_shape: unfolded kernel shape; units: output channels.
      activation: "linear", "relu" or "relu6" (fused).
      weight_quantizer: RangeQuantizer for the folded kernel (symmetric).
      has_bn: whether a batch norm is folded in (else a plain bias).
      epsilon, momentum: the batch norm's.
      strides, padding, dilation_rate: conv arguments.
      bn_correction: train with the paper's correction (weights folded with the
        moving sigma, outputs rescaled by sigma/sigma_B); False folds naively
        with the batch sigma (the ablation of docs/paper_results.md).
      weight_range: "max" (max |w| per channel) or "mse" (see `_quantize_kernel`).
    """

    def build(self, input_shape):
        self._build_weights()
        super().build(input_shape)

    def _weight(self, name, shape, initializer, trainable=True, first_replica=False):
        return self.add_weight(name, shape=shape, initializer=initializer, trainable=trainable,
                               **({"aggregation": _FIRST} if first_replica else {}))

    def _flag(self, name, value):
        return _flag(self, name, value)

    def _training(self, training) -> bool:
        return _is_training(training)
