"""Coverage of model shapes: qtoolkit's int8 file vs the TFLite converter's, for every `qtoolkit.zoo.shapes` model.

Each model (two inputs / two heads of equal shape, U-Net, subclassed, custom layer, Conv1D + BN, detection
head) is trained 2 epochs on digits, saved as a .keras file and converted through qtoolkit's command-line
function (`convert.run`, what `python -m qtoolkit.convert` runs; calibration data as an .npz keyed by input
name) and by the converter's own full-integer PTQ on the same calibration samples.  Both files run in LiteRT
on the same held-out samples; per output: SQNR against the float Keras model and top-1 agreement over the
last axis (per pixel / per anchor; "-" for regression outputs); per file: float compute ops and XNNPACK
partitions / ops outside the delegate.

    python scripts/coverage.py                       # markdown table on stdout (docs/coverage.md)
    python scripts/coverage.py --models unet,detection --epochs 5
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile

import qtoolkit  # noqa: F401  (TensorFlow's log level before TensorFlow is imported)
import numpy as np

from qtoolkit import convert, export, inspection, loading, runtime, verify
from qtoolkit.zoo import shapes

CUSTOM_FILE = "from qtoolkit.zoo.shapes import ChannelScale\n"


def _converter_file(model, cal: list) -> bytes:
    def representative():
        for i in range(len(cal[0])):
            yield [a[i:i + 1] for a in cal]
    return export.converter_ptq_tflite(model, representative)


def measure(name: str, epochs: int, folder: str) -> list[dict]:
    model, task = shapes.trained(name, epochs=epochs)
    graph = model if model.inputs else loading.trace(model)  # a subclassed model: its traced graph names things
    names = [t.name.split(":")[0] for t in graph.inputs]
    x = task.x_test
    n_ver = 100
    cal, ver = [a[:-n_ver] for a in x], [a[-n_ver:] for a in x]
    data = os.path.join(folder, f"{name}_cal.npz")
    np.savez(data, **dict(zip(names, cal)))
    ver_path = os.path.join(folder, f"{name}_ver.npz")
    np.savez(ver_path, **dict(zip(names, ver)))
    path = os.path.join(folder, f"{name}.keras")
    model.save(path)
    custom = None
    if name == "custom_layer":
        custom = os.path.join(folder, "my_layers.py")
        with open(custom, "w") as f:
            f.write(CUSTOM_FILE)
    tasks = (",".join(f"{o}={t}" for o, t in zip(graph.output_names, task.tasks)) if len(task.tasks) > 1
             else task.tasks[0])
    with open(os.devnull, "w") as quiet:
        ours = convert.run(path, os.path.join(folder, f"{name}.tflite"), data, "int8", verification_data=ver_path,
                           num_verification_samples=n_ver, custom_objects=custom, output_tasks=tasks, out=quiet)
    theirs = _converter_file(model, cal)
    float_out = verify.predict_keras(model, ver, all_outputs=True)
    their_out = verify.LiteRTModel(theirs).predict(ver)
    their_out = their_out if isinstance(their_out, list) else [their_out]
    their_cmp = verify.compare_outputs(float_out, their_out, list(graph.output_names), tasks=list(task.tasks))
    rows = []
    for tool, data_bytes, per_output in (("qtoolkit", ours.tflite, {k: v["float vs TFLite"]
                                                                     for k, v in ours.per_output.items()}),
                                         ("converter", theirs, their_cmp)):
        facts = inspection.inspect(data_bytes)
        delegation = runtime.delegation(data_bytes)
        rows.append({"model": name, "tool": tool, "per_output": per_output, "float_ops": len(facts.float_ops),
                     "partitions": delegation.partitions, "outside": len(delegation.outside),
                     "ops": sum(facts.ops.values())})
    return rows


def table(rows: list[dict]) -> str:
    lines = ["| model | output | qtoolkit SQNR (dB) | converter SQNR (dB) | qtoolkit / converter top-1 agreement "
             "| float ops | XNNPACK partitions | ops outside XNNPACK |",
             "|---|---|---|---|---|---|---|---|"]
    for ours, theirs in zip(rows[::2], rows[1::2]):
        for i, ((out, c), t) in enumerate(zip(ours["per_output"].items(), theirs["per_output"].values())):
            agree = ("-" if c.top1_agreement is None else
                     f"{100 * c.top1_agreement:.2f}% / {100 * t.top1_agreement:.2f}%")
            files = ((f"{ours['float_ops']} / {theirs['float_ops']}", f"{ours['partitions']} / {theirs['partitions']}",
                      f"{ours['outside']} / {theirs['outside']}") if i == 0 else ("", "", ""))
            lines.append(f"| {ours['model'] if i == 0 else ''} | {out} | {c.sqnr_db:.2f} | {t.sqnr_db:.2f} | {agree} | "
                         + " | ".join(files) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default=",".join(shapes.NAMES), help="comma list of qtoolkit.zoo.shapes names")
    parser.add_argument("--epochs", type=int, default=2, help="training epochs per model")
    args = parser.parse_args(argv)
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        for name in args.models.split(","):
            print(f"{name} ...", file=sys.stderr, flush=True)
            rows += measure(name, args.epochs, folder)
    print(table(rows))
    print("\n(float ops, partitions and ops outside XNNPACK: qtoolkit / converter; 100 held-out digits samples; "
          "agreement over the last axis at every position)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
