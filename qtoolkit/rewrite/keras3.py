"""Keras 3 models on qtoolkit's path: read the Keras 3 graph, rebuild it with the same layers in tf_keras.

    from qtoolkit.rewrite import keras3
    if keras3.is_keras3(model):
        twin = keras3.to_tf_keras(model)   # a tf_keras functional model: same graph, layers, names, weights

The rewriter, the calibration pass and the converter's fake-quant path then
work on the twin exactly as on a model built with tf_keras, so a Keras 3
model and its tf_keras twin give the same int8 file.  Why a twin rather than
a second rewriter: qtoolkit's rewritten model (folded convs, fake-quant
layers) is an internal, inference-only graph that only the TFLite converter
reads; building it once, in tf_keras, keeps one rewriter and one set of
quantize layers (docs/design.md).  What the twin carries over: the functional
graph (nested functional models, multiple inputs and outputs), each built-in
layer's configuration and weights, and the `keras.ops` operations of a
functional graph that have a TensorFlow counterpart (arithmetic, reshape,
transpose, concatenation, means).  Initializers, regularizers and constraints
are not carried over (the weights are).  Anything else is refused with the
layer's name and class.  `prepare` checks the twin against the user's model
on the verification samples.
"""

from __future__ import annotations

import inspect
import sys
from typing import Any

import numpy as np
import tensorflow as tf
import tf_keras

from qtoolkit.errors import UnsupportedModelError

# Layer __init__ keywords of tf_keras' base Layer (the classes' own signatures end in **kwargs).
_BASE_KWARGS = {"name", "trainable", "dtype", "dynamic", "input_dim", "input_shape", "batch_input_shape",
                "batch_size", "weights", "activity_regularizer", "autocast"}
_DROPPED_SUFFIXES = ("_initializer", "_regularizer", "_constraint")


def _keras3():
    """The Keras 3 package if this process has loaded it, else None (qtoolkit never imports it for a check)."""
    keras = sys.modules.get("keras")
    version = getattr(keras, "__version__", "") if keras is not None else ""
    return keras if version.startswith("3.") else None


def is_keras3(obj: Any) -> bool:
    """True for a Keras 3 model or layer (`import keras` since TensorFlow 2.16)."""
    keras = _keras3()
    return keras is not None and isinstance(obj, keras.layers.Layer)


def check_backend() -> None:
    """Raises UnsupportedModelError unless Keras 3 runs on TensorFlow (KERAS_BACKEND)."""
    keras = _keras3()
    if keras is not None and keras.backend.backend() != "tensorflow":
        raise UnsupportedModelError(
            f"Keras 3 runs on the {keras.backend.backend()!r} backend here; qtoolkit converts through TensorFlow: "
            "set KERAS_BACKEND=tensorflow before Keras is imported (or unset it) and load the model again")


def to_tf_keras(model) -> tf_keras.Model:
    """A tf_keras functional model with the graph, layer names and weights of the Keras 3 `model`.

    Raises:
      UnsupportedModelError: a subclassed (not functional / Sequential) model, a layer or operation without a
        tf_keras / TensorFlow counterpart, a layer option tf_keras lacks, or a non-TensorFlow backend.
    """
    check_backend()
    keras = _keras3()
    inputs = getattr(model, "inputs", None)
    if not isinstance(model, keras.Model) or not inputs or not hasattr(model, "operations") or \
            not isinstance(model, (keras.Sequential, keras.src.models.functional.Functional)):
        raise UnsupportedModelError(
            f"{getattr(model, 'name', model)!r} is a subclassed (or unbuilt) Keras 3 model: qtoolkit reads "
            "functional and built Sequential models; build it with the functional API (keras.Input ... "
            "keras.Model(inputs, outputs)), or give a Sequential model its keras.Input first")
    return _Twin(keras).model(model)


