"""Reproduces the shapes of the whitepaper's tables on qtoolkit's reference models.

Every number is measured by this run on the committed reference models of
qtoolkit.zoo (Fashion-MNIST, the full 10,000-image test set) and printed next
to the paper's ImageNet numbers from ../shared/PAPER.md. Writes
docs/paper_results.md (keeping any section of it this script does not own).

    python scripts/reproduce_paper.py [--models mobilenet_v1_fmnist,...] [--qat_samples 20000]

"simulated" columns are the accuracy of qtoolkit's calibrated fake-quant Keras
model (as the paper measured); "TFLite" columns run the exported flatbuffer
with the LiteRT interpreter. Schemes TFLite cannot run (asymmetric weights,
4-bit activations) exist only as simulations.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import time

import qtoolkit  # noqa: F401  (TensorFlow's log level before TensorFlow is imported)
import numpy as np

from qtoolkit import calibrate, datasets, export, latency, qat, rewrite, verify, zoo
from qtoolkit.pipeline import ptq
from qtoolkit.schemes import QuantScheme, load as load_scheme

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOC = os.path.join(ROOT, "docs", "paper_results.md")
MODELS = ("mobilenet_v1_fmnist", "mobilenet_v2_fmnist", "resnet_fmnist")
# The paper's ImageNet rows closest in kind to each reference model.
PAPER_ROW = {"mobilenet_v1": "Mobilenet-v1 1.0 224", "mobilenet_v2": "Mobilenet-v2 1.0 224",
             "resnet": "Resnet-v1-50"}
PAPER_T23 = {  # float, W-only asym/layer, W-only sym/chan, W-only asym/chan, W+A asym/layer, W+A sym/chan, W+A asym/chan, act-only
    "Mobilenet-v1 1.0 224": (70.9, 0.1, 59.1, 70.4, 0.1, 59.1, 70.3, 70.8),
    "Mobilenet-v2 1.0 224": (71.9, 0.1, 69.8, 69.8, 0.1, 69.8, 69.7, 70.0),
    "Resnet-v1-50": (75.2, 75.0, 75.1, 75.2, 75.0, 75.1, 75.1, 75.1),
}
PAPER_T4 = {"Mobilenet-v1 1.0 224": (70.0, 70.7), "Mobilenet-v2 1.0 224": (70.9, 71.1), "Resnet-v1-50": (75.0, 75.0)}
PAPER_T5 = {"Mobilenet-v1 1.0 224": (2.0, 0.1, 65.0), "Mobilenet-v2 1.0 224": (0.1, 0.1, 62.0),
            "Resnet-v1-50": (0.2, 54.0, 73.2)}
PAPER_T6 = {"Mobilenet-v1 1.0 224": (48.0, 64.0), "Mobilenet-v2 1.0 224": (7.0, 58.0), "Resnet-v1-50": (36.0, 58.0)}
PAPER_T7 = {"Mobilenet-v1 1.0 224": (155, 68), "Mobilenet-v2 1.0 224": (105, 63), "Resnet-v1-50": (874, 440)}


def scheme(name, w_bits=8, w_sym=True, w_gran="per_channel", a_bits=8) -> QuantScheme:
    base = load_scheme("int8").to_dict()
    base["name"] = name
    base["weights"].update(bits=w_bits, symmetric=w_sym, narrow_range=w_sym, granularity=w_gran)
    acts = base["activations"]
    acts["bits"] = a_bits
    if a_bits == 16:
        acts["symmetric"] = True
    return QuantScheme.from_dict(base, source=f"reproduce_paper {name}")


class Bench:
    """One reference model, its data, and the measurements on it."""

    def __init__(self, name, n_cal, qat_samples, qat_epochs):
        self.name = name
        self.model = zoo.load(name)
        (x_train, y_train), (self.x, self.y) = datasets.load(zoo.reference(name).dataset)
        order = np.random.default_rng(0).permutation(len(x_train))
        self.cal = x_train[order[:n_cal]]
        self.x_train, self.y_train = x_train[order[:qat_samples]], y_train[order[:qat_samples]]
        self.qat_epochs = qat_epochs
        self.specs = [(t.name.split(":")[0], tuple(t.shape), t.dtype.as_numpy_dtype) for t in self.model.inputs]
        self.float_tflite = export.float_tflite(self.model)
        self.float_acc = self.accuracy(verify.LiteRTModel(self.float_tflite).predict(self.x))

    def accuracy(self, outputs) -> float:
        outputs = outputs[0] if isinstance(outputs, list) else outputs
        return 100.0 * float(np.mean(np.asarray(outputs).argmax(1) == self.y))

    def simulated(self, s: QuantScheme) -> float:
        """Accuracy of the calibrated fake-quant Keras model."""
        rewritten = rewrite.rewrite(self.model, s)
        calibrate.calibrate(rewritten, calibrate.open_source(self.cal, self.specs), len(self.cal), s,
                            progress=False)
        return self.accuracy(verify.predict_keras(rewritten.model, self.x))

    def channel_range_ratio(self) -> tuple[float, float]:
        """Worst ratio of largest to smallest per-channel |w| max, over folded depthwise / other conv kernels.

        Per-tensor weights give every channel the largest channel's step: a
        ratio of 100 leaves the smallest channel fewer than 2 of 255 levels.
        """
        from qtoolkit.rewrite.layers import FoldedConv

        worst = {"depthwise": 0.0, "other": 0.0}
        for layer in rewrite.rewrite(self.model, load_scheme("int8")).model.layers:
            if isinstance(layer, FoldedConv):
                k = layer.kernel.numpy().reshape(-1, layer.units)
                a = np.abs(k).max(0)
                ratio = float(a.max() / max(a.min(), 1e-12))
                key = "depthwise" if layer.kind == "depthwise" else "other"
                worst[key] = max(worst[key], ratio)
        return worst["depthwise"], worst["other"]

    def weights_only(self, s: QuantScheme) -> float:
        """Weights quantized per `s`, activations float (16-bit fake quant: error ~2^-8 of 8 bits)."""
        return self.simulated(scheme(s.name, s.weights.bits, s.weights.symmetric, s.weights.granularity, 16))

    def tflite(self, s: QuantScheme):
        """(accuracy, flatbuffer) of qtoolkit's PTQ export run with the LiteRT interpreter."""
        result = ptq(self.model, self.cal, s, verification_data=self.x[:1], num_calibration_samples=len(self.cal),
                     num_verification_samples=1, progress=False)
        return self.accuracy(verify.LiteRTModel(result.tflite).predict(self.x)), result.tflite

    def qat(self, s: QuantScheme, bn_correction=True, bn_freeze=True):
        """(Keras QAT accuracy, exported TFLite accuracy) after fine-tuning."""
        qm = qat.quantize_model(self.model, s, calibration_data=self.cal, bn_correction=bn_correction)
        steps = self.qat_epochs * -(-len(self.x_train) // 64)
        qat.fine_tune(qm, self.x_train, self.y_train, epochs=self.qat_epochs,
                      bn_freeze_step=None if bn_freeze else steps + 1)
        keras_acc = self.accuracy(verify.predict_keras(qm, self.x))
        data, _ = qat.export_tflite(qm)
        return keras_acc, self.accuracy(verify.LiteRTModel(data).predict(self.x))


APP_PAPER_ROW = {"MobileNet": "Mobilenet-v1 1.0 224", "MobileNetV2": "Mobilenet-v2 1.0 224",
                 "ResNet50": "Resnet-v1-50"}


def size_latency(name, float_data, int8_data, paper, runs):
    """A table-7 row: sizes, and float vs int8 medians measured alternately (1 thread)."""
    f_ms, q_ms, ratios = [], [], []
    for _ in range(3):  # alternate float and int8 so drift hits both
        f_ms.append(latency.median_ms(float_data, threads=1, runs=runs))
        q_ms.append(latency.median_ms(int8_data, threads=1, runs=runs))
        ratios.append(f_ms[-1] / q_ms[-1])
    pf, pq = PAPER_T7[paper] if paper else (None, None)
    return [name, f"{len(float_data) / 1024:.0f}", f"{len(int8_data) / 1024:.0f}",
            f"{len(float_data) / len(int8_data):.2f}x", f"{np.median(f_ms):.3f}", f"{np.median(q_ms):.3f}",
            f"{np.median(ratios):.2f}x", f"*{pf} / {pq} ms = {pf / pq:.1f}x*" if pf else ""]


def fmt(v, digits=1):
    return "–" if v is None else f"{v:.{digits}f}"


def table(header, rows):
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--calibration_samples", type=int, default=1000)
    parser.add_argument("--qat_samples", type=int, default=20000, help="training images for each QAT fine-tune")
    parser.add_argument("--qat_epochs", type=int, default=1)
    parser.add_argument("--latency_apps", default="MobileNet,MobileNetV2,ResNet50",
                        help="Keras applications (weights=None, 224x224) added to the latency table; '' for none")
    parser.add_argument("--output", default=DOC)
    args = parser.parse_args(argv)
    t_start = time.perf_counter()
    t23, t4, t56, tbn, t7 = [], [], [], [], []
    for name in args.models.split(","):
        b = Bench(name, args.calibration_samples, args.qat_samples, args.qat_epochs)
        paper = PAPER_ROW[name.rsplit("_", 1)[0]]
        log = lambda what: print(f"[{time.perf_counter() - t_start:6.0f}s] {name}: {what}", flush=True)  # noqa: E731
        asym_layer = scheme("w8a8 asym/layer", 8, False, "per_tensor")
        sym_layer = scheme("w8a8 sym/layer", 8, True, "per_tensor")
        sym_chan = scheme("w8a8 sym/chan", 8, True, "per_channel")
        asym_chan = scheme("w8a8 asym/chan", 8, False, "per_channel")
        act_only = scheme("act-only", 16, True, "per_channel", 8)
        log("tables 2-3 (PTQ 8-bit)")
        w_only = [b.weights_only(s) for s in (asym_layer, sym_chan, asym_chan)]
        w_a = [b.simulated(s) for s in (asym_layer, sym_layer, sym_chan, asym_chan)]
        act = b.simulated(act_only)
        tfl_chan, int8_data = b.tflite(load_scheme("int8"))
        tfl_layer, _ = b.tflite(load_scheme("int8_per_tensor"))
        p = PAPER_T23[paper]
        dw_ratio, other_ratio = b.channel_range_ratio()
        t23.append([name, fmt(b.float_acc, 2), *[fmt(v, 2) for v in w_only], *[fmt(v, 2) for v in w_a],
                    fmt(act, 2), fmt(tfl_layer, 2), fmt(tfl_chan, 2),
                    f"{dw_ratio:.0f} / {other_ratio:.0f}" if dw_ratio else f"– / {other_ratio:.0f}"])
        t23.append([f"*paper: {paper}*", *[f"*{v}*" for v in p[:4]], f"*{p[4]}*", "", f"*{p[5]}*", f"*{p[6]}*",
                    f"*{p[7]}*", "", "", ""])

        log("table 4 (QAT 8-bit)")
        q_layer = b.qat(load_scheme("int8_per_tensor"))
        q_chan = b.qat(load_scheme("int8"))
        t4.append([name, fmt(b.float_acc, 2), fmt(tfl_layer, 2), fmt(q_layer[1], 2), fmt(tfl_chan, 2),
                   fmt(q_chan[1], 2), fmt(q_chan[0] - q_chan[1], 2)])
        t4.append([f"*paper: {paper}*", "", "", f"*{PAPER_T4[paper][0]}*", "", f"*{PAPER_T4[paper][1]}*", ""])

        log("tables 5-6 (4-bit)")
        w4_layer = b.simulated(scheme("w4a8 sym/layer", 4, True, "per_tensor"))
        w4_chan_ptq, _ = b.tflite(load_scheme("w4a8"))
        w4_qat = b.qat(load_scheme("w4a8"))
        a4_ptq = b.simulated(load_scheme("w8a4"))
        a4_qat = b.qat(load_scheme("w8a4"))
        t56.append([name, fmt(b.float_acc, 2), fmt(w4_layer, 2), fmt(w4_chan_ptq, 2), fmt(w4_qat[1], 2),
                    fmt(a4_ptq, 2), fmt(a4_qat[0], 2)])
        p5, p6 = PAPER_T5[paper], PAPER_T6[paper]
        t56.append([f"*paper: {paper}*", "", f"*{p5[0]}*", f"*{p5[1]}*", f"*{p5[2]}*", f"*{p6[0]}*", f"*{p6[1]}*"])

        log("batch-norm folding ablation (W4A8 per-tensor QAT)")
        w4_layer_scheme = scheme("w4a8 sym/layer", 4, True, "per_tensor")
        folds = [b.qat(w4_layer_scheme), b.qat(w4_layer_scheme, bn_freeze=False),
                 b.qat(w4_layer_scheme, bn_correction=False, bn_freeze=False)]
        tbn.append([name, fmt(w4_layer, 2), *[fmt(v, 2) for pair in folds for v in pair]])

        log("table 7 (size, latency)")
        t7.append(size_latency(name, b.float_tflite, int8_data, paper, runs=200))
        log("done")
    for app in filter(None, args.latency_apps.split(",")):
        import tf_keras as keras

        print(f"[{time.perf_counter() - t_start:6.0f}s] {app} (224x224, weights=None): table 7", flush=True)
        model = getattr(keras.applications, app)(weights=None, input_shape=(224, 224, 3))
        x = np.random.default_rng(0).uniform(-1, 1, (64, 224, 224, 3)).astype(np.float32)
        int8 = ptq(model, x, "int8", num_calibration_samples=63, num_verification_samples=1, progress=False).tflite
        t7.append(size_latency(f"{app} 224 (Keras applications)", export.float_tflite(model), int8,
                               APP_PAPER_ROW.get(app), runs=20))

    minutes = (time.perf_counter() - t_start) / 60
    command = " ".join(["python scripts/reproduce_paper.py"] + list(sys.argv[1:] if argv is None else argv))
    body = f"""## The paper's tables, reproduced on the reference models

Produced by `{command}` ({minutes:.0f} minutes on this 2-core machine); every number below
is measured by that run. Models: qtoolkit's reference models (`qtoolkit.zoo`, committed weights) trained on
Fashion-MNIST; accuracy is top-1 in % on all 10,000 test images (±0.3 points is one binomial standard error at
90%). Calibration: {args.calibration_samples} training images; QAT: {args.qat_epochs} epoch(s) on
{args.qat_samples} training images from the float weights (Adam 1e-4, batch norm frozen half-way). The paper's
ImageNet numbers (in italics, from ../shared/PAPER.md) are for the closest full-size network of the same kind;
compare shapes (what collapses, what recovers), not values.

### Post-training quantization, 8 bits (paper tables 2–3)

Weight-only columns keep activations float (16-bit); "simulated" columns are qtoolkit's calibrated fake-quant
Keras model (as the paper measured); the last two columns are the exported int8 TFLite files run with LiteRT
(TFLite requires symmetric weights: asymmetric schemes exist only as simulations).

{table(["model", "float", "W-only asym/layer", "W-only sym/chan", "W-only asym/chan", "W+A asym/layer",
        "W+A sym/layer", "W+A sym/chan", "W+A asym/chan", "act-only", "TFLite int8 per-tensor",
        "TFLite int8 per-channel", "channel-range ratio dw / other"], t23)}

The last column is the worst ratio, over the folded kernels, of the largest to the smallest per-channel
max |w| (depthwise layers / other convolutions): per-tensor quantization gives every channel the step of the
largest, so the paper's collapse needs ratios of several hundred (ImageNet MobileNets after folding).

### Quantization-aware training vs PTQ, 8 bits (paper table 4)

All columns are exported int8 TFLite files run with LiteRT; the last column is Keras QAT minus TFLite accuracy
(the simulation gap). qtoolkit's QAT weights are symmetric (TFLite's int8 weights are), so the paper's
asym/layer column is sym/layer here.

{table(["model", "float", "PTQ sym/layer", "QAT sym/layer", "PTQ sym/chan", "QAT sym/chan",
        "QAT sim gap (pts)"], t4)}

### 4-bit weights or 4-bit activations: PTQ vs QAT (paper tables 5–6)

W4A8: weights on a 4-bit grid (per-tensor simulated; per-channel exported to TFLite with at most 15 levels per
channel in int8 storage). W8A4: TFLite has no 4-bit activation kernels, so both W8A4 columns are the simulated
4-bit-activation Keras models.

{table(["model", "float", "W4A8 PTQ sym/layer (sim)", "W4A8 PTQ sym/chan (TFLite)", "W4A8 QAT sym/chan (TFLite)",
        "W8A4 PTQ (sim)", "W8A4 QAT (sim)"], t56)}

### Batch-norm folding during QAT (paper section 3.2)

W4A8 QAT with per-tensor weights, Keras QAT accuracy and exported TFLite accuracy: (a) folding with the
paper's correction (weights folded with the moving sigma, outputs rescaled by sigma/sigma_B) and statistics
frozen half-way (qtoolkit's default); (b) correction, never frozen; (c) naive folding with the batch sigma, never
frozen — the weights trained are not the weights deployed. Per-tensor weights, because with per-channel
symmetric weights the fold's per-channel factor scales each channel's grid with it (quant(c·w) = c·quant(w)):
the quantized weights of (a) and (c) are then identical up to that factor, and the ablation shows nothing.

{table(["model", "PTQ (sim)", "(a) Keras", "(a) TFLite", "(b) Keras", "(b) TFLite", "(c) Keras", "(c) TFLite"],
       tbn)}

### Size and latency (paper table 7, CPU column)

LiteRT interpreter, XNNPACK, batch 1, 1 thread, this machine's CPU; medians of 200 runs (20 for the 224x224
Keras applications, whose weights are random: latency and size do not depend on them), float and int8 measured
alternately three times, speed-up = median of the three float/int8 ratios. The paper's column is a Pixel 2 big
core. qtoolkit's int8 files have int8 inputs and outputs.

{table(["model", "float KB", "int8 KB", "size ratio", "float ms", "int8 ms", "int8 speed-up", "paper (Pixel 2)"],
       t7)}
"""
    write_section(args.output, "## The paper's tables, reproduced on the reference models", body)
    print(body)
    return 0


def write_section(path, heading, body):
    """Replaces (or adds) the section starting at `heading`, keeping the rest of the file."""
    text = open(path, encoding="utf-8").read() if os.path.isfile(path) else \
        "# Paper results\n\nMeasured reproductions of the whitepaper's findings, and what qtoolkit adds beyond it.\n\n"
    pattern = re.compile(re.escape(heading) + r".*?(?=^## |\Z)", re.S | re.M)
    text = pattern.sub(lambda m: body.rstrip() + "\n\n", text) if pattern.search(text) else \
        text.rstrip() + "\n\n" + body.rstrip() + "\n"
    export.write_atomic(path, text.encode())


if __name__ == "__main__":
    sys.exit(main())
