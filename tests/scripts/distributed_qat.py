"""Run by tests/test_qat.py in a fresh process: QAT under MirroredStrategy on two
logical CPUs vs one device, same global batches; prints the largest differences."""

import json
import os
import sys

os.environ["TF_USE_LEGACY_KERAS"] = "1"
import tensorflow as tf  # noqa: E402

cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
import numpy as np  # noqa: E402
import tf_keras as keras  # noqa: E402

import models  # noqa: E402
from qtoolkit import qat  # noqa: E402
from qtoolkit.rewrite.qat_layers import QATFoldedConv, QATQuantizeActivation  # noqa: E402


def run(strategy):
    keras.utils.set_random_seed(0)
    with strategy.scope():
        model = models.conv_bn_relu((8, 8, 1))
        qm = qat.quantize_model(model, "int8", ema_decay=0.9)
        qm.compile(keras.optimizers.SGD(0.0), keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    rng = np.random.default_rng(0)
    x = rng.uniform(-1, 2, (64, 8, 8, 1)).astype(np.float32)
    y = rng.integers(0, 5, 64)
    qm.fit(x, y, batch_size=16, epochs=1, shuffle=False, verbose=0)
    ranges = [l.get_range() for l in qm.layers if isinstance(l, QATQuantizeActivation)]
    stats = [np.concatenate([l.moving_mean.numpy(), l.moving_variance.numpy()])
             for l in qm.layers if isinstance(l, QATFoldedConv) and l.has_bn]
    return np.array(ranges), stats


one_r, one_s = run(tf.distribute.OneDeviceStrategy("/cpu:0"))
two_r, two_s = run(tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"]))
print(json.dumps({"range_diff": float(np.abs(one_r - two_r).max()),
                  "stats_diff": float(max(np.abs(a - b).max() for a, b in zip(one_s, two_s))),
                  "ranges": one_r.tolist()}))
