"""The QAT layers in Keras 3: the same math as `qat_layers.py`, on Keras 3's Layer and variables.

    qat_model = qtoolkit.quantize_model(keras3_model, "int8")   # built from these layers
    qat_model.fit(...)                                           # Keras 3's compile/fit, optimizers, callbacks

Only what must differ between the Keras versions lives here: creating the
variables (Keras 3's `add_weight` and aggregation names), the training flag,
serialization, and the mapping back to the tf_keras layers that export reads
(`tf_keras_twin`). The batch-norm folding with correction, the EMA ranges and
the fake quant are `qat_layers.QATFoldedConvMath` / `QATActivationMath`, shared.
Fake quant is TensorFlow's own op (`quantizers.tf_fake_quant`), as in the
tf_keras layers: it is what the converter reads and TFLite runs, so training
sees the deployed rounding. (Keras 3's `keras.quantizers.fake_quant_with_min_max_vars`
re-implements it with backend-neutral ops; the TF op is used here so that the
simulation and the file cannot drift apart.)
"""

from __future__ import annotations

import keras
import numpy as np
import tensorflow as tf

from qtoolkit import quantizers as q
from qtoolkit.rewrite.layers import RangeQuantizer
from qtoolkit.rewrite.qat_layers import QATActivationMath, QATFoldedConv, QATFoldedConvMath, QATQuantizeActivation

_PACKAGE = "qtoolkit"


def _constant(value, dtype):
    def init(shape, dtype=dtype):
        return tf.fill(shape, tf.constant(value, dtype=dtype))
    return init


def _flag(layer, name, value):
    return layer.add_weight(shape=(), dtype="bool", initializer=_constant(bool(value), tf.bool), trainable=False,
                            name=name, aggregation="only_first_replica")


def _is_training(training) -> bool:
    if training is None:
        return False
    if not isinstance(training, (bool, int)):
        training = tf.get_static_value(training)
    return bool(training)


@keras.saving.register_keras_serializable(package=_PACKAGE)
class QATFoldedConv3(QATFoldedConvMath, keras.layers.Layer):
    """Keras 3 twin of `qat_layers.QATFoldedConv` (same arguments, same variables in the same order)."""

    # Keras 3's compile(jit_compile="auto") uses XLA only when every layer supports it. TensorFlow's fake-quant
    # ops round differently under XLA (tensorflow #117962, #119411): a QAT model compiled with XLA computes
    # up to a step away from the file. So "auto" leaves these models to TensorFlow's own kernels, as tf_keras
    # does; an explicit jit_compile=True still works, and the callback's val_int8_sim_gap shows the gap.
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.supports_jit = False  # Keras 3's Layer.__init__ sets it True

    def build(self, input_shape):
        self._build_weights()
        self.built = True

    def _weight(self, name, shape, initializer, trainable=True, first_replica=False):
        return self.add_weight(shape=shape, initializer=initializer, trainable=trainable, name=name,
                               aggregation="only_first_replica" if first_replica else "none")

    def _flag(self, name, value):
        return _flag(self, name, value)

    def _training(self, training) -> bool:
        return _is_training(training)

    def tf_keras_twin(self) -> QATFoldedConv:
        """The tf_keras layer export reads (weights copied by the caller, in the same order)."""
        config = self.get_config()
        config["dtype"] = self.dtype_policy.name  # Keras 3 serializes the policy object
        return QATFoldedConv.from_config(config)


@keras.saving.register_keras_serializable(package=_PACKAGE)
class QATQuantizeActivation3(QATActivationMath, keras.layers.Layer):
    """Keras 3 twin of `qat_layers.QATQuantizeActivation`: an EMA range of batch min/max, fake quant.

    Args:
      bits, symmetric, narrow_range: the activation quantizer.
      fixed_range: (min, max) for outputs whose range TFLite fixes (softmax, logistic, tanh); then no EMA.
      ema_decay: decay of the moving average.
      learned_range: the EMA range times learned factors.
    """

    def __init__(self, bits=8, symmetric=False, narrow_range=False, fixed_range=None, ema_decay=0.999,
                 learned_range=False, **kwargs):
        super().__init__(**kwargs)
        self.supports_jit = False  # see QATFoldedConv3
        self.bits, self.symmetric, self.narrow_range = int(bits), bool(symmetric), bool(narrow_range)
        self.fixed_range = tuple(fixed_range) if fixed_range is not None else None
        self.ema_decay = float(ema_decay)
        self.learned_range = bool(learned_range)

    def build(self, input_shape):
        lo, hi = self.fixed_range if self.fixed_range is not None else (-6.0, 6.0)
        self.range = {"min": self.add_weight(shape=(), initializer=_constant(lo, tf.float32), trainable=False,
                                             name="output_min", aggregation="only_first_replica"),
                      "max": self.add_weight(shape=(), initializer=_constant(hi, tf.float32), trainable=False,
                                             name="output_max", aggregation="only_first_replica")}
        self.initialized = _flag(self, "initialized", self.fixed_range is not None)
        self.quant_active = _flag(self, "quant_active", True)
        self.ranges_frozen = _flag(self, "ranges_frozen", self.fixed_range is not None)
        self._build_learned()
        self.built = True

    def _learned_weight(self, name, shape):
        return self.add_weight(shape=shape, initializer="zeros", trainable=True, name=name)

    def call(self, inputs, training=None):
        return self._qat_call(inputs, training)

    def compute_output_shape(self, input_shape):
        return input_shape

    def _qat_bits(self):
        return self.bits, self.narrow_range

    def _training(self, training) -> bool:
        return _is_training(training)

    def set_range(self, lo, hi) -> None:
        """Sets the range (made quantizable: includes 0, symmetric if asked)."""
        if self.fixed_range is not None:
            return
        lo, hi = q.sanitize_range(lo, hi, self.symmetric)
        self.range["min"].assign(float(np.asarray(lo)))
        self.range["max"].assign(float(np.asarray(hi)))
        self.initialized.assign(True)

    def get_range(self) -> tuple[float, float]:
        return float(self.range["min"].numpy()), float(self.range["max"].numpy())

    def get_config(self):
        return {**super().get_config(), "bits": self.bits, "symmetric": self.symmetric,
                "narrow_range": self.narrow_range, "fixed_range": self.fixed_range, "ema_decay": self.ema_decay,
                "learned_range": self.learned_range}

    @classmethod
    def from_tf_keras(cls, layer: QATQuantizeActivation) -> "QATQuantizeActivation3":
        quantizer = layer.quantizer
        return cls(quantizer.bits, quantizer.symmetric, quantizer.narrow_range, layer.fixed_range, layer.ema_decay,
                   layer.learned_range, name=layer.name)

    def tf_keras_twin(self) -> QATQuantizeActivation:
        """The tf_keras layer export reads (weights copied by the caller, in the same order)."""
        return QATQuantizeActivation(RangeQuantizer(self.bits, self.symmetric, self.narrow_range),
                                     self.fixed_range, self.ema_decay, self.learned_range, name=self.name)


# tf_keras QAT layer class -> the Keras 3 layer built from it (see keras3.from_tf_keras).
FROM_TF_KERAS = {
    QATFoldedConv: lambda layer: QATFoldedConv3.from_config(layer.get_config()),
    QATQuantizeActivation: QATQuantizeActivation3.from_tf_keras,
}
