"""One QAT training process, run by tests/test_distributed.py (a fresh process each: tf.distribute's cluster and
devices are fixed at TensorFlow start-up, and a killed run must really die).

    python qat_worker.py --keras 2|3 --out DIR --tag NAME [--mwms] [--loop fit|custom] [--epochs N]
                         [--backup DIR] [--kill-after-epoch K] [--best-path PATH] [--export PATH]

--mwms: MultiWorkerMirroredStrategy from TF_CONFIG (else the default strategy: one device).
--loop custom: a training loop of strategy.run steps driving the callbacks through a CallbackList (what Keras 3
needs under MultiWorkerMirroredStrategy: its `fit` fails there, see docs/distributed.md); default `fit`.
--backup: BackupAndRestore(DIR) (tf_keras' or Keras 3's, as the model); --kill-after-epoch K: os._exit(3) at
the end of epoch K (0-based), after the backup is written. Writes DIR/result_NAME.json: the QAT state (ranges,
batch-norm statistics, schedule flags, weights), the callback's step and best-so-far, the first epoch run.
"""

import argparse
import json
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")
parser = argparse.ArgumentParser()
parser.add_argument("--keras", choices=["2", "3"], required=True)
parser.add_argument("--out", required=True)
parser.add_argument("--tag", required=True)
parser.add_argument("--mwms", action="store_true")
parser.add_argument("--mirrored", action="store_true", help="MirroredStrategy on two logical CPUs")
parser.add_argument("--loop", choices=["fit", "custom"], default="fit")
parser.add_argument("--epochs", type=int, default=2)
parser.add_argument("--backup")
parser.add_argument("--kill-after-epoch", type=int)
parser.add_argument("--best-path")
parser.add_argument("--export")
args = parser.parse_args()

import tensorflow as tf  # noqa: E402

# The strategy first: MultiWorkerMirroredStrategy must be created before any other TensorFlow op.
if args.mirrored:
    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
    strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
elif args.mwms:
    strategy = tf.distribute.MultiWorkerMirroredStrategy()
else:
    strategy = tf.distribute.get_strategy()

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))
import numpy as np  # noqa: E402

if args.keras == "3":
    import keras  # noqa: E402

    keras.config.disable_traceback_filtering()  # a failure inside Keras shows where
else:
    import tf_keras as keras  # noqa: E402

import qtoolkit  # noqa: E402
from qtoolkit import qat  # noqa: E402
from qtoolkit.callbacks import QuantizationCallback  # noqa: E402

GLOBAL_BATCH, N = 16, 64  # 4 steps an epoch
QUANT_DELAY, BN_FREEZE = 2, 6


def float_model():
    L = keras.layers
    inp = keras.Input((8, 8, 1))
    x = L.Conv2D(8, 3, padding="same", use_bias=False, name="conv")(inp)
    x = L.BatchNormalization(momentum=0.9, name="bn")(x)
    x = L.ReLU(name="relu")(x)
    x = L.DepthwiseConv2D(3, padding="same", use_bias=False, name="dw")(x)
    x = L.BatchNormalization(momentum=0.9, name="dw_bn")(x)
    x = L.ReLU(6.0, name="relu6")(x)
    x = L.GlobalAveragePooling2D(name="gap")(x)
    return keras.Model(inp, L.Dense(5, name="logits")(x))


def data():
    rng = np.random.default_rng(0)
    x = rng.uniform(-1, 2, (N, 8, 8, 1)).astype(np.float32)
    return x, rng.integers(0, 5, N)


class Recorder(keras.callbacks.Callback):
    """The first epoch this process runs; os._exit after epoch `kill_after` (listed last: after the backup)."""

    def __init__(self, kill_after):
        super().__init__()
        self.kill_after, self.first_epoch = kill_after, None

    def on_epoch_begin(self, epoch, logs=None):
        if self.first_epoch is None:
            self.first_epoch = epoch

    def on_epoch_end(self, epoch, logs=None):
        if self.kill_after is not None and epoch == self.kill_after:
            sys.stdout.flush()
            os._exit(3)


