"""TFLite export with TensorFlow's converter, and flatbuffer inspection.

    data = export.fake_quant_to_tflite(rewritten.model, io_dtype="int8")
    export.write_atomic("model.tflite", data)
    print(export.inspect(data).summary())

`fake_quant_to_tflite` uses the converter's quantization-aware path: the
model's FakeQuant ops carry the ranges qtoolkit chose, so the converter does
not calibrate again; it turns each fake-quantized kernel into int8 weights
(per-channel scales where the fake quant is per-channel), biases into int32
and activations into int8 with exactly those ranges.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from typing import Callable, Iterable

import numpy as np
import tensorflow as tf

from qtoolkit import quantizers as q
from qtoolkit.errors import ExportError  # noqa: F401  (raised here; defined with the others)
from qtoolkit.inspection import Inspection, WeightInfo, inspect  # noqa: F401  (export's public names since 0.1)

IO_DTYPES = {"int8": tf.int8, "uint8": tf.uint8, "float32": tf.float32}
TFLITE_MAX_BYTES = 2 ** 31 - 1


def _converter_for(model) -> tf.lite.TFLiteConverter:
    return tf.lite.TFLiteConverter.from_keras_model(model)


def converter_from_function(model, specs=None) -> tf.lite.TFLiteConverter:
    """A converter for the model's inference function, with only its variables attached.

    `from_keras_model` first saves a Keras SavedModel, which traces every
    layer's call separately: on MobileNetV3Small's 400 layers that was 74 of
    the 78 s of conversion (profiled). Converting the one traced function,
    with a plain tf.Module holding the variables, gives the same flatbuffer
    contents (same ops, tensors and outputs; tested) four times faster.
    """
    specs = specs or [tf.TensorSpec(t.shape, t.dtype, name=t.name.split(":")[0]) for t in model.inputs]

    def call(*inputs):
        outputs = model(list(inputs) if len(inputs) > 1 else inputs[0], training=False)
        if isinstance(outputs, (list, tuple)) and len(outputs) > 1 and model.outputs:  # the signature carries the Keras names
            return dict(zip(output_names(model), outputs))
        return outputs

    function = tf.function(call, input_signature=specs).get_concrete_function()
    holder = tf.Module()
    holder.model_variables = list(model.variables)
    return tf.lite.TFLiteConverter.from_concrete_functions([function], holder)


def _convert(converter, model=None) -> bytes:
    """The converter's flatbuffer; with the Keras `model`, its inputs and outputs in the model's order."""
    import warnings

    try:
        with warnings.catch_warnings():
            # The fake-quant path has no input statistics by design: the input
            # quantizer carries the input range.
            warnings.filterwarnings("ignore", "Statistics for quantized inputs were expected")
            data = converter.convert()
            return data if model is None else in_keras_order(data, model)
    except Exception as e:  # noqa: BLE001  (the converter raises many types)
        import re

        found = re.search(r"error: ([^\n]+)", str(e))
        first = found.group(1) if found else (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise ExportError(f"the TFLite converter failed: {first}") from e


def fake_quant_to_tflite(model, io_dtype: str = "int8") -> bytes:
    """Converts a calibrated fake-quant Keras model to a fully-quantized flatbuffer.

    Args:
      model: the rewritten fake-quant tf_keras model.
      io_dtype: "int8" (default), "uint8" or "float32" model inputs/outputs.
    """
    if io_dtype not in IO_DTYPES:
        raise ValueError(f"io_dtype must be one of {', '.join(IO_DTYPES)}, got {io_dtype!r}")
    with _kernels_snapped(model), _activations_at_least_8_bits(model):
        converter = converter_from_function(model)
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
        converter.inference_input_type = IO_DTYPES[io_dtype]
        converter.inference_output_type = IO_DTYPES[io_dtype]
        data = _convert(converter, model)
    if _low_bit_weights(model):
        # The converter re-quantized the 4-bit-grid Dense kernels to 8 bits (scale max|w| / 127) and wrote the
        # conv kernels as INT4, which LiteRT rounds differently: all back to exact int8 containers on their
        # grid, so the file computes with the weights that were simulated or trained.
        from qtoolkit.int4 import regrid_int8_weights

        data, _ = regrid_int8_weights(data)
    return data


def _low_bit_weights(model) -> bool:
    from qtoolkit.rewrite.layers import FoldedConv

    return any(isinstance(layer, FoldedConv) and getattr(layer, "weight_quantizer", None) is not None
               and layer.weight_quantizer.bits < 8 for layer in model.layers)


def output_names(model) -> list:
    """The names of a model's outputs as the user's model has them (a rewritten model keeps the original's)."""
    return list(getattr(model, "_qtoolkit_output_names", None) or model.output_names)


def in_keras_order(data: bytes, model) -> bytes:
    """The flatbuffer with its inputs and outputs in the Keras model's order.

    The converter lists a multi-input/multi-output model's tensors in an order of its own (by signature
    name, or reversed: a two-head model's heads came out swapped), so a user indexing outputs by position
    would read the wrong head.  The signature maps each Keras name to its tensor; the subgraph's input and
    output lists (and the signature's) are put in the model's order.  Nothing else in the file changes; a
    model whose order already matches is returned as it was.
    """
    if not getattr(model, "inputs", None) or not getattr(model, "outputs", None):  # subclassed: no graph order
        return data
    input_names = [t.name.split(":")[0] for t in model.inputs]
    names = output_names(model)
    if len(input_names) < 2 and len(names) < 2:
        return data
    from tensorflow.lite.tools import flatbuffer_utils

    tree = flatbuffer_utils.convert_bytearray_to_object(bytearray(data))
    if not tree.signatureDefs:
        return data
    signature = tree.signatureDefs[0]
    graph = tree.subgraphs[signature.subgraphIndex]

    def ordered(maps, names):
        by_name = {m.name.decode() if isinstance(m.name, bytes) else m.name: m for m in maps}
        if set(by_name) != set(names):  # e.g. output_0, output_1: already positional
            by_name = {f"output_{i}": by_name.get(f"output_{i}") for i in range(len(names))}
            names = list(by_name)
            if None in by_name.values():
                return None
        return [by_name[n] for n in names]

    inputs, outputs = ordered(signature.inputs, input_names), ordered(signature.outputs, names)
    if inputs is None or outputs is None:
        return data
    new_inputs, new_outputs = [m.tensorIndex for m in inputs], [m.tensorIndex for m in outputs]
    if list(graph.inputs) == new_inputs and list(graph.outputs) == new_outputs:
        return data
    graph.inputs, graph.outputs = new_inputs, new_outputs
    signature.inputs, signature.outputs = inputs, outputs
    return bytes(flatbuffer_utils.convert_object_to_bytearray(tree))


@contextlib.contextmanager
def _activations_at_least_8_bits(model):
    """TFLite has no kernels for activations below 8 bits: each b-bit activation becomes an int8 tensor on
    the b-bit grid, clamped to its 2^b levels, so the file computes the b-bit model.

    A b-bit range [lo, hi] (nudged: scale s = (hi - lo) / (2^b - 1), zero on the grid) is exported with the
    same scale and zero point, so the producing kernel rounds to the same levels, placed in the int8 codes so
    that the kernels clamp to them where they can:
      * after a kernel with a fused ReLU / ReLU6 and lo = 0 (most CNN activations): the levels are the top
        2^b codes, [hi - 255 s, hi]: the kernel's ReLU clamps at code zero point, int8 saturation at hi;
        no op is added;
      * otherwise: [lo, lo + 255 s], lo at code -128, and a MINIMUM op with hi cuts the codes above the
        levels (`QuantizeActivation.clamp_max`); XNNPACK does not take int8 MINIMUM, so each one runs on
        LiteRT's own kernel, between delegate partitions.
    Ranges TFLite fixes (softmax, logistic, tanh outputs) keep their 8-bit parameters: their kernels
    require them.
    """
    from qtoolkit.rewrite.graph import inbound_layers
    from qtoolkit.rewrite.layers import QuantizeActivation

    changed = []
    low = [layer for layer in model.layers if isinstance(layer, QuantizeActivation) and layer.quantizer.bits < 8
           and layer.fixed_range is None]
    nonnegative = {layer.name for layer in model.layers if isinstance(layer, QuantizeActivation)
                   and float(layer.range["min"].numpy()) >= 0.0}  # their file tensors never go below 0
    for layer in low:
        bits = layer.quantizer.bits
        lo, hi = float(layer.range["min"].numpy()), float(layer.range["max"].numpy())
        codes = (1 << bits) - 1
        n_lo, n_hi, scale, _, _ = q.nudge(lo, hi, 1 if layer.quantizer.narrow_range else 0, codes)
        n_lo, n_hi, scale = float(n_lo), float(n_hi), float(scale)
        changed.append((layer, bits, lo, hi))
        layer.quantizer.bits = 8
        if n_lo == 0.0 and _clamps_at_zero(next(iter(inbound_layers(layer)), None), nonnegative):
            layer.range["min"].assign(n_hi - 255 * scale)
            layer.range["max"].assign(n_hi)
        else:
            layer.range["min"].assign(n_lo)
            layer.range["max"].assign(n_lo + 255 * scale)
            layer.clamp_max = n_hi
    try:
        yield
    finally:
        for layer, bits, lo, hi in changed:
            layer.quantizer.bits = bits
            layer.range["min"].assign(lo)
            layer.range["max"].assign(hi)
            layer.clamp_max = None


_SIGN_KEEPING = ("AveragePooling", "MaxPooling", "GlobalAveragePooling", "GlobalMaxPooling", "Reshape", "Flatten",
                 "Concatenate", "ZeroPadding")


def _clamps_at_zero(layer, nonnegative: set) -> bool:
    """True when `layer`'s int8 output cannot go below 0: a kernel with a fused ReLU / ReLU6 (TFLite clamps at
    the zero point), or pooling, reshaping, padding or concatenation of tensors that cannot either (quantized
    tensors whose range starts at 0 or above: `nonnegative`, by layer name)."""
    from qtoolkit.rewrite.graph import inbound_layers

    if layer is None:
        return False
    if layer.name in nonnegative:
        return True
    if getattr(layer, "activation", None) in ("relu", "relu6") or type(layer).__name__ == "ReLU" and \
            not getattr(layer, "negative_slope", 0) and not getattr(layer, "threshold", 0):
        return True
    if not type(layer).__name__.startswith(_SIGN_KEEPING):
        return False
    inbound = inbound_layers(layer)
    return bool(inbound) and all(_clamps_at_zero(i, nonnegative) for i in inbound)


@contextlib.contextmanager
def _kernels_snapped(model):
    """Per-channel kernels: quantized values in the variable, no FakeQuant op.

    The converter quantizes a constant Conv/Depthwise/FullyConnected kernel
    per output channel itself, symmetric with scale max|w|/127; a kernel
    already on qtoolkit's int8 grid comes out with the same codes and scales
    (tested), and the graph without 8-bit weight FakeQuant ops converts
    faster.  For Dense kernels it is required: TFLite stores FULLY_CONNECTED
    weights transposed and the converter cannot transpose a per-channel
    FakeQuant ("tfl.transpose op has mismatched quantized axes").  Conv
    kernels below 8 bits keep their FakeQuant, which the converter honours
    exactly (16 levels for 4 bits).
    """
    from qtoolkit.rewrite.layers import FoldedConv

    changed = []
    for layer in model.layers:
        wq = getattr(layer, "weight_quantizer", None)
        if isinstance(layer, FoldedConv) and wq is not None and wq.per_channel and (
                layer.kind == "dense" or wq.bits == 8):
            original = layer.kernel.numpy()
            layer.kernel.assign(layer.quantized_kernel().numpy())
            layer.snapped = True
            changed.append((layer, original))
    try:
        yield
    finally:
        for layer, original in changed:
            layer.kernel.assign(original)
            layer.snapped = False


def weight_only_tflite(model) -> bytes:
    """Dynamic-range model: int8 weights (per channel), float activations."""
    converter = _converter_for(model)
    converter.optimizations = [tf.lite.Optimize.DEFAULT]
    return _convert(converter, model)


def converter_ptq_tflite(model, representative: Callable[[], Iterable], int16x8: bool = False,
                         io_dtype: str = "int8") -> bytes:
    """The TFLite converter's own full-integer PTQ (it calibrates on `representative`).

    Used for the int16x8 scheme (the converter has no fake-quant path for
    16-bit activations), for models that are not tf_keras models, and as the
    baseline qtoolkit is compared with.
    """
    converter = model if hasattr(model, "convert") else _converter_for(model)  # a converter already
    converter.optimizations = [tf.lite.Optimize.DEFAULT]
    names = [t.name.split(":")[0] for t in (getattr(model, "inputs", None) or [])]
    if len(names) > 1:  # the converter orders inputs its own way: samples keyed by input name

        def keyed():
            for sample in representative():
                yield dict(zip(names, sample)) if isinstance(sample, (list, tuple)) else sample
        converter.representative_dataset = keyed
    else:
        converter.representative_dataset = representative
    if int16x8:
        converter.target_spec.supported_ops = [
            tf.lite.OpsSet.EXPERIMENTAL_TFLITE_BUILTINS_ACTIVATIONS_INT16_WEIGHTS_INT8]
        io = tf.int16 if io_dtype != "float32" else tf.float32
    else:
        converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8,
                                               tf.lite.OpsSet.TFLITE_BUILTINS]
        io = IO_DTYPES[io_dtype]
    converter.inference_input_type = converter.inference_output_type = io
    return _convert(converter, None if hasattr(model, "convert") else model)


