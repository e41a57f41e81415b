"""Rewrites a w4a8 int8 flatbuffer so its 4-bit weights are stored as packed INT4 tensors.

    data, _ = qtoolkit.export_tflite(qat_model)          # w4a8: int8 containers on a 4-bit grid
    packed, report = int4.pack_int4_weights(data)
    export.write_atomic("model_int4.tflite", packed)

qtoolkit's w4a8 export keeps 4-bit weights in int8 tensors. Here each
CONV_2D / DEPTHWISE_CONV_2D / FULLY_CONNECTED weight tensor whose stored
integers all lie in [-8, 7] gets TensorType INT4 and its buffer packed two
values a byte (low nibble first, as LiteRT's `UnpackDenseInt4IntoInt8`
reads it). Scales, zero points, bias and activations stay as they are, so the
LiteRT kernels compute exactly the same integers. Tensors outside [-8, 7]
(e.g. weights the converter re-quantized to 8 bits) are left int8 and listed.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from qtoolkit import _env  # noqa: F401  (Keras 2 before TensorFlow)
from qtoolkit.errors import Int4Error  # noqa: F401  (raised here; defined with the others)

INT4_OPS = ("CONV_2D", "DEPTHWISE_CONV_2D", "FULLY_CONNECTED")


@dataclasses.dataclass(frozen=True)
class Int4Report:
    """What `pack_int4_weights` did.

    Attributes:
      packed: names of the weight tensors now stored as INT4.
      already_int4: weight tensors the converter had already written as INT4.
      regridded: packed tensors whose int8 values the converter had re-quantized
        to 8 bits; their 4-bit grid was recovered per channel (scale and bias rescaled).
      kept_int8: (name, reason) of weight tensors left int8.
      size_before, size_after: flatbuffer sizes in bytes.
    """

    packed: list
    already_int4: list
    regridded: list
    kept_int8: list
    size_before: int
    size_after: int

    @property
    def ratio(self) -> float:
        return self.size_after / self.size_before

    def summary(self) -> str:
        return (f"{len(self.packed)} weight tensors packed to int4 ({len(self.regridded)} re-gridded), "
                f"{len(self.already_int4)} already int4, {len(self.kept_int8)} kept int8; "
                f"size {self.size_before} -> {self.size_after} bytes ({self.ratio:.3f}x)")


def pack_nibbles(values: np.ndarray) -> bytes:
    """Packs int values in [-8, 7] two a byte, low nibble first (odd count: high nibble of the last byte 0)."""
    flat = np.asarray(values, np.int8).reshape(-1).astype(np.uint8) & 0x0F
    if flat.size % 2:
        flat = np.append(flat, np.uint8(0))
    return (flat[0::2] | (flat[1::2] << 4)).astype(np.uint8).tobytes()


def unpack_nibbles(data: bytes, count: int) -> np.ndarray:
    """Inverse of `pack_nibbles`: the first `count` signed 4-bit values as int8."""
    raw = np.frombuffer(data, np.uint8)
    both = np.stack([raw & 0x0F, raw >> 4], axis=1).reshape(-1)[:count].astype(np.int8)
    return np.where(both > 7, both - 16, both).astype(np.int8)


def _recover_grid(values, t, op, sub, model):
    """Per channel, the 4-bit integers k with v = round(k * 127 / n), n <= 7; rescales weight and bias.

    The converter re-quantizes some 4-bit-grid weights (FULLY_CONNECTED) to
    int8 with scale max|w| / 127. The grid step is then 127 / n times that
    scale for the smallest n that reproduces every stored value. Returns the
    int8 array of k, or a string saying why no grid was found.
    """
    q = t.quantization
    scales = None if q is None or q.scale is None else np.asarray(q.scale, np.float64)
    if scales is None or len(scales) == 0:
        return "no scales"
    axis = int(q.quantizedDimension or 0)
    w = values.reshape(t.shape)
    moved = np.moveaxis(w, axis, 0).reshape(w.shape[axis], -1).astype(np.float64)
    if len(scales) not in (1, moved.shape[0]):
        return "unexpected number of scales"
    if len(scales) == 1:
        moved = moved.reshape(1, -1)
    ks, steps = [], []
    for c, row in enumerate(moved):
        peak = np.abs(row).max()
        for n in range(1, 8):
            k = np.round(row * n / max(peak, 1))
            if peak == 0 or np.array_equal(np.round(k * peak / n), row):
                ks.append(k)
                steps.append(peak / n if peak else 1.0)
                break
        else:
            return f"channel {c} is not on a grid of at most 15 levels"
    steps = np.asarray(steps)
    new_scales = scales * steps
    k = np.stack(ks).reshape(np.moveaxis(w, axis, 0).shape if len(scales) > 1 else w.shape)
    k = np.moveaxis(k, 0, axis) if len(scales) > 1 else k
    if len(op.inputs) > 2 and op.inputs[2] >= 0:
        bias = sub.tensors[op.inputs[2]]
        bbuf = model.buffers[bias.buffer]
        if bbuf.data is None or bias.quantization is None or bias.quantization.scale is None:
            return "bias not constant"
        b = np.asarray(bbuf.data, np.uint8).view(np.int32).astype(np.float64)
        b = np.round(b / np.broadcast_to(steps, b.shape)).astype(np.int32)
        bbuf.data = np.frombuffer(b.tobytes(), np.uint8)
        bias.quantization.scale = list(np.asarray(bias.quantization.scale, np.float64)
                                       * np.broadcast_to(steps, b.shape))
    q.scale = list(new_scales.astype(np.float32))
    return k.astype(np.int8).reshape(-1)


def pack_int4_weights(data: bytes) -> tuple[bytes, Int4Report]:
    """Returns `data` with its 4-bit conv / depthwise / FC weights stored as packed INT4 tensors.

    Args:
      data: an int8 TFLite flatbuffer (e.g. qtoolkit's w4a8 export).

    Returns:
      (new flatbuffer bytes, Int4Report).

    Raises:
      Int4Error: the bytes are not a TFLite model, or no weight tensor fits in 4 bits.
    """
    return _rewrite_weights(data, pack=True)


def regrid_int8_weights(data: bytes) -> tuple[bytes, Int4Report]:
    """Returns `data` with its 4-bit weights as exact int8 containers: INT4 tensors the converter wrote unpacked,
    and weights it re-quantized to 8 bits put back on their 4-bit grid.

    LiteRT computes a CONV_2D whose filter is INT4 with a rounding of its own: on the digits MobileNet's w4a8
    stem, 2% of the outputs are one step off exact integer arithmetic (which the simulation and the int8
    kernels reproduce), and the steps grow through the network. In int8 containers the kernels compute
    exactly; `pack_int4_weights` packs them again for size.

    The converter re-quantizes a 4-bit-grid FULLY_CONNECTED kernel to int8 with scale max|w| / 127, which
    moves every weight off its grid by up to half an 8-bit step; here each such channel is stored as its
    4-bit integers with the grid's scale (bias codes rescaled), so the file computes with exactly the
    weights that were simulated or trained. Values that are on no grid of at most 15 levels stay as they
    are. For files whose weights are meant to be below 8 bits only (w4a8): an 8-bit channel that happens
    to fit a coarse grid keeps its values but has its bias codes rounded once more.
    """
    return _rewrite_weights(data, pack=False)


def _rewrite_weights(data: bytes, pack: bool) -> tuple[bytes, Int4Report]:
    """`pack_int4_weights` (pack) or `regrid_int8_weights` (not)."""
    import flatbuffers
    from tensorflow.lite.python import schema_py_generated as schema

    try:
        if not schema.Model.ModelBufferHasIdentifier(bytes(data), 0):
            raise ValueError("no TFL3 identifier")
        model = schema.ModelT.InitFromPackedBuf(bytearray(data), 0)
    except Exception as e:  # flatbuffers raises assorted errors on garbage
        raise Int4Error(f"not a TFLite flatbuffer ({e}); pass the bytes of a .tflite file") from None
    names = {getattr(schema.BuiltinOperator, k): k for k in dir(schema.BuiltinOperator) if not k.startswith("_")}
    packed, kept, done, already, regridded = [], [], set(), [], []
    for sub in model.subgraphs:
        for op in sub.operators:
            code = model.operatorCodes[op.opcodeIndex]
            opname = names.get(max(code.builtinCode, code.deprecatedBuiltinCode))
            if opname not in INT4_OPS or len(op.inputs) < 2 or op.inputs[1] < 0:
                continue
            t = sub.tensors[op.inputs[1]]
            name = t.name.decode() if isinstance(t.name, bytes) else str(t.name)
            if (id(sub), op.inputs[1]) in done:
                continue
            done.add((id(sub), op.inputs[1]))
            buf = model.buffers[t.buffer]
            if t.type == schema.TensorType.INT4:
                if not pack:  # int8 containers: LiteRT's INT4 filter path rounds 2% of outputs off exact
                    count = int(np.prod(t.shape))
                    buf.data = np.frombuffer(unpack_nibbles(bytes(np.asarray(buf.data, np.uint8)), count).tobytes(),
                                             np.uint8)
                    t.type = schema.TensorType.INT8
                    regridded.append(name)
                    continue
                already.append(name)
                continue
            if t.type != schema.TensorType.INT8 or buf.data is None or len(buf.data) == 0:
                kept.append((name, "not a constant int8 tensor"))
                continue
            if any(tt is not t and tt.buffer == t.buffer for s in model.subgraphs for tt in s.tensors):
                kept.append((name, "buffer shared with another tensor"))
                continue
            values = np.asarray(buf.data, np.uint8).view(np.int8)
            if values.min() < -8 or values.max() > 7:
                grid = _recover_grid(values, t, op, sub, model)
                if isinstance(grid, str):
                    kept.append((name, f"values span [{values.min()}, {values.max()}], {grid}"))
                    continue
                values = grid
                regridded.append(name)
            if pack:
                buf.data = np.frombuffer(pack_nibbles(values), np.uint8)
                t.type = schema.TensorType.INT4
            else:
                buf.data = np.frombuffer(np.asarray(values, np.int8).tobytes(), np.uint8)
            packed.append(name)
    if not pack:
        if not regridded:
            return bytes(data), Int4Report([], already, [], kept, len(data), len(data))
    elif not packed and not already:
        reasons = "; ".join(f"{n}: {r}" for n, r in kept) or "no CONV_2D/DEPTHWISE_CONV_2D/FULLY_CONNECTED weights"
        raise Int4Error(f"no weight tensor fits in 4 bits ({reasons}); export with the w4a8 scheme first")
    builder = flatbuffers.Builder(len(data))
    builder.Finish(model.Pack(builder), file_identifier=b"TFL3")
    out = bytes(builder.Output())
    return out, Int4Report(packed, already, regridded, kept, len(data), len(out))
