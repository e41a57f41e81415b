"""The TFLite side of the debugger: export the calibrated model, find and read its intermediate tensors.

The interpreter runs with experimental_preserve_all_tensors; each activation
quantizer of the rewritten model is matched to the TFLite tensor the converter
named after the Keras layer it quantizes (or, for the model's input and output,
to the tensor after the input's QUANTIZE op / before the output's DEQUANTIZE op).
"""

from __future__ import annotations

from typing import Optional

import numpy as np

from qtoolkit import export
from qtoolkit.debug.setup import Setup
# Private on purpose in verify (how a float array enters / leaves a possibly quantized tensor); the same
# conversion the LiteRTModel wrapper uses, needed here per tensor of an interpreter we drive ourselves.
from qtoolkit.verify import _from_tensor, _to_tensor


def export_for_debug(s: Setup) -> bytes:
    """The TFLite flatbuffer whose tensors are compared: float32 I/O, activations as the scheme says.

    Args:
      s: the debugger's Setup.

    Returns:
      The flatbuffer: the calibrated fake-quant model converted as is (8-bit activations), or, for 16-bit
      activations, the folded float twin calibrated by the converter on `s.calibration_samples`.
    """
    if s.scheme.activations.bits == 16:
        # No fake-quant path for 16-bit activations: the converter calibrates the folded float twin itself on
        # the same calibration samples (its ranges are min/max, not necessarily the scheme's method).
        import tf_keras as keras

        rw = s.rewritten
        twin = keras.Model(rw.float_model.inputs, rw.float_model.outputs[:len(rw.model.outputs)])
        cal_samples = s.calibration_samples

        def representative():
            for i in range(cal_samples[0].shape[0]):
                yield [a[i:i + 1] for a in cal_samples]

        return export.converter_ptq_tflite(twin, representative, int16x8=True, io_dtype="float32")
    return export.fake_quant_to_tflite(s.rewritten.model, "float32")


def end_quantizers(rw) -> dict:
    """Quantizers on the model's input and output (see `read_tensors`).

    Args:
      rw: the rewritten model (`rewrite.rewrite`'s result).

    Returns:
      Quantizer layer name -> "input" or "output".
    """
    ends = {}
    for kind, tensors in (("input", rw.model.inputs), ("output", rw.model.outputs[:1])):
        for t in tensors:
            layer = t._keras_history.layer
            if kind == "input":  # the quantizer that consumes the input layer
                layer = next((n.outbound_layer for n in layer._outbound_nodes
                              if n.outbound_layer.name in rw.quant_points), None)
            if layer is not None and layer.name in rw.quant_points:
                ends[layer.name] = kind
    return ends


def read_tensors(data: bytes, samples, quant_names, ends: Optional[dict] = None) -> tuple[dict, dict, np.ndarray]:
    """Runs the flatbuffer keeping all tensors; returns name -> dequantized values of each quantizer.

    `ends` maps quantizers no op is named after (the model input's, the model
    output's: the converter names those tensors after the signature) to
    "input" or "output": they are matched to the quantized tensor after the
    input's QUANTIZE op, or before the output's DEQUANTIZE op.

    Args:
      data: the flatbuffer.
      samples: one array per model input, run one sample at a time.
      quant_names: the quantizer layer names to match.
      ends: see above (`end_quantizers`).

    Returns:
      (quantizer -> dequantized values of its matched tensor, quantizer -> that tensor's name, the model's
      outputs in its order), for the quantizers that were matched.
    """
    from ai_edge_litert.interpreter import Interpreter

    import warnings

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "Warning: Enabling `experimental_preserve_all_tensors`")
        interp = Interpreter(model_content=bytes(data), experimental_preserve_all_tensors=True, num_threads=1)
    interp.allocate_tensors()
    details = {d["index"]: d for d in interp.get_tensor_details()}
    ops = interp._get_ops_details()
    outputs_in_order = [i for op in ops for i in op["outputs"]]
    match = {}
    for q in quant_names:
        # The converter names an op's output after the Keras layers of the ops fused into it
        # ("model_quant/c1/Relu;model_quant/c1/Conv2D"): the layer that feeds quantizer q is q
        # without "_quant" (and without "_preact" for a conv whose activation runs separately).
        base = q[:-len("_quant")]
        wanted = {q, base, base[:-len("_preact")] if base.endswith("_preact") else base}
        for index in outputs_in_order:
            d = details[index]
            parts = {p.split("/")[1] for p in d["name"].split(";") if p.count("/") >= 1}
            if parts & wanted and d["dtype"] in (np.int8, np.int16, np.float32):
                match[q] = d  # the last op output of that layer
    for q, end in (ends or {}).items():
        if q in match:
            continue
        if end == "input":
            ins = {d["index"] for d in interp.get_input_details()}
            found = [op["outputs"][0] for op in ops if op["op_name"] == "QUANTIZE" and op["inputs"][0] in ins]
            found = found or [i for i in ins if details[i]["dtype"] != np.float32]
        else:
            outs = {d["index"] for d in interp.get_output_details()}
            found = [op["inputs"][0] for op in ops if op["op_name"] == "DEQUANTIZE" and op["outputs"][0] in outs]
            found = found or [i for i in outs if details[i]["dtype"] != np.float32]
        if len(found) == 1:
            match[q] = details[found[0]]
    values = {q: [] for q in match}
    outputs = []
    inp = interp.get_input_details()
    n = samples[0].shape[0]
    for i in range(n):
        for d, a in zip(inp, samples):
            interp.set_tensor(d["index"], _to_tensor(a[i:i + 1], d))
        interp.invoke()
        outputs.append([_from_tensor(interp.get_tensor(d["index"]), d) for d in interp.get_output_details()])
        for q, d in match.items():
            t = interp.get_tensor(d["index"])
            scale, zero = d["quantization"]
            values[q].append(t.astype(np.float32) if not scale else (t.astype(np.float32) - zero) * scale)
    return ({q: np.concatenate(v) for q, v in values.items()}, {q: d["name"] for q, d in match.items()},
            [np.concatenate([o[i] for o in outputs]) for i in range(len(outputs[0]))])
