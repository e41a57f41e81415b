"""Any model a user brings: multi-input/multi-output, segmentation, detection, subclassed, custom layers.

The models are `qtoolkit.zoo.shapes` (trained 2 epochs on digits, a few seconds each).  The comparison with
the converter for every shape (SQNR, partitions, float ops) is in `-m slow` and in docs/coverage.md
(`scripts/coverage.py`).
"""

import os
import textwrap

import numpy as np
import pytest
import tf_keras as keras
from absl.testing import flagsaver

import qtoolkit
from qtoolkit import convert, export, runtime, verify
from qtoolkit.zoo import shapes


def _x(task, test=True):
    x = task.x_test if test else task.x_train
    return x if len(x) > 1 else x[0]


@pytest.fixture(scope="module")
def two_heads():
    return shapes.trained("two_heads")


def test_two_heads_file_keeps_the_models_order_and_names_and_verifies_each_head(two_heads):
    model, task = two_heads
    x = _x(task)
    result = qtoolkit.ptq(model, {"image": x[0], "meta": x[1]}, progress=False,
                          labels={"digit": task.y_test[0][-71:], "mirror": task.y_test[1][-71:]})
    assert result.inspection.fully_quantized and result.float_layers == ()
    tfl = verify.LiteRTModel(result.tflite)
    assert [d["shape"][1:].tolist() for d in tfl.input_details()] == [[16, 16, 1], [4]]
    assert tfl.interpreter.get_signature_list()["serving_default"]["outputs"] == ["digit", "mirror"]
    # Each head of the file is the same head of the Keras model (the two have the same shape: a swap would
    # pass a shape check; here it costs ~40 dB).
    ours = tfl.predict(x)
    theirs = model.predict(x, verbose=0)
    for a, b in zip(theirs, ours):
        assert verify.sqnr_db(a, b) > 25
    assert list(result.per_output) == ["digit", "mirror"]
    for name, comparisons in result.per_output.items():
        c = comparisons["float vs TFLite"]
        assert c.sqnr_db > 25 and c.top1_agreement > 0.95 and c.candidate_accuracy is not None, name
        assert comparisons["simulated vs TFLite"].max_error_steps <= 2
    assert "output 'mirror'" in result.table()
    assert result.to_dict()["per_output"]["mirror"]["float vs TFLite"]["samples"] == c.samples


def test_debugger_measures_every_output(two_heads):
    from qtoolkit import debug

    model, task = two_heads
    report = debug.analyze(model, task.x_test, "int8", num_samples=20)
    sqnr = report.output_sqnr
    assert {"simulated digit", "simulated mirror", "tflite digit", "tflite mirror"} <= set(sqnr)
    # The joint SQNR weighs each head by its own power: between the two heads' SQNRs.
    lo, hi = sorted((sqnr["tflite digit"], sqnr["tflite mirror"]))
    assert lo <= sqnr["tflite"] <= hi
    assert {e.name for e in report.layers} >= {"digit", "mirror"}  # each head's layer is ranked


# The default suite must stay under 3 minutes on 2 cores (this one trains a U-Net); the detection test below
# checks agreement per position (per anchor) by default; runs in the accuracy-regression workflow.
@pytest.mark.slow
def test_segmentation_agreement_is_per_pixel_and_labels_are_per_pixel():
    model, task = shapes.trained("unet")
    n = 60
    result = qtoolkit.ptq(model, task.x_test[0][:-n], verification_data=task.x_test[0][-n:], progress=False,
                          labels=task.y_test[0][-n:], metrics="mean_iou", num_calibration_samples=120)
    c = result.comparisons["float vs TFLite"]
    assert c.metric_name == "mean_iou" and 0.3 < c.candidate_metric <= 1
    assert abs(c.candidate_metric - c.reference_metric) < 0.02
    assert c.task == "auto" and c.top1_agreement > 0.98  # over 60 x 16 x 16 pixels, not 768 classes
    assert 0.5 < c.candidate_accuracy <= 1 and abs(c.candidate_accuracy - c.reference_accuracy) < 0.02
    assert result.inspection.fully_quantized


