"""Coverage benchmark of sequence and transformer models: qtoolkit's int8 file vs the TFLite converter's.

Builds and trains (2 epochs, sklearn digits) a ViT-tiny block, a MobileViT-style hybrid (zoo.shapes), an
Embedding + Conv1D text classifier and keyword-spotting style Conv1D -> GRU / LSTM models, converts each
with qtoolkit.ptq and with the converter's own full-integer PTQ (same calibration samples), and prints a
markdown table: float ops in the file, SQNR and top-1 agreement against the float model, accuracy,
XNNPACK partitions, and the int8 / float latency (1 thread, batch 1, on a test sample).

The converter fails on tf_keras LSTM/GRU with a dynamic batch ('tf.TensorListReserve' op requires
element_shape to be static); its baseline for them is converted from a batch-1 concrete function
(LSTM: its fused UNIDIRECTIONAL_SEQUENCE_LSTM with its int16 cell state; GRU: a WHILE loop).

    env -u TF_USE_LEGACY_KERAS .venv/bin/python scripts/bench_transformers.py [NAME ...] [--cifar TAR]

NAME: only the models whose name contains it (e.g. `vit mobilevit`); about 4 minutes for all on 2 shared cores.
--cifar ../shared/data/cifar10_train_10k_jpg.tar: the CIFAR-10 images instead of digits (grey, 2x2-pooled
to the builders' 16x16 inputs; 8,000 train, 2,000 test).
"""

from __future__ import annotations

import os
import sys

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import tensorflow as tf  # noqa: E402
import tf_keras as keras  # noqa: E402

import qtoolkit  # noqa: E402
from qtoolkit import export, inspection, latency, runtime, verify  # noqa: E402
from qtoolkit.zoo.shapes import _images, mobilevit_block, vit_block  # noqa: E402

L = keras.layers
CALIBRATION = 300


def text_classifier(vocab=50, length=32):
    """Embedding (vocab 50) + Conv1D + GlobalAveragePooling1D + Dense."""
    inp = keras.Input((length,), dtype="int32", name="tokens")
    h = L.Embedding(vocab, 16, name="emb")(inp)
    h = L.Conv1D(32, 3, padding="same", activation="relu", name="conv")(h)
    return keras.Model(inp, L.Dense(10, name="fc")(L.GlobalAveragePooling1D(name="gap")(h)), name="text")


def kws(kind):
    """Keyword-spotting style: 16 frames of 16 features, Conv1D, a GRU or LSTM, Dense."""
    inp = keras.Input((16, 16), name="frames")
    h = L.Conv1D(32, 3, padding="same", activation="relu", name="conv")(inp)
    h = getattr(L, kind)(32, name="rnn")(h)
    return keras.Model(inp, L.Dense(10, name="fc")(h), name=f"kws_{kind.lower()}")


def text_tokens(images):
    """Digit images (16x16, 0..1) as 32 tokens of vocab 50: pairs of 8x8 pixels binned to 5 levels each."""
    small = images[:, ::2, ::2, 0] / images.max()
    px = np.clip((small * 5).astype(int), 0, 4).reshape(len(images), 64)
    return ((px[:, ::2] * 5 + px[:, 1::2]) + 25 * (np.arange(32) % 2)).astype(np.int32)


def cifar_images(path: str, train: int = 8000):
    """CIFAR-10 images (../shared/data's tar of JPEGs) as the builders' 16x16 one-channel inputs: grey
    (channel mean), 2x2 average pooled; the first `train` images train, the rest test."""
    from keras3_cifar_qat import load_cifar

    x, y = load_cifar(path)
    grey = x.mean(axis=-1, keepdims=True)
    small = grey.reshape(len(x), 16, 2, 16, 2, 1).mean(axis=(2, 4)).astype(np.float32)
    return small[:train], y[:train], small[train:], y[train:]


def data(cifar=None):
    x, y, xt, yt = cifar_images(cifar) if cifar else _images()
    return {"image": (x, y, xt, yt), "tokens": (text_tokens(x), y, text_tokens(xt), yt),
            "frames": (x[..., 0], y, xt[..., 0], yt)}


def batch1_function(model):
    spec = model.inputs[0]
    return tf.function(lambda t: model(t)).get_concrete_function(
        tf.TensorSpec([1, *spec.shape[1:]], spec.dtype))


def float_tflite(model):
    return tf.lite.TFLiteConverter.from_concrete_functions([batch1_function(model)], model).convert()


