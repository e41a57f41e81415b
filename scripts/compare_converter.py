"""Same method, same file? qtoolkit `int8` with min/max ranges against the TFLite converter's PTQ, tensor by tensor.

Both files are made from the same trained model and the same calibration samples: the converter's full-integer
PTQ (its calibration is min/max) and qtoolkit's `int8` scheme with `--range_method minmax`. Their ops are
aligned in order (by op type), and for every pair: the output tensor's scale and zero point, the weights'
per-channel scales and int8 codes, and the int32 bias codes. Then the SQNR of each file against the float model
on held-out samples. Every difference is listed with the layer it belongs to.

    python scripts/compare_converter.py                                  # the six reference models + two shapes
    python scripts/compare_converter.py --models resnet_fmnist --show 20 # the 20 largest differences
"""

from __future__ import annotations

import argparse
import difflib

import qtoolkit  # noqa: F401  (TensorFlow's log level before TensorFlow is imported)
import numpy as np

from bench_ranges import REFERENCE, reference_case, shapes_case
from qtoolkit import export, loading, verify
from qtoolkit.pipeline import ptq

WEIGHTED = ("CONV_2D", "DEPTHWISE_CONV_2D", "FULLY_CONNECTED", "TRANSPOSE_CONV")
IGNORED = ("QUANTIZE", "DEQUANTIZE")


def ops(data: bytes) -> tuple[list, object]:
    """[(op type, inputs, outputs)] in execution order (model-boundary QUANTIZE/DEQUANTIZE left out), and the
    interpreter to read tensors from."""
    from ai_edge_litert.interpreter import Interpreter

    it = Interpreter(model_content=bytes(data))
    it.allocate_tensors()
    listed = [(o["op_name"], list(o["inputs"]), list(o["outputs"])) for o in it._get_ops_details()]
    return [o for o in listed if o[0] not in IGNORED], it


def params(it, index: int) -> tuple[np.ndarray, np.ndarray, str]:
    d = it._get_tensor_details(index, 0)
    q = d["quantization_parameters"]
    return np.asarray(q["scales"]), np.asarray(q["zero_points"]), d["name"]


def _constant(it, index: int):
    """A constant tensor's values, or None for a tensor computed at run time."""
    try:
        return it.get_tensor(index)
    except ValueError:
        return None