class _Twin:
    """Rebuilds Keras 3 functional graphs in tf_keras, one layer twin per Keras 3 layer."""

    def __init__(self, keras):
        self.keras = keras
        self.layers = {}   # id(Keras 3 layer) -> its tf_keras twin
        self.models = {}   # id(Keras 3 nested model) -> its tf_keras twin

    def model(self, model) -> tf_keras.Model:
        tensors = {}
        new_inputs = []
        for t in model.inputs:
            layer = t._keras_history.operation
            x = tf_keras.Input(shape=tuple(t.shape[1:]), batch_size=t.shape[0], dtype=t.dtype, name=layer.name)
            tensors[id(t)] = x
            new_inputs.append(x)
        for t in model.outputs:
            self._resolve(t, tensors)
        outputs = [tensors[id(t)] for t in model.outputs]
        twin = tf_keras.Model(new_inputs, outputs if len(outputs) > 1 else outputs[0], name=model.name)
        for layer in model.layers:  # weights once every twin is built (a shared layer is called more than once)
            self._copy_weights(layer)
        return twin

    def _resolve(self, tensor, tensors: dict) -> None:
        """Computes the tf_keras twin of `tensor` (and of every tensor it depends on)."""
        def node_of(t):
            op, node_index, _ = t._keras_history
            return op._inbound_nodes[node_index]

        for node in _in_order([tensor], tensors, node_of, lambda n: n.arguments.keras_tensors):
            args = self.keras.tree.map_structure(lambda a: self._swap(a, tensors), node.arguments.args)
            kwargs = {k: self.keras.tree.map_structure(lambda a: self._swap(a, tensors), v)
                      for k, v in node.arguments.kwargs.items() if v is not None}
            out = self._call(node.operation, args, kwargs)
            for k3, x in zip(node.output_tensors, tf.nest.flatten(out)):
                tensors[id(k3)] = x

    def _swap(self, value, tensors):
        if isinstance(value, self.keras.Variable):  # a user layer's weight used by an op: its value, a constant
            return np.asarray(value)
        return tensors[id(value)] if isinstance(value, self.keras.KerasTensor) else value

    def _expand(self, layer, args, kwargs):
        """A user's own layer, read as the graph of layers and `keras.ops` its `call` makes on symbolic inputs;
        its weights enter that graph as constants (the values the file will hold)."""
        keras = self.keras
        flat = tf.nest.flatten(args)
        symbolic = [keras.Input(batch_shape=tuple(a.shape), dtype=a.dtype.name) if tf_keras.backend.is_keras_tensor(a)
                    else a for a in flat]
        options = {k: v for k, v in kwargs.items() if k not in ("training", "mask")}
        try:
            out = layer.call(*tf.nest.pack_sequence_as(list(args), symbolic), **options)
        except Exception as e:  # noqa: BLE001  (user code raises anything on symbolic tensors)
            raise UnsupportedModelError(
                f"layer {layer.name!r} ({type(layer).__name__}) is your own and its call could not be read as a "
                f"graph ({type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}); write it with "
                "built-in layers and keras.ops") from None
        tensors = {id(s): a for s, a in zip(symbolic, flat) if isinstance(s, keras.KerasTensor)}
        for t in tf.nest.flatten(out):
            self._resolve(t, tensors)
        return tf.nest.pack_sequence_as(out, [tensors[id(t)] for t in tf.nest.flatten(out)])

    def _call(self, op, args, kwargs):
        keras = self.keras
        if isinstance(op, keras.Model):
            if id(op) not in self.models:  # a nested functional model: rebuilt once, called like a layer
                self.models[id(op)] = self.model(op)
            return self.models[id(op)](*args)
        if isinstance(op, keras.layers.Layer):
            if not hasattr(op, "tf_keras_twin") and (getattr(tf_keras.layers, type(op).__name__, None) is None
                                                      or not type(op).__module__.startswith("keras.")):
                return self._expand(op, args, kwargs)
            activation = _HARD.get(op.get_config().get("activation"))
            if isinstance(op, keras.layers.Activation) and activation:
                return activation(args[0], op.name)
            out = self._layer(op)(*args, **kwargs)
            return activation(out, op.name) if activation else out
        return _operation(op, args, kwargs)

    def _layer(self, layer):
        if id(layer) in self.layers:
            return self.layers[id(layer)]
        if hasattr(layer, "tf_keras_twin"):  # qtoolkit's own Keras 3 layers (QAT)
            self.layers[id(layer)] = layer.tf_keras_twin()
            return self.layers[id(layer)]
        name = type(layer).__name__
        cls = getattr(tf_keras.layers, name, None)
        if cls is None or not type(layer).__module__.startswith("keras."):
            raise UnsupportedModelError(
                f"layer {layer.name!r} ({type(layer).__module__}.{name}) has no tf_keras counterpart: qtoolkit "
                "converts Keras 3 models made of Keras' built-in layers; replace it with built-in layers")
        twin = cls.from_config(_config(layer, cls))
        self.layers[id(layer)] = twin
        return twin

    def _copy_weights(self, layer) -> None:
        twin = self.layers.get(id(layer))
        if twin is None:
            return
        weights = layer.get_weights()
        shapes = [w.shape for w in weights]
        twin_shapes = [tuple(w.shape) for w in twin.weights]
        if shapes != twin_shapes:
            raise UnsupportedModelError(f"layer {layer.name!r} ({type(layer).__name__}): its Keras 3 weights "
                                        f"{shapes} do not match the tf_keras layer's {twin_shapes}")
        twin.set_weights(weights)