def custom_fit(model, x, y, epochs, callbacks):
    """Keras' fit for this test: SGD steps under `strategy.run` on the distributed global batches, the callbacks
    driven by a CallbackList (the loss summed over the replicas' examples / global batch: the global mean)."""
    loss_fn = keras.losses.SparseCategoricalCrossentropy(from_logits=True, reduction="none")
    optimizer = model.optimizer
    options = tf.data.Options()
    options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.DATA
    dataset = tf.data.Dataset.from_tensor_slices((x, y)).batch(GLOBAL_BATCH).with_options(options)
    batches = strategy.experimental_distribute_dataset(dataset)

    def replica_step(xb, yb):
        with tf.GradientTape() as tape:
            loss = tf.reduce_sum(loss_fn(yb, model(xb, training=True))) / GLOBAL_BATCH
        grads = tape.gradient(loss, model.trainable_variables)
        optimizer.apply_gradients(zip(grads, model.trainable_variables))
        return loss

    @tf.function
    def train_step(xb, yb):
        return strategy.reduce("SUM", strategy.run(replica_step, args=(xb, yb)), axis=None)

    history = keras.callbacks.History()
    callbacks = keras.callbacks.CallbackList(callbacks + [history], model=model)
    callbacks.on_train_begin()
    for epoch in range(epochs):
        callbacks.on_epoch_begin(epoch)
        losses = []
        for batch, (xb, yb) in enumerate(batches):
            callbacks.on_train_batch_begin(batch)
            losses.append(float(train_step(xb, yb)))
            callbacks.on_train_batch_end(batch, {"loss": losses[-1]})
        callbacks.on_epoch_end(epoch, {"loss": float(np.mean(losses))})
    callbacks.on_train_end()
    return history


def state(model):
    """The QAT state of every QAT layer (either Keras version), by layer name."""
    out = {}
    for layer in model.layers:
        entry = {}
        if hasattr(layer, "range") and hasattr(layer, "initialized"):
            entry["range"] = [float(np.asarray(layer.range["min"])), float(np.asarray(layer.range["max"]))]
        if getattr(layer, "has_bn", False):
            entry["moving_mean"] = np.asarray(layer.moving_mean).tolist()
            entry["moving_variance"] = np.asarray(layer.moving_variance).tolist()
            entry["bn_frozen"] = bool(np.asarray(layer.bn_frozen))
        if hasattr(layer, "quant_active"):
            entry["quant_active"] = bool(np.asarray(layer.quant_active))
        if hasattr(layer, "kernel"):
            entry["kernel"] = np.asarray(layer.kernel).ravel().tolist()
        if entry:
            out[layer.name] = entry
    return out


def main():
    keras.utils.set_random_seed(0)
    x, y = data()
    model = float_model()  # the same initial weights in every process (seeded), outside the strategy
    with strategy.scope():
        qm = qtoolkit.quantize_model(model, "int8", ema_decay=0.9)
        qm.compile(keras.optimizers.SGD(0.1, momentum=0.5),
                   keras.losses.SparseCategoricalCrossentropy(from_logits=True), metrics=["accuracy"])
    callback = QuantizationCallback(validation_data=(x[:32], y[:32]), quant_delay=QUANT_DELAY,
                                    bn_freeze_step=BN_FREEZE, best_path=args.best_path)
    recorder = Recorder(args.kill_after_epoch)
    callbacks = [callback]
    if args.backup:
        callbacks.append(keras.callbacks.BackupAndRestore(args.backup))
    callbacks.append(recorder)
    if args.loop == "custom":
        with strategy.scope():
            qm.optimizer.build(qm.trainable_variables)
        history = custom_fit(qm, x, y, args.epochs, callbacks)
    else:
        history = qm.fit(x, y, batch_size=GLOBAL_BATCH, epochs=args.epochs, shuffle=False, verbose=0,
                         callbacks=callbacks)
    if args.export:
        qtoolkit.export_tflite(qm, args.export if qat.is_chief(qm) else None)
    result = {"state": state(qm), "iterations": int(np.asarray(qm.optimizer.iterations)), "step": callback.step,
              "best": None if not np.isfinite(callback.best) else float(callback.best),
              "first_epoch": recorder.first_epoch, "chief": qat.is_chief(qm),
              "epochs_run": len(history.history.get("loss", [])),
              "val_int8_accuracy": history.history.get("val_int8_accuracy"),
              "num_replicas": strategy.num_replicas_in_sync}
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, f"result_{args.tag}.json"), "w") as f:
        json.dump(result, f)


if __name__ == "__main__":
    main()
