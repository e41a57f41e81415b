"""Quantization-aware training: a trainable fake-quant model, and its export.

    import qtoolkit
    qat_model = qtoolkit.quantize_model(model, "int8")          # BN folded with correction, EMA ranges
    qat_model.compile(...); qat_model.fit(..., callbacks=[qtoolkit.callbacks.QuantizationCallback(...)])
    summary = qtoolkit.export_tflite(qat_model, "model_int8.tflite")

The QAT model places fake quant exactly where the PTQ rewriter does (and so
where TFLite quantizes); `export_tflite` turns it into the same inference
model PTQ produces (batch norm folded with the moving statistics, the
learned ranges) and converts it with the TFLite converter's fake-quant path:
no calibration data is needed.
"""

from __future__ import annotations

from typing import Any, Optional

import tf_keras as keras

from qtoolkit import export
from qtoolkit.rewrite import rewrite
from qtoolkit.rewrite.layers import FoldedConv, QuantizeActivation, RangeQuantizer
from qtoolkit.rewrite.qat_layers import QATFoldedConv, QATQuantizeActivation
from qtoolkit.schemes import QuantScheme, load as load_scheme


def quantize_model(model, scheme: Any = "int8", *, ema_decay: float = 0.999, calibration_data: Any = None,
                   num_calibration_samples: int = 256, strict: bool = False,
                   bn_correction: bool = True, weight_range: Optional[str] = None,
                   activation_range: Optional[str] = None) -> keras.Model:
    """A trainable model with fake quant on weights and activations (straight-through gradients).

    Args:
      model: a trained float model, Keras 3 or tf_keras (Functional or Sequential; nested models are
        inlined); never modified.
      scheme: preset name, YAML path or QuantScheme (its activation bits, weight bits and granularity, its
        `qat:` ranges). A scheme with post-training algorithms (`w4a8_adaround`, `int8_max_accuracy`: CLE,
        AdaRound, bias correction) runs them first, on `calibration_data`, and training starts from their
        weights and ranges: at step 0 the QAT model is that scheme's PTQ file.
      ema_decay: decay of the activation ranges' moving average of batch min/max.
      calibration_data: optional representative data to initialise the ranges
        (otherwise the first training batch initialises them).
      num_calibration_samples: samples used from `calibration_data`.
      strict: fail if a layer cannot be quantized.
      bn_correction: fold batch norm with the paper's correction (default);
        False folds naively with the batch sigma (for ablations only).
      weight_range, activation_range: override the scheme's `qat.weight_range` ("max", "mse", "learned") and
        `qat.activation_range` ("ema", "learned"); see schemes.QATOptions and docs/qat.md.

    Returns:
      A model of the same Keras version to compile and fit (Keras 3: its own compile/fit, optimizers,
      callbacks); save it with `model.save` and load it with `custom_objects=qtoolkit.custom_objects()`.
    """
    scheme = scheme if isinstance(scheme, QuantScheme) else load_scheme(scheme)
    overrides = {k: v for k, v in (("weight_range", weight_range), ("activation_range", activation_range))
                 if v is not None}
    if overrides:
        scheme = scheme.replace(qat=overrides)
    if scheme.activations is None:
        raise ValueError("quantize_model needs a scheme with activation quantization (not weight_only_int8)")
    from qtoolkit import loading
    from qtoolkit.rewrite import keras3

    if not loading.is_graph(model):  # a subclassed model: its call traced into a graph of its layers
        model = loading.trace(model)
    is_keras3 = keras3.is_keras3(model)
    if is_keras3:  # planned and built once, in tf_keras, from the model's twin; handed back as Keras 3 layers
        model = keras3.to_tf_keras(model)
    else:  # layers without a rewrite of their own are reused by the QAT model: train a copy, never the user's
        model = _copy(model)
    result = rewrite(model, scheme, strict=strict, qat=True, ema_decay=ema_decay)
    for layer in result.model.layers:
        if isinstance(layer, QATFoldedConv):
            layer.bn_correction = bn_correction
    if scheme.algorithms.enabled():  # weights and ranges from the scheme's post-training algorithms
        _start_from_algorithms(result.model, model, scheme, calibration_data, num_calibration_samples)
    elif calibration_data is not None:
        from qtoolkit import calibrate

        source, n, _ = _calibration_source(model, calibration_data, num_calibration_samples)
        # The scheme's range method (e.g. MSE), as PTQ would; the EMA of batch min/max takes over in training.
        calibrate.calibrate(result, source, n, scheme, progress=False)
    if is_keras3:
        from qtoolkit.rewrite import qat_layers3

        return keras3.from_tf_keras(result.model, qat_layers3.FROM_TF_KERAS)
    return result.model


