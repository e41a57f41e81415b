"""Facts read from a TFLite flatbuffer: ops, dtypes, float compute, weight scales.

    from qtoolkit import inspection
    facts = inspection.inspect(tflite_bytes)
    facts.float_ops                      # [(op type, output tensor name)] computing in float
    inspection.float_layers(facts, ["conv1", "ln1"])   # the layers those ops come from
    print(facts.summary())

What the toolkit reports as "left in float" (and what `--strict` fails on)
is read here from the written file, never predicted from the rewrite: the
converter may quantize a layer qtoolkit did not rewrite (a custom layer between
two quantizers) or leave float one it did.
"""

from __future__ import annotations

import collections
import dataclasses

import numpy as np

WEIGHT_OPS = {"CONV_2D": 0, "DEPTHWISE_CONV_2D": 3, "FULLY_CONNECTED": 0}  # op -> output-channel axis of weights
# Ops that move data between float and integer, or index it: not "float compute".
_BOUNDARY_OPS = {"QUANTIZE", "DEQUANTIZE"}


@dataclasses.dataclass(frozen=True)
class WeightInfo:
    """A weight tensor of a Conv2D / DepthwiseConv2D / FullyConnected op."""

    op: str
    name: str
    dtype: str
    channels: int
    num_scales: int

    @property
    def per_channel(self) -> bool:
        return self.num_scales == self.channels and self.channels > 1


@dataclasses.dataclass(frozen=True)
class Inspection:
    """What a flatbuffer contains.

    Attributes:
      size_bytes: flatbuffer size.
      ops: op type -> count.
      tensor_dtypes: dtype -> number of tensors.
      float_ops: (op type, output tensor name) of every op computing in float.
      weights: one WeightInfo per Conv/Depthwise/FullyConnected op.
      input_dtypes, output_dtypes: the model's I/O dtypes.
    """

    size_bytes: int
    ops: dict
    tensor_dtypes: dict
    float_ops: list
    weights: list
    input_dtypes: list
    output_dtypes: list

    @property
    def fully_quantized(self) -> bool:
        return not self.float_ops

    @property
    def all_weights_per_channel(self) -> bool:
        return all(w.per_channel and w.dtype == "int8" for w in self.weights)

    def to_dict(self) -> dict:
        data = dataclasses.asdict(self)
        data["fully_quantized"] = self.fully_quantized
        data["all_weights_per_channel"] = self.all_weights_per_channel
        return data

    def summary(self) -> str:
        ops = ", ".join(f"{k} x{v}" for k, v in sorted(self.ops.items()))
        per_channel = sum(w.per_channel for w in self.weights)
        lines = [f"size {self.size_bytes / 1024:.1f} KiB; ops: {ops}",
                 f"inputs {'/'.join(self.input_dtypes)}, outputs {'/'.join(self.output_dtypes)}; "
                 f"{per_channel}/{len(self.weights)} weight tensors with per-channel scales"]
        if self.float_ops:
            lines.append("float ops: " + ", ".join(f"{op} ({name})" for op, name in self.float_ops))
        else:
            lines.append("no float ops: every op computes in integer")
        return "\n".join(lines)


def inspect(data: bytes) -> Inspection:
    """Counts ops and dtypes, lists float ops, checks weight scales per channel."""
    from ai_edge_litert.interpreter import Interpreter, OpResolverType

    interpreter = Interpreter(model_content=bytes(data),
                              experimental_op_resolver_type=OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES)
    tensors = {t["index"]: t for t in interpreter.get_tensor_details()}
    ops = collections.Counter()
    float_ops, weights = [], []
    for op in interpreter._get_ops_details():
        name = op["op_name"]
        ops[name] += 1
        ins = [tensors[i] for i in op["inputs"] if i >= 0]
        outs = [tensors[i] for i in op["outputs"]]
        if name not in _BOUNDARY_OPS and any(t["dtype"] == np.float32 for t in ins + outs):
            float_ops.append((name, outs[0]["name"] if outs else ""))
        if name in WEIGHT_OPS and len(ins) > 1:
            w = ins[1]
            axis = WEIGHT_OPS[name]
            channels = int(w["shape"][axis]) if len(w["shape"]) > axis else 1
            weights.append(WeightInfo(name, w["name"], np.dtype(w["dtype"]).name, channels,
                                      len(w["quantization_parameters"]["scales"])))
    return Inspection(
        size_bytes=len(data), ops=dict(ops),
        tensor_dtypes=dict(collections.Counter(np.dtype(t["dtype"]).name for t in tensors.values())),
        float_ops=float_ops, weights=weights,
        input_dtypes=[np.dtype(d["dtype"]).name for d in interpreter.get_input_details()],
        output_dtypes=[np.dtype(d["dtype"]).name for d in interpreter.get_output_details()])


def float_layers(facts: Inspection, layer_names) -> tuple:
    """The layers the file's float ops come from, in file order; an op no layer name explains is listed as
    "OP (tensor name)".

    The converter names each tensor after the ops it came from ("model/ln1/moments/mean;..."): a path
    component equal to a layer name identifies the layer.
    """
    known = set(layer_names)
    found = []
    for op, tensor in facts.float_ops:
        parts = [p for name in tensor.split(";") for p in name.split("/")]
        layer = next((p for p in parts if p in known), None)
        entry = layer or f"{op} ({tensor.split(';')[0]})"
        if entry not in found:
            found.append(entry)
    return tuple(found)