def _in_order(outputs, tensors: dict, node_of, inputs_of):
    """Yields the graph nodes that `outputs` depend on, each once all its input tensors are in `tensors`
    (which the caller fills with each node's outputs), without recursion: deep graphs stay within limits."""
    stack = list(outputs)
    while stack:
        t = stack[-1]
        if id(t) in tensors:
            stack.pop()
            continue
        node = node_of(t)
        missing = [a for a in inputs_of(node) if id(a) not in tensors]
        if missing:
            stack.extend(missing)
            continue
        stack.pop()
        yield node


def _accepted_kwargs(cls) -> set:
    """The constructor keywords a layer class takes: its own and its bases' (an __init__ often passes **kwargs
    on to its base classes' options)."""
    accepted = set(_BASE_KWARGS)
    for base in cls.__mro__:
        if "__init__" in vars(base):
            accepted |= set(inspect.signature(base.__init__).parameters)
    return accepted


def _config(layer, cls) -> dict:
    """The Keras 3 layer's config, as the tf_keras class takes it (see the module docstring)."""
    config = dict(layer.get_config())
    dtype = config.get("dtype")
    if isinstance(dtype, dict):  # Keras 3 serializes the DTypePolicy
        config["dtype"] = dtype.get("config", {}).get("name", "float32")
    accepted = _accepted_kwargs(cls)
    for key in list(config):
        if key.endswith(_DROPPED_SUFFIXES) and key != "activity_regularizer":
            del config[key]  # the weights are copied; these only matter when training from scratch
        elif key == "activity_regularizer":
            if config[key] is not None:
                raise UnsupportedModelError(f"layer {layer.name!r}: an activity regularizer is not carried over to "
                                            "tf_keras; remove it for conversion (it has no effect at inference)")
            del config[key]
        elif key not in accepted:
            if config[key] not in (None, False, 0, "", (), []):
                raise UnsupportedModelError(
                    f"layer {layer.name!r} ({type(layer).__name__}): the Keras 3 option {key}={config[key]!r} has "
                    "no tf_keras equivalent; qtoolkit cannot convert it")
            del config[key]
    if cls is tf_keras.layers.MultiHeadAttention:  # tf_keras' from_config reads these keys (built later)
        for key in ("query_shape", "key_shape", "value_shape"):
            config.setdefault(key, None)
    if config.get("activation") in _HARD:  # applied after the layer, as TensorFlow ops (see _HARD)
        config["activation"] = "linear"
    if isinstance(config.get("activation"), dict):
        raise UnsupportedModelError(f"layer {layer.name!r}: a custom activation ({config['activation']}) cannot be "
                                    "carried over; use a built-in activation or a separate layer")
    return config


def _hard_sigmoid(x, name):
    """Keras 3's hard_sigmoid, relu6(x + 3) / 6, as tf_keras' MobileNetV3 writes it (tf_keras' own
    `hard_sigmoid` is 0.2 x + 0.5, clipped: another function)."""
    return tf_keras.layers.ReLU(6.0, name=f"{name}_relu6")(x + 3.0) * (1.0 / 6.0)


def _hard_silu(x, name):
    """Keras 3's hard_silu / hard_swish: x * hard_sigmoid(x) (tf_keras has no such activation)."""
    return tf_keras.layers.Multiply(name=f"{name}_multiply")([x, _hard_sigmoid(x, name)])


# Keras 3 activations that tf_keras lacks or defines otherwise, applied as ops qtoolkit's rewriter reads
# (constant add + ReLU6 + constant multiply: MobileNetV3's hard sigmoid, docs/design.md).
_HARD = {"hard_sigmoid": _hard_sigmoid, "hard_silu": _hard_silu, "hard_swish": _hard_silu}


def _operation(op, args, kwargs):
    """A `keras.ops` operation of a functional graph, applied with its TensorFlow counterpart."""
    name = type(op).__name__
    binary = {"Add": tf.math.add, "Subtract": tf.math.subtract, "Multiply": tf.math.multiply,
              "Divide": tf.math.truediv, "TrueDivide": tf.math.truediv, "Maximum": tf.math.maximum,
              "Minimum": tf.math.minimum, "Matmul": tf.linalg.matmul}
    unary = {"Relu": tf.nn.relu, "Relu6": tf.nn.relu6, "Sigmoid": tf.math.sigmoid, "Tanh": tf.math.tanh,
             "Silu": tf.nn.silu, "Exp": tf.math.exp, "Sqrt": tf.math.sqrt, "Square": tf.math.square,
             "Negative": tf.math.negative, "Abs": tf.math.abs}
    if name in binary:
        return binary[name](*args)
    if name in unary:
        return unary[name](args[0])
    if name == "Reshape":
        return tf.reshape(args[0], [-1 if d is None else d for d in op.newshape])
    if name == "Transpose":
        return tf.transpose(args[0], perm=op.axes)
    if name == "Concatenate":
        return tf.concat(list(args[0]), axis=op.axis)
    if name == "Mean":
        return tf.math.reduce_mean(args[0], axis=op.axis, keepdims=op.keepdims)
    if name == "Softmax":
        return tf.nn.softmax(args[0], axis=op.axis)
    raise UnsupportedModelError(
        f"operation {op.name!r} (keras.ops {name}) in the Keras 3 graph has no TensorFlow counterpart in qtoolkit; "
        "express it with built-in layers")