def _start_from_algorithms(qat_model, model, scheme: QuantScheme, calibration_data, num_samples: int) -> None:
    """Starts the QAT model where the scheme's post-training quantization ends (e.g. `w4a8_adaround`: CLE, the
    ranges calibrated, then AdaRound's rounding): they run on qtoolkit's PTQ rewrite of `model` as in
    `qtoolkit.ptq`; each QAT conv gets the folded kernel and bias of its PTQ twin (same name), unfolded with its
    batch norm, and each activation quantizer its twin's range.  At step 0 the QAT model then computes what the
    PTQ file would (docs/qat.md)."""
    from qtoolkit import algorithms, calibrate
    from qtoolkit.errors import UsageError

    options = scheme.algorithms
    if calibration_data is None and algorithms.needs_data(options):
        raise UsageError(f"scheme {scheme.name!r} runs {', '.join(options.enabled())} before training, which needs "
                         "data: pass calibration_data= (a few hundred training samples)")
    ptq = rewrite(model, scheme)
    report = algorithms.before_calibration(ptq, options, model)
    if calibration_data is not None:
        source, n, specs = _calibration_source(model, calibration_data, num_samples)
        inputs = source.collect(n)  # held: AdaRound and empirical bias correction read them again
        calibrate.calibrate(ptq, calibrate.open_source(inputs, specs), len(inputs[0]), scheme, progress=False)
        algorithms.after_calibration(ptq, options, inputs, model, report, progress=False)
    twins = {layer.name: layer for layer in ptq.model.layers if isinstance(layer, (FoldedConv, QuantizeActivation))}
    for layer in qat_model.layers:
        twin = twins.get(layer.name)
        if isinstance(layer, QATFoldedConv) and isinstance(twin, FoldedConv) and \
                tuple(twin.kernel.shape) == tuple(layer.kernel.shape):
            layer.set_folded(twin.kernel.numpy(), twin.bias.numpy())
        elif isinstance(layer, QATQuantizeActivation) and isinstance(twin, QuantizeActivation) and \
                layer.fixed_range is None and calibration_data is not None:
            layer.set_range(*twin.get_range())


def _calibration_source(model, data, num_samples: int):
    """(source, samples used: at most `num_samples`, input specs) of calibration data for `model`'s inputs."""
    from qtoolkit import calibrate

    specs = [(t.name.split(":")[0], tuple(t.shape), t.dtype.as_numpy_dtype) for t in model.inputs]
    source = calibrate.open_source(data, specs)
    return source, min(num_samples, source.num_samples or num_samples), specs


def to_inference_model(qat_model) -> keras.Model:
    """The deployable fake-quant model of a QAT model: BN folded with the moving statistics, learned ranges."""
    def clone(layer):
        if isinstance(layer, QATFoldedConv):
            config = layer.get_config()
            conv_args = {} if layer.kind == "dense" else {
                "strides": layer.strides, "padding": layer.padding, "dilation_rate": layer.dilation_rate}
            quantizer = RangeQuantizer.from_config(config["weight_quantizer"]) if layer.weight_quantizer else None
            return FoldedConv(layer.kind, layer.kernel_shape, layer.units, layer.activation, quantizer,
                              name=layer.name, **conv_args)
        if isinstance(layer, QATQuantizeActivation):
            return QuantizeActivation(RangeQuantizer.from_config(layer.quantizer.get_config()),
                                      fixed_range=layer.fixed_range, name=layer.name)
        return layer.__class__.from_config(layer.get_config())

    model = keras.models.clone_model(qat_model, clone_function=clone)
    for src, dst in zip(qat_model.layers, model.layers):
        if isinstance(src, QATFoldedConv):
            kernel, bias = src.deployed()  # on the trained grid: calibrate_weights finds its range again
            dst.set_weights([kernel.numpy(), bias.numpy()] + [w.numpy() for w in dst.weights[2:]])
            dst.calibrate_weights()
            if src.weight_range == "learned" and src.weight_quantizer is not None:  # the grid's bound, not max |w|
                a = src.deployed_bound()
                dst.weight_quantizer.assign_range(dst.kernel_range, -a, a)
        elif isinstance(src, QATQuantizeActivation):
            lo, hi = src.deployed_range()
            dst.set_range(lo, hi)
        else:
            dst.set_weights(src.get_weights())
    return model


def _copy(model) -> keras.Model:
    """A copy of a tf_keras model with the same layer names and weights (clone_model + set_weights)."""
    try:
        clone = keras.models.clone_model(model)
        clone.set_weights(model.get_weights())
    except Exception as e:  # noqa: BLE001  (a custom layer without get_config raises many types)
        from qtoolkit.errors import UnsupportedModelError

        raise UnsupportedModelError(
            f"cannot copy {model.name!r} ({str(e).splitlines()[0][:200]}); quantization-aware training trains a "
            "copy so that your model stays as it is: give every custom layer a get_config()") from None
    return clone