def compare_files(ours: bytes, theirs: bytes) -> dict:
    """Op-by-op facts of two files: counts of equal activation parameters, weights and biases, and the
    differences, largest first."""
    a_ops, a = ops(ours)
    b_ops, b = ops(theirs)
    matcher = difflib.SequenceMatcher(a=[o[0] for o in a_ops], b=[o[0] for o in b_ops], autojunk=False)
    facts = {"ops": (len(a_ops), len(b_ops)), "matched": 0, "activations_equal": 0, "weights": 0,
             "weights_equal": 0, "bias_equal": 0, "differences": []}
    for tag, i0, i1, j0, j1 in matcher.get_opcodes():
        if tag != "equal":
            facts["differences"].append((np.inf, f"ops differ: ours {[o[0] for o in a_ops[i0:i1]]} vs the "
                                                 f"converter's {[o[0] for o in b_ops[j0:j1]]}"))
            continue
        for (kind, ins_a, outs_a), (_, ins_b, outs_b) in zip(a_ops[i0:i1], b_ops[j0:j1]):
            facts["matched"] += 1
            sa, za, name = params(a, outs_a[0])
            sb, zb, _ = params(b, outs_b[0])
            if not sa.size and not sb.size:  # not a quantized tensor in either file (shapes, indices)
                facts["activations_equal"] += 1
                continue
            if sa.shape != sb.shape:
                facts["differences"].append((np.inf, f"{kind} {name}: quantized in one file only"))
                continue
            ratio = float((sa / sb - 1)[np.argmax(np.abs(sa / sb - 1))])
            if abs(ratio) < 1e-6 and np.array_equal(za, zb):
                facts["activations_equal"] += 1
            else:
                facts["differences"].append((abs(ratio), f"{kind} {name}: output scale {sa[0]:.6g} vs {sb[0]:.6g} "
                                                         f"({ratio:+.2%}), zero point {za[0]} vs {zb[0]}"))
            if kind not in WEIGHTED:
                continue
            facts["weights"] += 1
            bias = 3 if kind == "TRANSPOSE_CONV" else 2  # TRANSPOSE_CONV: (output shape, kernel, input, bias)
            wa, wb = _constant(a, ins_a[1]), _constant(b, ins_b[1])
            if wa is None or wb is None:  # e.g. TRANSPOSE_CONV's input 1 in one file is not its kernel
                facts["differences"].append((np.inf, f"{kind} {name}: weights not comparable (not constant)"))
                continue
            ws_a, _, _ = params(a, ins_a[1])
            ws_b, _, _ = params(b, ins_b[1])
            codes = int(np.sum(wa != wb)) if wa.shape == wb.shape else wa.size
            wrel = float(np.max(np.abs(ws_a / ws_b - 1))) if ws_a.shape == ws_b.shape else np.inf
            if codes == 0 and wrel < 1e-6:
                facts["weights_equal"] += 1
            else:
                facts["differences"].append((wrel, f"{kind} {name}: weights {codes} of {wa.size} codes differ, "
                                                   f"scales up to {wrel:.2e} apart"))
            if len(ins_a) > bias and ins_a[bias] >= 0 and len(ins_b) > bias and ins_b[bias] >= 0:
                ba, bb = _constant(a, ins_a[bias]), _constant(b, ins_b[bias])
                if ba is None or bb is None:
                    continue
                step = int(np.max(np.abs(ba.astype(np.int64) - bb.astype(np.int64)))) if ba.shape == bb.shape \
                    else -1
                if step == 0:
                    facts["bias_equal"] += 1
                else:
                    facts["differences"].append((step, f"{kind} {name}: bias codes up to {step} apart"))
    facts["differences"].sort(key=lambda d: -d[0])
    return facts


def measure(name: str) -> dict:
    model, cal, ver, _, _ = reference_case(name) if name in REFERENCE else shapes_case(name, "test")
    x = lambda arrays: arrays if len(arrays) > 1 else arrays[0]  # noqa: E731

    def representative():
        for i in range(len(cal[0])):
            yield [a[i:i + 1] for a in cal]

    theirs = export.converter_ptq_tflite(model, representative)
    ours = ptq(model, x(cal), "int8", range_method="minmax", verification_data=x(ver), progress=False)
    facts = compare_files(ours.tflite, theirs)
    graph = model if getattr(model, "inputs", None) else loading.trace(model)
    float_out = verify.predict_keras(graph, x(ver), all_outputs=True)
    theirs_out = verify.LiteRTModel(theirs).predict(x(ver))
    theirs_out = theirs_out if isinstance(theirs_out, list) else [theirs_out]
    facts["sqnr"] = (ours.comparisons["float vs TFLite"].sqnr_db, verify.sqnr_db(float_out[0], theirs_out[0]))
    return facts


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join(REFERENCE) + ",two_heads,unet")
    parser.add_argument("--show", type=int, default=5, help="largest differences listed per model")
    args = parser.parse_args()
    print("| model | ops (ours / converter's) | activations: equal scale and zero point | weights: equal codes "
          "and scales | biases: equal codes | SQNR dB, ours / converter's |")
    print("|---|---|---|---|---|---|")
    details = []
    for name in args.models.split(","):
        f = measure(name)
        print(f"| {name} | {f['ops'][0]} / {f['ops'][1]} | {f['activations_equal']} of {f['matched']} | "
              f"{f['weights_equal']} of {f['weights']} | {f['bias_equal']} of {f['weights']} | "
              f"{f['sqnr'][0]:.2f} / {f['sqnr'][1]:.2f} |", flush=True)
        details.append((name, f["differences"][:args.show]))
    for name, differences in details:
        if differences:
            print(f"\n{name}, largest differences:")
            for _, line in differences:
                print(f"- {line}")


if __name__ == "__main__":
    main()
