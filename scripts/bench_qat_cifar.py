"""qtoolkit QAT vs TFMOT QAT on pretrained CIFAR-10 networks, int8 and w4a8, over seeds.

Pretrains a ResNet-8 (`zoo.resnet_small`) and a MobileNet-v1-style network (`zoo.mobilenet_v1_small`),
both tf_keras (TFMOT takes only Keras 2), on CIFAR-10 images 0-4999 (flips and shifts, --pretrain_epochs;
weights cached under --cache), then
per seed and network fine-tunes copies the same way (images 5000-7999, Adam 1e-4, batch 64, --epochs):
in float, with TFMOT (`quantize_model`, its default 8-bit scheme; for w4a8 its experimental
`DefaultNBitQuantizeScheme(num_bits_weight=4)`) and with qtoolkit (`quantize_model` +
`QuantizationCallback`; candidate recipes with --variants). Everything is evaluated on images 8000-9999: the float fine-tune with Keras,
every QAT model's exported int8 file with the LiteRT interpreter.

    python scripts/bench_qat_cifar.py --cifar ../shared/data/cifar10_train_10k_jpg.tar --seeds 0,1,2
    python scripts/bench_qat.py --cifar ../shared/data/cifar10_train_10k_jpg.tar --seeds 0,1,2   # the same

Prints per-seed rows and, per network, tool and scheme, the mean ± standard error over seeds.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np
import tensorflow as tf
import tf_keras as keras

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from keras3_cifar_qat import accuracy, load_cifar  # noqa: E402  (the same images, order and split)

import qtoolkit  # noqa: E402
from qtoolkit import verify, zoo  # noqa: E402
from qtoolkit.callbacks import QuantizationCallback  # noqa: E402
from qtoolkit.rewrite.qat_layers import QATQuantizeActivation  # noqa: E402

BATCH = 64
NETWORKS = {
    "resnet8": lambda: zoo.resnet_small((32, 32, 3), 10, name="resnet8_cifar"),
    "mobilenet": lambda: zoo.mobilenet_v1_small((32, 32, 3), 10, width=32, name="mobilenet_cifar"),
}
# qtoolkit's recipes per scheme: keyword arguments of quantize_model (`model`) and of the callback
# (`callback`; bn_freeze "half" = half-way through the fine-tune, as docs/qat.md recommends at 4 bits).
# `distill`: Distiller arguments (trained with distillation from the float model), else None.
# w4a8 starts from the `w4a8_adaround` PTQ (CLE, AdaRound's rounding and its ranges), the 4-bit weights of
# the plain `w4a8` scheme ("w4a8 nearest") rounded to nearest lost 0.6-1 point (docs/benchmarks.md).
RECIPES = {
    "int8": {"scheme": "int8", "model": {}, "callback": {}},
    "w4a8": {"scheme": "w4a8_adaround", "model": {}, "callback": {"bn_freeze_step": "half"}},
}
# Candidates for the recipes (--variants), the measurements that chose them are in docs/benchmarks.md.
VARIANTS = {
    "int8 mse": {"scheme": "int8", "model": {"weight_range": "mse"}, "callback": {}},
    "int8 distill": {"scheme": "int8", "model": {}, "callback": {}, "distill": {}},
    "w4a8 mse": {"scheme": "w4a8", "model": {"weight_range": "mse"}, "callback": {"bn_freeze_step": "half"}},
    "w4a8 distill": {"scheme": "w4a8", "model": {}, "callback": {"bn_freeze_step": "half"}, "distill": {}},
    "w4a8 mse distill": {"scheme": "w4a8", "model": {"weight_range": "mse"}, "callback": {"bn_freeze_step": "half"},
                         "distill": {}},
    "w4a8 mse never": {"scheme": "w4a8", "model": {"weight_range": "mse"}, "callback": {}},
    "w4a8 delay": {"scheme": "w4a8", "model": {}, "callback": {"bn_freeze_step": "half", "quant_delay": "half"}},
    # Learned step sizes (scheme keys qat.weight_range / qat.activation_range "learned").
    "int8 learned": {"scheme": "int8", "model": {"weight_range": "learned", "activation_range": "learned"},
                     "callback": {}},
    "int8 learned_w": {"scheme": "int8", "model": {"weight_range": "learned"}, "callback": {}},
    "w4a8 learned": {"scheme": "w4a8", "model": {"weight_range": "learned", "activation_range": "learned"},
                     "callback": {"bn_freeze_step": "half"}},
    "w4a8 learned_w": {"scheme": "w4a8", "model": {"weight_range": "learned"}, "callback": {"bn_freeze_step": "half"}},
    # Activation ranges calibrated with min/max (nothing clipped when training starts) instead of the preset's
    # method (int8: auto, which may pick MSE's clipped range; w4a8: MSE).
    "int8 minmax": {"scheme": qtoolkit.load_scheme("int8").replace(activations={"method": "minmax"}), "model": {},
                    "callback": {}},
    "w4a8 minmax": {"scheme": qtoolkit.load_scheme("w4a8").replace(activations={"method": "minmax"}), "model": {},
                    "callback": {"bn_freeze_step": "half"}},
    "w4a8 freeze0": {"scheme": "w4a8", "model": {}, "callback": {"bn_freeze_step": 0}},
    # The recipe before: w4a8 without post-training algorithms (weights rounded to nearest at the start).
    # int8 from the int8_max_accuracy PTQ (CLE + AdaRound): at step 0 the QAT model is that scheme's PTQ file.
    "w4a8 nearest": {"scheme": "w4a8", "model": {}, "callback": {"bn_freeze_step": "half"}},
    "int8 adaround": {"scheme": "int8_max_accuracy", "model": {}, "callback": {}},
    # A diagnostic, not a candidate: every activation range starts at [-6, 6], where TFMOT's moving averages
    # start (its quantizers' initial values; decay 0.999 as here), instead of calibrated ranges.
    "int8 wide": {"scheme": "int8", "model": {}, "callback": {}, "start_range": (-6.0, 6.0)},
}


def augmented(x, y):
    """(x, y) shuffled each epoch, randomly flipped and shifted (4-pixel reflect padding, random 32x32 crop)."""
    def augment(image, label):
        padded = tf.pad(tf.image.random_flip_left_right(image, seed=0), [[4, 4], [4, 4], [0, 0]], "REFLECT")
        return tf.image.random_crop(padded, image.shape, seed=0), label

    ds = tf.data.Dataset.from_tensor_slices((x, y)).shuffle(len(x), seed=0, reshuffle_each_iteration=True)
    return ds.map(augment, num_parallel_calls=2).batch(BATCH).prefetch(2)


def pretrained(name, x, y, epochs, cache):
    """The network pretrained on (x, y), augmented: Adam 2e-3 with cosine decay, batch 64; cached in `cache`."""
    path = os.path.join(cache, f"{name}_tfkeras_{epochs}ep_cosine_aug.h5")
    keras.utils.set_random_seed(0)
    model = NETWORKS[name]()
    if os.path.exists(path):
        model.load_weights(path)
        return model
    steps = epochs * -(-len(x) // BATCH)
    compile_float(model, keras.optimizers.schedules.CosineDecay(2e-3, steps))
    start = time.time()
    model.fit(augmented(x, y), epochs=epochs, verbose=0)
    print(f"{name}: pretrained on {len(x)} images, {epochs} epochs, in {time.time() - start:.0f} s", flush=True)
    os.makedirs(cache, exist_ok=True)
    model.save_weights(path)
    return model


def compile_float(model, learning_rate):
    model.compile(keras.optimizers.Adam(learning_rate), keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                  metrics=["accuracy"])


def copy_of(model):
    clone = keras.models.clone_model(model)
    clone.set_weights(model.get_weights())
    return clone


def fit(model, data, seed, callbacks=()):
    x, y, epochs = data
    keras.utils.set_random_seed(seed)
    compile_float(model, 1e-4)
    model.fit(x, y, batch_size=BATCH, epochs=epochs, verbose=0, shuffle=True, callbacks=list(callbacks))


def tfmot_model(model, scheme):
    import tensorflow_model_optimization as tfmot

    qk = tfmot.quantization.keras
    if scheme == "int8":
        return qk.quantize_model(model)
    from tensorflow_model_optimization.python.core.quantization.keras.experimental.default_n_bit import (
        default_n_bit_quantize_scheme as n_bit)

    return qk.quantize_apply(qk.quantize_annotate_model(model),
                             scheme=n_bit.DefaultNBitQuantizeScheme(num_bits_weight=4, num_bits_activation=8))


def tfmot_tflite(model):
    conv = tf.lite.TFLiteConverter.from_keras_model(model)
    conv.optimizations = [tf.lite.Optimize.DEFAULT]
    conv.inference_input_type = conv.inference_output_type = tf.int8
    return conv.convert()


def run_tfmot(model, scheme, data, seed):
    qm = tfmot_model(copy_of(model), scheme)
    fit(qm, data, seed)
    return tfmot_tflite(qm)


def run_qtoolkit(model, recipe, data, seed, calibration):
    qm = qtoolkit.quantize_model(model, recipe["scheme"], calibration_data=calibration, **recipe["model"])
    if recipe.get("start_range"):
        for layer in qm.layers:
            if isinstance(layer, QATQuantizeActivation) and layer.fixed_range is None:
                layer.set_range(*recipe["start_range"])
    steps = data[2] * -(-len(data[0]) // BATCH)
    callback = {k: steps // 2 if v == "half" else v for k, v in recipe["callback"].items()}
    trainer = qm if recipe.get("distill") is None else qtoolkit.qat.Distiller(qm, model, **recipe["distill"])
    fit(trainer, data, seed, [QuantizationCallback(**callback)])
    data, inspection = qtoolkit.export_tflite(qm)
    assert inspection.fully_quantized and inspection.all_weights_per_channel
    return data


def benchmark(x, y, networks, seeds, epochs, cache, recipes=RECIPES, tfmot=True, pretrain_epochs=30, log=print):
    """{(network, tool, scheme): [accuracy per seed]} (the float fine-tune under ("float", "float"))."""
    x_pre, y_pre, ft, x_ev, y_ev = x[:5000], y[:5000], (x[5000:8000], y[5000:8000], epochs), x[8000:], y[8000:]
    results = {}
    for name in networks:
        model = pretrained(name, x_pre, y_pre, pretrain_epochs, cache)
        results[(name, "pretrained", "float")] = [accuracy(model.predict(x_ev, verbose=0), y_ev)]
        log(f"{name}: pretrained float accuracy {results[(name, 'pretrained', 'float')][0]:.4f}", flush=True)
        for seed in seeds:
            start = time.time()
            runs = {}
            ft_model = copy_of(model)
            fit(ft_model, ft, seed)
            runs[("float", "float")] = accuracy(ft_model.predict(x_ev, verbose=0), y_ev)
            for scheme in ("int8", "w4a8") if tfmot else ():
                runs[("TFMOT", scheme)] = int8_accuracy(run_tfmot(model, scheme, ft, seed), x_ev, y_ev)
            for key, recipe in recipes.items():
                runs[("qtoolkit", key)] = int8_accuracy(run_qtoolkit(model, recipe, ft, seed, x_pre[:512]),
                                                       x_ev, y_ev)
            for (tool, scheme), acc in runs.items():
                results.setdefault((name, tool, scheme), []).append(acc)
            log(f"{name} seed {seed} ({time.time() - start:.0f} s): " +
                ", ".join(f"{tool} {scheme} {acc:.4f}" for (tool, scheme), acc in runs.items()), flush=True)
    return results


def int8_accuracy(data, x, y):
    return accuracy(verify.LiteRTModel(data).predict(x), y)


def mean_se(values):
    v = 100 * np.asarray(values, float)
    return v.mean(), (v.std(ddof=1) / np.sqrt(len(v)) if len(v) > 1 else float("nan"))


def table(results, seeds) -> str:
    """Markdown: per network, tool and scheme the mean ± standard error over seeds, per-seed values and the
    difference to the float fine-tune and to TFMOT's same scheme (per seed, then averaged)."""
    lines = ["| network | tool | scheme | int8 file accuracy % (mean ± SE) | − float fine-tune | − TFMOT | "
             f"per seed ({', '.join(map(str, seeds))}) |", "|---|---|---|---|---|---|---|"]
    for (name, tool, scheme), accs in results.items():
        if tool == "pretrained":
            lines.append(f"| {name} | pretrained (before fine-tuning) | float | {100 * accs[0]:.2f} | | | |")
            continue
        m, se = mean_se(accs)
        diffs = []
        for ref in (("float", "float"), ("TFMOT", scheme.split()[0])):
            other = results.get((name, *ref))
            if tool == "float" or other is None or ref[0] == tool:
                diffs.append("")
                continue
            dm, dse = mean_se(np.subtract(accs, other))
            diffs.append(f"{dm:+.2f} ± {dse:.2f}")
        shown = "float fine-tune (Keras)" if tool == "float" else tool
        lines.append(f"| {name} | {shown} | {scheme} | {m:.2f} ± {se:.2f} | {diffs[0]} | {diffs[1]} | "
                     f"{', '.join(f'{100 * a:.2f}' for a in accs)} |")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cifar", required=True, help="the tar of CIFAR-10 JPEGs (../shared/data/...)")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--epochs", type=int, default=2, help="fine-tuning epochs (every tool alike)")
    parser.add_argument("--networks", default=",".join(NETWORKS))
    parser.add_argument("--pretrain_epochs", type=int, default=30)
    parser.add_argument("--cache", default=os.path.join("build", "cifar"))
    parser.add_argument("--variants", default="", help=f"qtoolkit recipes to run too: {', '.join(VARIANTS)}")
    parser.add_argument("--no_tfmot", action="store_true", help="qtoolkit and the float fine-tune only")
    args = parser.parse_args(argv)
    seeds = [int(s) for s in args.seeds.split(",")]
    x, y = load_cifar(args.cifar)
    start = time.time()
    recipes = {**RECIPES, **{v: VARIANTS[v] for v in args.variants.split(",") if v}}
    results = benchmark(x, y, args.networks.split(","), seeds, args.epochs, args.cache, recipes,
                        tfmot=not args.no_tfmot, pretrain_epochs=args.pretrain_epochs)
    print(f"\n{args.epochs} epoch(s) of fine-tuning on images 5000-7999 (Adam 1e-4, batch {BATCH}); evaluated on "
          f"images 8000-9999 (QAT: the int8 file, LiteRT; float: Keras); seeds {args.seeds}; "
          f"{time.time() - start:.0f} s\n")
    print(table(results, seeds))


if __name__ == "__main__":
    main()