def export_tflite(qat_model, path: Optional[str] = None, io_dtype: str = "int8", int4: bool = False):
    """Exports a QAT model to int8 TFLite (no calibration data needed).

    Args:
      qat_model: a model from `quantize_model` (trained or not).
      path: where to write the flatbuffer atomically, or None.
      io_dtype: "int8", "uint8" or "float32" inputs/outputs.
      int4: store the 4-bit weights of a 4-bit-weight scheme (w4a8) as packed
        INT4 tensors (`qtoolkit.int4.pack_int4_weights`; LiteRT runs them);
        raises int4.Int4Error when no weight is on a 4-bit grid.

    Returns:
      (flatbuffer bytes, export.Inspection).
    """
    if path:
        export.check_writable(path)
    from qtoolkit.rewrite import keras3

    qat_model = student_of(qat_model)
    if keras3.is_keras3(qat_model):  # a Keras 3 QAT model: its tf_keras twin (same variables) is exported
        qat_model = keras3.to_tf_keras(qat_model)
    inference = to_inference_model(qat_model)
    data = export.fake_quant_to_tflite(inference, io_dtype)
    if int4:
        from qtoolkit.int4 import pack_int4_weights

        data, _ = pack_int4_weights(data)
    if path:
        export.write_atomic(path, data)
    return data, export.inspect(data)


class Distiller(keras.Model):
    """Trains a tf_keras QAT model with distillation from the float model it was made from.

        qat_model = qtoolkit.quantize_model(model, "w4a8", weight_range="mse")
        trainer = qtoolkit.qat.Distiller(qat_model, model)          # model: the float teacher, never trained
        trainer.compile(keras.optimizers.Adam(1e-4), keras.losses.SparseCategoricalCrossentropy(from_logits=True))
        trainer.fit(x, y, callbacks=[QuantizationCallback(...)])     # the callback drives `qat_model`
        qtoolkit.export_tflite(qat_model, "model_int8.tflite")

    The loss is `alpha` * the compiled loss on the labels + (1 - alpha) * T² * KL(softmax(teacher / T) ||
    softmax(student / T)) (Hinton et al.), for one output of logits. The teacher runs in inference mode and
    is not tracked by the trainer (its weights are neither trained nor saved with it).

    Args:
      student: the QAT model (`quantize_model`'s tf_keras model); `trainer.student`.
      teacher: the float model (same inputs, logits out).
      alpha: weight of the labels' loss; 1.0 is plain QAT.
      temperature: T of the soft targets.
    """

    def __init__(self, student, teacher, alpha: float = 0.5, temperature: float = 2.0, **kwargs):
        from qtoolkit.rewrite import keras3

        if keras3.is_keras3(student):
            raise TypeError("Distiller trains tf_keras QAT models; a Keras 3 QAT model has no distiller yet")
        super().__init__(**kwargs)
        if not 0.0 <= alpha <= 1.0 or temperature <= 0:
            raise ValueError(f"alpha must be in [0, 1] and temperature > 0, got {alpha} and {temperature}")
        self.student, self.alpha, self.temperature = student, float(alpha), float(temperature)
        self._teacher = lambda x: teacher(x, training=False)  # a closure: not tracked, not trained

    def call(self, inputs, training=None):
        return self.student(inputs, training=training)

    def compute_loss(self, x=None, y=None, y_pred=None, sample_weight=None):
        import tensorflow as tf

        hard = super().compute_loss(x, y, y_pred, sample_weight)
        t = self.temperature
        soft = tf.stop_gradient(tf.nn.softmax(self._teacher(x) / t))
        kl = tf.reduce_mean(tf.reduce_sum(soft * (tf.math.log(soft + 1e-12) - tf.nn.log_softmax(y_pred / t)), -1))
        return self.alpha * hard + (1.0 - self.alpha) * t * t * kl


def student_of(model):
    """The QAT model a Distiller trains, or `model` itself."""
    return model.student if isinstance(model, Distiller) else model


def set_schedule(model, *, quant_active: Optional[bool] = None, bn_frozen: Optional[bool] = None,
                 ranges_frozen: Optional[bool] = None) -> None:
    """Switches the QAT schedule flags of every QAT layer of `model` (a Distiller's student's)."""
    for layer in student_of(model).layers:
        for name, value in (("quant_active", quant_active), ("bn_frozen", bn_frozen),
                            ("ranges_frozen", ranges_frozen)):
            var = getattr(layer, name, None)
            if value is not None and var is not None and not (
                    name == "ranges_frozen" and getattr(layer, "fixed_range", None) is not None):
                var.assign(value)


def is_chief(model=None) -> bool:
    """Whether this process writes files (the chief, or worker 0 when no chief is named).

    `model`'s distribution strategy (tf_keras or Keras 3), else the current one: under
    MultiWorkerMirroredStrategy only the chief answers True; on one machine (default strategy,
    MirroredStrategy, TPUStrategy) the one process does.

        qtoolkit.export_tflite(qat_model, "model_int8.tflite" if qtoolkit.qat.is_chief(qat_model) else None)
    """
    import tensorflow as tf

    strategy = getattr(model, "distribute_strategy", None) or tf.distribute.get_strategy()
    try:
        return bool(strategy.extended.should_checkpoint)
    except NotImplementedError:  # a strategy without the notion (its one process writes)
        return True


def custom_objects() -> dict:
    from qtoolkit.rewrite import custom_objects as _co

    return _co()