def test_detection_head_tasks_per_output_and_a_user_metric():
    model, task = shapes.trained("detection")

    def box_error(outputs, labels):
        return float(np.mean(np.abs(outputs - labels)))

    result = qtoolkit.ptq(model, task.x_test[0], progress=False, num_verification_samples=50,
                          num_calibration_samples=120,
                          output_tasks={"boxes": "regression"}, metrics={"boxes": box_error},
                          labels={"boxes": task.y_test[0][-50:], "classes": task.y_test[1][-50:]})
    boxes, classes = (result.per_output[k]["float vs TFLite"] for k in ("boxes", "classes"))
    assert boxes.task == "regression" and boxes.top1_agreement is None and boxes.metric_name == "box_error"
    assert abs(boxes.candidate_metric - boxes.reference_metric) < 0.01
    assert classes.top1_agreement > 0.97 and classes.candidate_accuracy > 0.8  # per anchor
    assert "candidate box_error" in result.table()
    with pytest.raises(qtoolkit.QtoolkitError, match="labels of shape .* do not fit"):
        qtoolkit.ptq(model, task.x_test[0], progress=False, labels={"classes": task.y_test[1][:10, :3]})


def test_subclassed_model_is_traced_fully_int8_and_left_unchanged():
    model, task = shapes.trained("subclassed")
    before = [w.copy() for w in model.get_weights()]
    result = qtoolkit.ptq(model, task.x_test[0], "int8", progress=False)
    assert result.path.startswith("qtoolkit rewrite") and result.inspection.fully_quantized
    assert any("traced" in n for n in result.notes)
    assert result.comparisons["float vs TFLite"].sqnr_db > 30
    assert all(np.array_equal(a, b) for a, b in zip(before, model.get_weights()))
    unbuilt = type(model)()
    with pytest.raises(qtoolkit.QtoolkitError, match="never built or called"):
        qtoolkit.ptq(unbuilt, task.x_test[0], progress=False)


class _Loop(keras.Model):
    """A call that runs in a tf.function (AutoGraph turns the `if` into a cond) but not on symbolic tensors."""

    def __init__(self):
        super().__init__(name="loop")
        self.dense = keras.layers.Dense(8, activation="relu")

    def call(self, x):
        import tensorflow as tf

        if tf.reduce_sum(x) > 0:
            return self.dense(x)
        return self.dense(-x)


def test_untraceable_subclassed_model_goes_the_converters_way_and_says_so():
    model = _Loop()
    model(np.zeros((1, 8), np.float32))
    x = np.random.default_rng(0).normal(size=(120, 8)).astype(np.float32)
    result = qtoolkit.ptq(model, x, progress=False)
    assert "not traceable" in result.path and any("could not be traced" in n for n in result.notes)
    assert result.comparisons["float vs TFLite"].samples == 24


CUSTOM_LAYER_FILE = textwrap.dedent('''
    import tf_keras

    class ChannelScale(tf_keras.layers.Layer):
        def build(self, input_shape):
            self.gamma = self.add_weight("gamma", (int(input_shape[-1]),), initializer="ones")

        def call(self, x):
            return x * self.gamma
''')