# ---- the other way: a tf_keras model qtoolkit built (the QAT model) as a Keras 3 model -------------------------

_TF_OPS = {  # TFOpLambda symbol -> the keras.ops call (args as tf_keras recorded them, without `name`)
    "math.add": "add", "__operators__.add": "add", "math.subtract": "subtract", "math.multiply": "multiply",
    "math.truediv": "divide", "math.maximum": "maximum", "math.minimum": "minimum", "nn.relu": "relu",
    "nn.relu6": "relu6", "math.sigmoid": "sigmoid", "nn.silu": "silu", "math.tanh": "tanh",
}


def from_tf_keras(model, layer_map: dict):
    """A Keras 3 functional model with the graph and weights of a tf_keras functional `model` that qtoolkit built.

    `layer_map` maps qtoolkit's tf_keras layer classes to functions building their Keras 3 layer (the QAT
    layers); other layers are Keras' built-in ones, rebuilt from their configuration; TensorFlow ops recorded
    by tf_keras become the `keras.ops` call.
    """
    keras = _keras3()
    if keras is None:
        import keras  # noqa: F811  (a Keras 3 model was given, so Keras 3 is there)
    tensors, layers = {}, {}
    inputs = []
    for t in model.inputs:
        x = keras.Input(shape=tuple(t.shape[1:]), batch_size=t.shape[0], dtype=t.dtype.name,
                        name=t._keras_history.layer.name)
        tensors[id(t)] = x
        inputs.append(x)
    def node_of(t):
        layer, node_index, _ = t._keras_history
        return layer._inbound_nodes[node_index]

    for node in _in_order(model.outputs, tensors, node_of, lambda n: tf.nest.flatten(n.keras_inputs)):
        layer = node.layer
        swap = lambda a: tensors[id(a)] if id(a) in tensors else a  # noqa: E731  (its input tensors)
        args = tf.nest.map_structure(swap, node.call_args)
        kwargs = {k: tf.nest.map_structure(swap, v) for k, v in node.call_kwargs.items() if k != "name"}
        if type(layer).__name__ == "TFOpLambda":
            out = _keras_op(keras, layer, args, kwargs)
        else:
            if id(layer) not in layers:
                layers[id(layer)] = _keras3_layer(keras, layer, layer_map)
            out = layers[id(layer)](*args, **{k: v for k, v in kwargs.items() if k not in ("training", "mask")})
        for k2, x in zip(tf.nest.flatten(node.outputs), tf.nest.flatten(out)):
            tensors[id(k2)] = x
    outputs = [tensors[id(t)] for t in model.outputs]
    result = keras.Model(inputs, outputs if len(outputs) > 1 else outputs[0], name=model.name)
    for layer in model.layers:
        if id(layer) in layers:
            layers[id(layer)].set_weights(layer.get_weights())
    return result


def _keras3_layer(keras, layer, layer_map):
    for cls, build in layer_map.items():
        if type(layer) is cls:
            return build(layer)
    cls = getattr(keras.layers, type(layer).__name__, None)
    if cls is None or not type(layer).__module__.startswith("tf_keras."):
        raise UnsupportedModelError(f"layer {layer.name!r} ({type(layer).__name__}) of the rewritten model has no "
                                    "Keras 3 counterpart yet; quantization-aware training of this Keras 3 model "
                                    "is not available")
    config = {k: v for k, v in layer.get_config().items() if not k.endswith(_DROPPED_SUFFIXES)}
    accepted = _accepted_kwargs(cls)
    return cls.from_config({k: v for k, v in config.items() if k in accepted})


def _keras_op(keras, layer, args, kwargs):
    symbol = layer.symbol
    if symbol in _TF_OPS:
        values = list(args) + [v for k, v in kwargs.items() if k in ("y", "x")]
        return getattr(keras.ops, _TF_OPS[symbol])(*values)
    if symbol == "reshape":
        shape = kwargs.get("shape", args[1] if len(args) > 1 else None)
        return keras.ops.reshape(args[0], tuple(shape))
    if symbol in ("transpose", "compat.v1.transpose"):
        perm = kwargs.get("perm", args[1] if len(args) > 1 else None)
        return keras.ops.transpose(args[0], axes=perm)
    raise UnsupportedModelError(f"the rewritten model's TensorFlow op {symbol!r} has no keras.ops counterpart in "
                                "qtoolkit yet; quantization-aware training of this Keras 3 model is not available")
