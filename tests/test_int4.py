"""INT4 weight storage for w4a8 exports: packing, LiteRT outputs, file size."""

import numpy as np
import pytest
import tf_keras as keras

import qtoolkit
from qtoolkit import int4, qat

L = keras.layers


def _types(data):
    from tensorflow.lite.python import schema_py_generated as schema

    m = schema.ModelT.InitFromPackedBuf(bytearray(data), 0)
    names = {getattr(schema.BuiltinOperator, k): k for k in dir(schema.BuiltinOperator) if not k.startswith("_")}
    sub = m.subgraphs[0]
    out = {}
    for op in sub.operators:
        code = m.operatorCodes[op.opcodeIndex]
        name = names[max(code.builtinCode, code.deprecatedBuiltinCode)]
        if name in int4.INT4_OPS:
            out.setdefault(name, []).append(sub.tensors[op.inputs[1]].type == schema.TensorType.INT4)
    return out


def _run(data, x):
    from ai_edge_litert.interpreter import Interpreter, OpResolverType

    it = Interpreter(model_content=data, experimental_op_resolver_type=OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES)
    it.allocate_tensors()
    i, o = it.get_input_details()[0], it.get_output_details()[0]
    scale, zp = i["quantization"]
    res = []
    for s in x:
        it.set_tensor(i["index"], np.clip(np.round(s[None] / scale + zp), -128, 127).astype(np.int8))
        it.invoke()
        res.append(it.get_tensor(o["index"]).astype(np.int32))
    return np.concatenate(res)


def _fc_weights(data):
    from ai_edge_litert.interpreter import Interpreter

    it = Interpreter(model_content=data)
    it.allocate_tensors()
    op = next(o for o in it._get_ops_details() if o["op_name"] == "FULLY_CONNECTED")
    return it.get_tensor(op["inputs"][1])


@pytest.fixture(scope="module")
def exports():
    rng = np.random.default_rng(0)
    model = keras.Sequential([L.Input((12, 12, 1)), L.Conv2D(8, 3, activation="relu"),
                              L.DepthwiseConv2D(3, activation="relu"), L.Conv2D(8, 1), L.Flatten(), L.Dense(10)])
    calib = rng.uniform(-1, 1, (32, 12, 12, 1)).astype(np.float32)
    out = {}
    for scheme in ("w4a8", "int8"):
        out[scheme] = qat.export_tflite(qat.quantize_model(model, scheme, calibration_data=calib))[0]
    return out


@pytest.mark.parametrize("values, packed", [
    ([1, 2], b"\x21"),          # low nibble first
    ([-1, 7], b"\x7f"),         # -1 -> 0xF
    ([-8, 0, 3], b"\x08\x03"),  # odd count: last high nibble 0
])
def test_pack_nibbles_table(values, packed):
    assert int4.pack_nibbles(np.array(values)) == packed
    np.testing.assert_array_equal(int4.unpack_nibbles(packed, len(values)), values)


def test_w4a8_export_gets_int4_weights_and_same_outputs(exports):
    data = exports["w4a8"]
    before = _types(data)
    assert before["FULLY_CONNECTED"] == [False]  # int8 containers, holding the 4-bit grid: the export put back
    assert -8 <= _fc_weights(data).min() and _fc_weights(data).max() <= 7  # what the converter re-quantized
    packed, report = int4.pack_int4_weights(data)
    after = _types(packed)
    assert all(all(v) for v in after.values()), after
    assert not report.regridded and report.size_after < report.size_before
    x = np.random.default_rng(1).uniform(-1, 1, (16, 12, 12, 1)).astype(np.float32)
    assert np.abs(_run(data, x) - _run(packed, x)).max() <= 1  # at most one output step
    assert qtoolkit.export.inspect(packed).fully_quantized


def test_int8_weights_are_refused(exports):
    with pytest.raises(int4.Int4Error, match="w4a8"):
        int4.pack_int4_weights(exports["int8"])


def test_not_a_flatbuffer():
    with pytest.raises(int4.Int4Error, match="not a TFLite flatbuffer"):
        int4.pack_int4_weights(b"not a model at all")



def test_qat_export_offers_int4(tmp_path):
    """`qtoolkit.export_tflite(..., int4=True)` writes the packed file: smaller, nothing left to pack."""
    model = keras.Sequential([L.Input((12, 12, 1)), L.Conv2D(8, 3, activation="relu"), L.Flatten(), L.Dense(10)])
    calib = np.random.default_rng(0).uniform(-1, 1, (32, 12, 12, 1)).astype(np.float32)
    qm = qat.quantize_model(model, "w4a8", calibration_data=calib)
    plain, _ = qat.export_tflite(qm)
    packed, _ = qat.export_tflite(qm, str(tmp_path / "m.tflite"), int4=True)
    assert len(packed) < len(plain)
    assert (tmp_path / "m.tflite").read_bytes() == packed
    report = int4.pack_int4_weights(packed)[1]
    assert not report.packed and not report.regridded and not report.kept_int8