def float_tflite(model) -> bytes:
    """The float32 TFLite model (the latency and accuracy reference), from the traced inference function.

    A Keras 3 model is converted through its tf_keras twin (`rewrite.keras3`): the traced function of a Keras 3
    model does not carry its variables this way (the file computes NaN).
    """
    from qtoolkit.rewrite import keras3

    if keras3.is_keras3(model):
        model = keras3.to_tf_keras(model)
    return _convert(converter_from_function(model), model)


def check_size_estimate(model, bytes_per_parameter: float = 1.0) -> int:
    """Fails before converting when the flatbuffer would exceed TFLite's 2 GB limit.

    Returns:
      The estimated size in bytes (parameters times bytes per parameter).

    Raises:
      ExportError: the estimate is over the limit.
    """
    params = int(sum(int(np.prod(w.shape)) for w in model.weights))
    estimate = int(params * bytes_per_parameter)
    if estimate > TFLITE_MAX_BYTES:
        raise ExportError(
            f"the model has {params:,} parameters: its TFLite flatbuffer would be about {estimate / 2**30:.1f} GiB, "
            f"over TFLite's 2 GiB flatbuffer limit; split the model into parts and convert each")
    return estimate


def check_writable(path: str) -> str:
    """Fails early (before any work) if `path` cannot be written; returns it absolute.

    Raises:
      ExportError: the path is a folder, its folder does not exist or is not writable.
    """
    path = os.path.abspath(path)
    folder = os.path.dirname(path)
    if os.path.isdir(path):
        raise ExportError(f"output {path} is a folder; give a file path such as {path}/model.tflite")
    if not os.path.isdir(folder):
        raise ExportError(f"output folder {folder} does not exist; create it first")
    # Try it: permission bits say nothing for root or read-only file systems.
    try:
        fd, probe = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".probe", dir=folder)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise ExportError(f"output folder {folder} is not writable ({e.strerror}); choose another --output "
                          "or fix its permissions") from None
    return path


def write_atomic(path: str, data: bytes) -> None:
    """Writes `data` to `path` through a temporary file in the same folder and a rename.

    Raises:
      ExportError: the folder does not exist, is not writable, the path is a
        folder, or the write fails (nothing is left behind).
    """
    path = check_writable(path)
    folder = os.path.dirname(path)
    if len(data) > TFLITE_MAX_BYTES:
        raise ExportError(f"the model is {len(data)} bytes, over the 2 GB flatbuffer limit")
    tmp = None
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=folder)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        tmp = None
    except OSError as e:
        raise ExportError(f"cannot write {path}: {e.strerror or e}; check the folder's permissions and free space") \
            from None
    finally:
        if tmp is not None and os.path.exists(tmp):
            os.unlink(tmp)


def float_tflite_saved_model(path: str) -> bytes:
    """The float32 TFLite model of a SavedModel (the reference when there is no Keras model)."""
    return _convert(tf.lite.TFLiteConverter.from_saved_model(path))
