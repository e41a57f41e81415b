"""Measures int4.pack_int4_weights on reference models: sizes and output agreement with the int8-container file.

    PYTHONPATH=. python scripts/measure_int4.py --models mobilenet_v1_digits resnet_digits --samples 200
"""

import argparse

import numpy as np

from qtoolkit import datasets, int4, qat, zoo


def _run(data, x):
    from ai_edge_litert.interpreter import Interpreter, OpResolverType

    it = Interpreter(model_content=data, experimental_op_resolver_type=OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES)
    it.allocate_tensors()
    i, o = it.get_input_details()[0], it.get_output_details()[0]
    scale, zp = i["quantization"]
    out = []
    for s in x:
        it.set_tensor(i["index"], np.clip(np.round(s[None] / scale + zp), -128, 127).astype(i["dtype"]))
        it.invoke()
        out.append(it.get_tensor(o["index"]).astype(np.int32))
    return np.concatenate(out)


def _output_quantization(data):
    from ai_edge_litert.interpreter import Interpreter

    return Interpreter(model_content=data).get_output_details()[0]["quantization"]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["mobilenet_v1_digits", "mobilenet_v2_digits", "resnet_digits"])
    parser.add_argument("--samples", type=int, default=200)
    args = parser.parse_args()
    print("| model | int8 scheme bytes | w4a8 export bytes | int4 bytes | ratio | tensors int4 (converter / packed / re-gridded) | "
          "outputs equal | max diff (steps) | top-1 agree | mean abs(Keras sim - file) steps (w4a8 / int4) |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for name in args.models:
        ref = zoo.reference(name)
        train, test = datasets.load(ref.dataset)
        int8_size = len(qat.export_tflite(qat.quantize_model(zoo.load(name), "int8",
                                                             calibration_data=train[0][:256]))[0])
        qm = qat.quantize_model(zoo.load(name), "w4a8", calibration_data=train[0][:256])
        data, _ = qat.export_tflite(qm)
        packed, rep = int4.pack_int4_weights(data)
        x = test[0][:args.samples]
        a, b = _run(data, x), _run(packed, x)
        scale, zero = _output_quantization(data)
        sim = np.asarray(qat.to_inference_model(qm)(x, training=False)) / scale + zero
        print(f"| {name} | {int8_size} | {rep.size_before} | {rep.size_after} | {rep.ratio:.3f} | "
              f"{len(rep.already_int4)} / {len(rep.packed)} / {len(rep.regridded)} (kept int8: {len(rep.kept_int8)}) | "
              f"{np.mean(np.all(a == b, axis=1)):.3f} | {np.abs(a - b).max()} | "
              f"{np.mean(a.argmax(1) == b.argmax(1)):.3f} | "
              f"{np.abs(sim - a).mean():.3f} / {np.abs(sim - b).mean():.3f} |", flush=True)


if __name__ == "__main__":
    main()