def test_custom_layer_file_needs_custom_objects_then_converts(tmp_path, capsys):
    import sys

    from qtoolkit import user_code

    code = tmp_path / "my_layers.py"
    code.write_text(CUSTOM_LAYER_FILE)
    objects = user_code.read(str(code))
    inp = keras.Input((8, 8, 1), name="image")
    x = keras.layers.Conv2D(8, 3, padding="same", activation="relu")(inp)
    x = objects["ChannelScale"](name="scale")(x)
    model = keras.Model(inp, keras.layers.Dense(4)(keras.layers.GlobalAveragePooling2D()(x)))
    path = str(tmp_path / "custom.keras")
    model.save(path)
    for name in [m for m in sys.modules if m.startswith("qtoolkit_user_code_")]:
        del sys.modules[name]  # as in a fresh process: Keras cannot import the class's module
    np.save(tmp_path / "calib.npy", np.random.default_rng(0).random((40, 8, 8, 1), np.float32))
    out = tmp_path / "m.tflite"
    flags = dict(model=path, output=str(out), calibration_data=str(tmp_path / "calib.npy"))
    with flagsaver.flagsaver(**flags):
        assert convert.main(["convert"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "ChannelScale" in err[0] and "--custom_objects" in err[0], err
    assert not out.exists()
    with flagsaver.flagsaver(**flags, custom_objects=str(code)):
        assert convert.main(["convert"]) in (0, None)
    assert export.inspect(out.read_bytes()).fully_quantized


@pytest.mark.parametrize("flags,fragment", [
    (dict(output_tasks="boxes=regression"), "no output named 'boxes'"),
    (dict(output_tasks="segmentation"), "choose auto, classification, regression"),
    (dict(output_metrics="digit=iou"), "--output_metrics digit=iou: choose mean_iou"),
    (dict(calibration_data="MISSING_META"), "no array named meta"),
])
def test_multi_input_bad_input_is_one_line(two_heads, tmp_path, capsys, flags, fragment):
    model, task = two_heads
    path = str(tmp_path / "two.keras")
    model.save(path)
    x = _x(task)
    np.savez(tmp_path / "cal.npz", image=x[0], meta=x[1])
    np.savez(tmp_path / "MISSING_META.npz", image=x[0])
    flags = {"calibration_data": str(tmp_path / "cal.npz"), **flags}
    if flags["calibration_data"] == "MISSING_META":
        flags["calibration_data"] = str(tmp_path / "MISSING_META.npz")
    with flagsaver.flagsaver(model=path, output=str(tmp_path / "m.tflite"), **flags):
        assert convert.main(["convert"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and fragment in err[0], err
    assert not os.path.exists(tmp_path / "m.tflite")


def test_strict_reads_the_written_file():
    inp = keras.Input((6, 8))
    x = keras.layers.LayerNormalization(axis=1, name="ln")(inp)  # over tokens: no int8 lowering
    model = keras.Model(inp, keras.layers.Dense(4, name="head")(keras.layers.Flatten()(x)))
    x = np.random.default_rng(0).normal(size=(60, 6, 8)).astype(np.float32)
    result = qtoolkit.ptq(model, x, progress=False)
    assert result.float_layers == ("ln",)  # named from the file's float ops, not predicted
    with pytest.raises(qtoolkit.QtoolkitError, match="--strict: .* float .*ln"):
        qtoolkit.ptq(model, x, progress=False, strict=True)


def test_callback_metrics_per_output_never_stop_fit(capsys):
    from qtoolkit.callbacks import QuantizationCallback

    rng = np.random.default_rng(0)
    ref = [rng.normal(size=(20, 10)).astype(np.float32), rng.normal(size=(20, 16, 16, 3)).astype(np.float32)]
    out = [r + 0.01 for r in ref]
    cb = QuantizationCallback(output_tasks={"mask": "classification"})
    found, _ = cb._measure(["digit", "mask"], ref, out, [rng.integers(0, 10, 20), rng.integers(0, 3, 5)], [0.1, 0.1])
    assert "val_int8_digit_accuracy" in found and "val_int8_mask_accuracy" not in found
    assert found["val_int8_mask_sim_gap"] == pytest.approx(0.1, rel=1e-3)
    cb._measure(["digit", "mask"], ref, out, [None, rng.integers(0, 3, 5)], [0.1, 0.1])
    said = [line for line in capsys.readouterr().out.splitlines() if "QuantizationCallback" in line]
    assert len(said) == 1 and "'mask'" in said[0]  # said once, not every epoch


@pytest.mark.slow
def test_weight_changing_algorithms_leave_the_users_model_unchanged():
    """CLE and bias correction rewrite weights: qtoolkit's layers, never the model's own."""
    model, task = shapes.trained("unet")
    before = [w.copy() for w in model.get_weights()]
    qtoolkit.ptq(model, task.x_test[0], "int8_per_tensor_cle", progress=False)
    assert all(np.array_equal(a, b) for a, b in zip(before, model.get_weights()))


@pytest.mark.slow
@pytest.mark.parametrize("name", ["two_heads", "unet"])
def test_qat_callback_one_epoch_leaves_the_float_model_unchanged(name):
    from qtoolkit.callbacks import QuantizationCallback

    model, task = shapes.trained(name)
    before = [w.copy() for w in model.get_weights()]
    x, y = _x(task, False), task.y_train if len(task.y_train) > 1 else task.y_train[0]
    qat = qtoolkit.quantize_model(model, "int8", calibration_data=x)
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=name != "unet")
    qat.compile(keras.optimizers.Adam(1e-4), [loss] * len(task.tasks) if len(task.tasks) > 1 else loss)
    yt = task.y_test if len(task.y_test) > 1 else task.y_test[0]
    history = qat.fit(x, y, epochs=1, batch_size=64, verbose=0, callbacks=[QuantizationCallback((_x(task), yt))])
    keys = set(history.history)
    if name == "two_heads":
        assert {"val_int8_digit_accuracy", "val_int8_mirror_accuracy", "val_int8_accuracy"} <= keys
    assert history.history["val_int8_accuracy"][-1] > 0.6
    logs = {k: v[-1] for k, v in history.history.items()}
    for key in [k for k in logs if k.startswith("val_int8_") and k.endswith("accuracy")
                and k.replace("val_int8_", "val_qat_") in logs]:
        # The file computes what was trained, per output (the max step gap on single pixels of the U-Net's
        # softmax is larger: 10 steps measured; issue 23 tracks the 1-step goal).
        assert abs(logs[key] - logs[key.replace("val_int8_", "val_qat_")]) <= 0.005, key
    assert all(np.array_equal(a, b) for a, b in zip(before, model.get_weights()))


@pytest.mark.slow
@pytest.mark.parametrize("name", shapes.NAMES)
def test_every_shape_fully_int8_at_least_the_converters_sqnr_and_partitions(name):
    model, task = shapes.trained(name)
    x = _x(task)
    ours = qtoolkit.ptq(model, x, progress=False)
    cal = x if isinstance(x, list) else [x]
    n = ours.comparisons["float vs TFLite"].samples

    def representative():
        for i in range(len(cal[0]) - n):
            yield [a[i:i + 1] for a in cal]

    theirs = export.converter_ptq_tflite(model, representative)
    ver = [a[-n:] for a in cal]
    their_out = verify.LiteRTModel(theirs).predict(ver)
    their_out = their_out if isinstance(their_out, list) else [their_out]
    assert ours.inspection.fully_quantized
    for out_name, theirs_i in zip(ours.per_output, their_out):
        reference = ours.per_output[out_name]
        ref = verify.predict_keras(model, ver, all_outputs=True)[list(ours.per_output).index(out_name)]
        assert reference["float vs TFLite"].sqnr_db >= verify.sqnr_db(ref, theirs_i) - 0.5, out_name
    assert runtime.delegation(ours.tflite).partitions <= runtime.delegation(theirs).partitions


def test_a_litert_abort_is_one_error_line_and_the_process_lives():
    inp = keras.Input((16, 32))
    x = keras.layers.LayerNormalization(name="ln1")(inp)  # its int16x8 kernels abort in this LiteRT
    model = keras.Model(inp, keras.layers.Dense(10)(keras.layers.GlobalAveragePooling1D()(x)))
    x = np.random.default_rng(0).normal(size=(60, 16, 32)).astype(np.float32)
    try:
        qtoolkit.ptq(model, x, "int16x8", progress=False)
    except qtoolkit.QtoolkitError as e:
        assert "LiteRT aborted (SIGABRT) while running the int16x8 file" in str(e)
        assert "converter's own file aborts too" in str(e) and "\n" not in str(e)
    else:
        pytest.skip("this LiteRT runs LayerNormalization in int16x8: nothing aborts to contain")


@pytest.mark.parametrize("name", [n if n in ("two_heads", "unet", "subclassed") else
                                  pytest.param(n, marks=pytest.mark.slow) for n in shapes.NAMES])
def test_misshaped_data_for_each_model_shape_is_one_line(name, tmp_path, capsys):
    model = shapes.BUILDERS[name]()
    path = str(tmp_path / f"{name}.keras")
    model.save(path)
    if name == "two_heads":
        data = tmp_path / "cal.npz"
        np.savez(data, image=np.zeros((20, 16, 16, 1), np.float32), meta=np.zeros((20, 5), np.float32))
        fragment = "meta"
    else:
        data = tmp_path / "cal.npy"
        np.save(data, np.zeros((20, 7, 3), np.float32))
        fragment = "shape"
    with flagsaver.flagsaver(model=path, output=str(tmp_path / "m.tflite"), calibration_data=str(data),
                             custom_objects=None):
        assert convert.main(["convert"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and fragment in err[0], err
    assert not os.path.exists(tmp_path / "m.tflite")