def converter_int8(model, cal, static_batch):
    rep = lambda: ([cal[i:i + 1]] for i in range(len(cal)))  # noqa: E731
    if not static_batch:
        return export.converter_ptq_tflite(model, rep)
    c = tf.lite.TFLiteConverter.from_concrete_functions([batch1_function(model)], model)
    c.optimizations = [tf.lite.Optimize.DEFAULT]
    c.representative_dataset = rep
    c.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
    c.inference_input_type = c.inference_output_type = tf.int8
    return c.convert()


def run_batch1(data, x):
    """Outputs of a (possibly batch-1) TFLite file, one sample at a time (int8 io (de)quantized)."""
    from ai_edge_litert.interpreter import Interpreter

    it = Interpreter(model_content=data, num_threads=1)
    it.allocate_tensors()
    i, o = it.get_input_details()[0], it.get_output_details()[0]
    outs = []
    for s in x:
        v = s[None]
        if i["dtype"] == np.int8:
            sc, zp = i["quantization"]
            v = np.clip(np.round(v / sc + zp), -128, 127).astype(np.int8)
        it.set_tensor(i["index"], v.astype(i["dtype"]))
        it.invoke()
        r = it.get_tensor(o["index"])
        if o["dtype"] == np.int8:
            sc, zp = o["quantization"]
            r = (r.astype(np.float32) - zp) * sc
        outs.append(r[0])
    return np.stack(outs)


def median_ms(data, sample, runs=30):
    """Median invoke time (1 thread, batch 1) on a real sample (random token ids would be out of vocabulary)."""
    return latency.median_ms(data, threads=1, runs=runs, inputs=sample[None])


def row(name, tool, data, comparison, float_ms, sample):
    d = runtime.delegation(data)
    floats = len(inspection.inspect(data).float_ops)
    ms = median_ms(data, sample)
    return (f"| {name} | {tool} | {floats} | {comparison.sqnr_db:.1f} | {100 * comparison.top1_agreement:.1f}% | "
            f"{100 * comparison.candidate_accuracy:.1f}% | {d.partitions} | {ms:.3f} / {float_ms:.3f} |")


def bench(name, build, x, y, xt, yt, static_batch=False):
    keras.utils.set_random_seed(0)
    model = build()
    model.compile(keras.optimizers.Adam(3e-3), keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    model.fit(x, y, batch_size=32, epochs=2, verbose=0)
    cal, ver, yv = x[:CALIBRATION], xt, yt  # calibrated on training samples, verified on the test split
    r = qtoolkit.ptq(model, cal, "int8", verification_data=ver, labels=yv, progress=False)
    float_ms = median_ms(float_tflite(model), ver[0])
    reference = model.predict(ver, verbose=0)
    rows = [f"| {name} | float | - | - | - | {100 * np.mean(reference.argmax(-1) == yv):.1f}% | - | - |",
            row(name, "qtoolkit", r.tflite, r.comparisons["float vs TFLite"], float_ms, ver[0])]
    if static_batch == "crashes":
        rows.append(f"| {name} | converter | fails: 'tf.TensorListReserve' op requires element_shape to be static; "
                    "from a batch-1 function its calibrator segfaults on the GRU's WHILE loop | | | | | |")
        return rows
    try:
        conv = converter_int8(model, cal, static_batch)
        theirs = verify.compare(reference, run_batch1(conv, ver), labels=yv)
        rows.append(row(name, "converter" + (" (batch 1)" if static_batch else ""), conv, theirs, float_ms, ver[0]))
    except Exception as e:  # noqa: BLE001
        rows.append(f"| {name} | converter | failed: {str(e).splitlines()[0][:80]} | | | | | |")
    return rows


def main():
    args = sys.argv[1:]
    cifar = None
    if "--cifar" in args:
        at = args.index("--cifar")
        if at + 1 >= len(args):
            raise SystemExit("--cifar needs the path of the CIFAR-10 tar (../shared/data/cifar10_train_10k_jpg.tar)")
        cifar = args[at + 1]
        args = args[:at] + args[at + 2:]
    d = data(cifar)
    print("| model | tool | float ops | SQNR (dB) | top-1 agreement | accuracy | XNNPACK partitions "
          "| int8 / float ms |")
    print("|---|---|---|---|---|---|---|---|")
    only = args
    for name, build, key, static in [("ViT block", vit_block, "image", False),
                                     ("MobileViT hybrid", mobilevit_block, "image", False),
                                     ("Embedding text", text_classifier, "tokens", False),
                                     ("KWS Conv1D+GRU", lambda: kws("GRU"), "frames", "crashes"),
                                     ("KWS Conv1D+LSTM", lambda: kws("LSTM"), "frames", True)]:
        if only and not any(o.lower() in name.lower() for o in only):
            continue
        for line in bench(name, build, *d[key], static_batch=static):
            print(line, flush=True)


if __name__ == "__main__":
    main()
