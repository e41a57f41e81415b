"""Distributed and resumable QAT (issue 24): multi-worker training on localhost, kill-and-resume, the callback.

The slow tests run tests/scripts/qat_worker.py in fresh processes (tf.distribute's cluster is fixed at TensorFlow
start-up; a killed run must really die): two MultiWorkerMirroredStrategy workers on loopback ports against one
process on the same global batches, and a run killed after epoch 2 of 4 (os._exit) restarted with
BackupAndRestore against the uninterrupted run, in tf_keras and Keras 3. The fast tests check the callback's
resume logic in-process. See docs/distributed.md.
"""

import json
import os
import socket
import subprocess
import sys

import keras as keras3
import numpy as np
import pytest
import tf_keras as keras

import qtoolkit
from qtoolkit import verify
from qtoolkit.callbacks import QuantizationCallback

WORKER = os.path.join(os.path.dirname(__file__), "scripts", "qat_worker.py")
TIMEOUT = 240
STEPS_PER_EPOCH = 4  # qat_worker.py: 64 examples, global batch 16
QUANT_DELAY, BN_FREEZE = 2, 6  # qat_worker.py's schedule


# -- processes --------------------------------------------------------------------------------------
def _env(tf_config=None):
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", CUDA_VISIBLE_DEVICES="")
    env.pop("TF_USE_LEGACY_KERAS", None)
    env.pop("TF_CONFIG", None)
    if tf_config is not None:
        env["TF_CONFIG"] = json.dumps(tf_config)
    return env


def _start(args, tf_config=None):
    return subprocess.Popen([sys.executable, WORKER, *args], env=_env(tf_config), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def _finish(procs, expect_rc=0):
    """Waits for every process (kills all on a timeout); asserts each return code (unless expect_rc is None),
    showing the error's tail. Returns their stderr."""
    outputs = []
    try:
        for proc in procs:
            outputs.append(proc.communicate(timeout=TIMEOUT))
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.communicate()
    for proc, (_, err) in zip(procs, outputs):
        if expect_rc is None:
            continue
        assert proc.returncode == expect_rc, f"return code {proc.returncode}:\n" + "\n".join(
            line for line in err.splitlines()[-60:] if not line.startswith(("I0000", "W0000", "E0000")))
    return [err for _, err in outputs]


def _free_ports(n):
    """n free TCP ports on the loopback interface (held together while chosen, so that they differ)."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _result(out, tag):
    with open(os.path.join(out, f"result_{tag}.json")) as f:
        return json.load(f)


def _assert_same_state(a, b, atol):
    """Ranges, batch-norm statistics, kernels within atol; schedule flags equal."""
    assert a.keys() == b.keys()
    for name in a:
        for key, value in a[name].items():
            if isinstance(value, bool):
                assert value == b[name][key], (name, key)
            else:
                np.testing.assert_allclose(value, b[name][key], rtol=0, atol=atol, err_msg=f"{name}.{key}")


def _assert_within_one_step(path_a, path_b):
    """Two int8 files give the same outputs within one output step on the same inputs."""
    with open(path_a, "rb") as f:
        a = verify.LiteRTModel(f.read())
    with open(path_b, "rb") as f:
        b = verify.LiteRTModel(f.read())
    x = np.random.default_rng(1).uniform(-1, 2, (64, 8, 8, 1)).astype(np.float32)
    gap = np.abs(a.predict(x) - b.predict(x)).max()
    assert gap <= max(a.output_step(0), b.output_step(0)) * (1 + 1e-3), gap


def _check_trained_state(r):
    """The schedule was run from the optimizer's step: 2 epochs of 4 steps, quant on at 2, BN frozen at 6."""
    assert r["iterations"] == r["step"] == 2 * STEPS_PER_EPOCH
    flags = [(e.get("quant_active"), e.get("bn_frozen")) for e in r["state"].values()]
    assert all(q is not False for q, _ in flags) and any(f is True for _, f in flags)


# -- multi-worker -----------------------------------------------------------------------------------
def _multi_worker(tmp_path, version, loop, expect_rc=0):
    """Two MWMS workers on loopback ports and one process on the same global batches; results and files."""
    out = str(tmp_path)
    cluster = {"worker": [f"127.0.0.1:{p}" for p in _free_ports(2)]}
    procs = []
    for i in range(2):
        os.makedirs(os.path.join(out, f"w{i}"))
        procs.append(_start(["--keras", version, "--out", out, "--tag", f"w{i}", "--mwms", "--loop", loop,
                             "--best-path", os.path.join(out, f"w{i}", "best.tflite"),
                             "--export", os.path.join(out, f"w{i}", "model.tflite")],
                            {"cluster": cluster, "task": {"type": "worker", "index": i}}))
    os.makedirs(os.path.join(out, "single"))
    procs.append(_start(["--keras", version, "--out", out, "--tag", "single",
                         "--export", os.path.join(out, "single", "model.tflite")]))
    errors = _finish(procs, expect_rc)
    if expect_rc is None and not os.path.exists(os.path.join(out, "result_w0.json")):
        return errors
    return out, [_result(out, "w0"), _result(out, "w1")], _result(out, "single")


def _check_multi_worker(out, workers, single):
    w0, w1 = workers
    assert [w0["num_replicas"], w1["num_replicas"], single["num_replicas"]] == [2, 2, 1]
    assert [w0["chief"], w1["chief"]] == [True, False]
    for r in (w0, w1, single):
        _check_trained_state(r)
    _assert_same_state(w0["state"], w1["state"], atol=1e-6)       # synchronized across workers
    _assert_same_state(w0["state"], single["state"], atol=1e-5)   # = one process on the global batch
    # The callback's int8 evaluation ran on every worker (the logs agree, for EarlyStopping & co.) ...
    assert w0["val_int8_accuracy"] == w1["val_int8_accuracy"] == single["val_int8_accuracy"]
    assert w0["best"] == w1["best"] is not None
    # ... and only the chief wrote files (the callback's best model and its .json; the final export).
    assert sorted(os.listdir(os.path.join(out, "w0"))) == ["best.tflite", "best.tflite.json", "model.tflite"]
    assert os.listdir(os.path.join(out, "w1")) == []
    _assert_within_one_step(os.path.join(out, "w0", "model.tflite"), os.path.join(out, "single", "model.tflite"))


@pytest.mark.slow
def test_multi_worker_tf_keras_fit_equals_one_process(tmp_path):
    """tf_keras fit under MultiWorkerMirroredStrategy, 2 workers: ranges (EMA of the global batch's min/max),
    BN statistics, schedule and weights equal on both workers and equal one process's; only the chief writes."""
    _check_multi_worker(*_multi_worker(tmp_path, "2", "fit"))


@pytest.mark.slow
def test_multi_worker_keras3_layers_equal_one_process(tmp_path):
    """The Keras 3 QAT layers under MultiWorkerMirroredStrategy (2 workers, a strategy.run training loop driving
    the callback through a CallbackList) equal one process's Keras 3 fit; only the chief writes."""
    _check_multi_worker(*_multi_worker(tmp_path, "3", "custom"))


@pytest.mark.slow
def test_multi_worker_keras3_fit(tmp_path):
    """Keras 3's own fit fails under MultiWorkerMirroredStrategy with more than one worker, for any model (its
    TensorFlow trainer's _maybe_symbolic_build reduces the first batch's (x, y) tuple, which the collective
    strategy cannot convert: keras-team/keras#20585, tensorflow#72388; docs/distributed.md). Expected to fail
    with that error; a Keras that fixes it fails this test so that the docs and the Keras 3 test get updated."""
    found = _multi_worker(tmp_path, "3", "fit", expect_rc=None)
    if isinstance(found, list):  # the workers failed: with Keras' known error, nothing of qtoolkit's
        assert all("_maybe_symbolic_build" in err and "PerReplica" in err for err in found[:2]), found[0][-3000:]
        pytest.xfail("Keras 3 fit under MultiWorkerMirroredStrategy: keras-team/keras#20585")
    _check_multi_worker(*found)
    pytest.fail("Keras 3 fit now trains under MultiWorkerMirroredStrategy: update docs/distributed.md and test it")


@pytest.mark.slow
def test_keras3_mirrored_fit_equals_one_process(tmp_path):
    """Keras 3 fit under MirroredStrategy (two logical CPUs): the same QAT state as one device."""
    out = str(tmp_path)
    _finish([_start(["--keras", "3", "--out", out, "--tag", "mirrored", "--mirrored"]),
             _start(["--keras", "3", "--out", out, "--tag", "single"])])
    mirrored, single = _result(out, "mirrored"), _result(out, "single")
    assert mirrored["num_replicas"] == 2
    _check_trained_state(mirrored)
    _assert_same_state(mirrored["state"], single["state"], atol=1e-5)


# -- kill and resume --------------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("version", ["2", "3"])
def test_killed_run_resumes_and_exports_the_uninterrupted_model(tmp_path, version):
    """A run killed (os._exit) after epoch 2 of 4 restarts with BackupAndRestore at epoch 3, the callback's step
    from the restored optimizer (quant delay and BN freeze not replayed) and its best-so-far from best_path's
    .json, and ends with the uninterrupted run's QAT state and int8 model."""
    out = str(tmp_path)
    full, resumed = os.path.join(out, "full"), os.path.join(out, "resumed")
    os.makedirs(full)
    os.makedirs(resumed)
    common = ["--keras", version, "--out", out, "--epochs", "4"]
    run = common + ["--backup", os.path.join(resumed, "backup"), "--best-path",
                    os.path.join(resumed, "best.tflite"), "--export", os.path.join(resumed, "model.tflite")]
    uninterrupted = _start(common + ["--tag", "full", "--best-path", os.path.join(full, "best.tflite"),
                                     "--export", os.path.join(full, "model.tflite")])
    _finish([_start(run + ["--tag", "killed", "--kill-after-epoch", "1"])], expect_rc=3)
    assert not os.path.exists(os.path.join(out, "result_killed.json"))  # it died after epoch 2
    assert os.path.exists(os.path.join(resumed, "backup")) and not os.path.exists(os.path.join(resumed,
                                                                                               "model.tflite"))
    with open(os.path.join(resumed, "best.tflite.json")) as f:
        before_restart = json.load(f)
    _finish([_start(run + ["--tag", "resumed"])])
    _finish([uninterrupted])
    a, b = _result(out, "full"), _result(out, "resumed")
    assert a["first_epoch"] == 0 and a["epochs_run"] == 4
    assert b["first_epoch"] == 2 and b["epochs_run"] == 2  # resumed at epoch 3, not restarted
    assert a["iterations"] == b["iterations"] == b["step"] == 4 * STEPS_PER_EPOCH
    _assert_same_state(a["state"], b["state"], atol=1e-6)
    assert a["val_int8_accuracy"][2:] == b["val_int8_accuracy"] and a["best"] == b["best"]
    with open(os.path.join(full, "best.tflite.json")) as f:
        best_full = json.load(f)
    with open(os.path.join(resumed, "best.tflite.json")) as f:
        best_resumed = json.load(f)
    # The best model came before the kill (so a best-so-far lost in the restart would show: the resumed run's
    # first evaluation would overwrite it); the resumed run kept it.
    assert best_full["epoch"] < 2 and before_restart == best_full and best_resumed == best_full
    _assert_within_one_step(os.path.join(full, "model.tflite"), os.path.join(resumed, "model.tflite"))
    _assert_within_one_step(os.path.join(full, "best.tflite"), os.path.join(resumed, "best.tflite"))


@pytest.mark.slow
def test_multi_worker_tf_keras_killed_run_resumes(tmp_path):
    """Both MWMS workers killed after epoch 2 of 4 (tf_keras BackupAndRestore: the chief's checkpoint, read back
    by every worker) restart on new ports at epoch 3 and end with one process's uninterrupted QAT state."""
    out = str(tmp_path)
    backup = os.path.join(out, "backup")

    def workers(tag, extra):
        cluster = {"worker": [f"127.0.0.1:{p}" for p in _free_ports(2)]}
        return [_start(["--keras", "2", "--out", out, "--tag", f"{tag}{i}", "--mwms", "--epochs", "4", "--backup",
                        backup, "--best-path", os.path.join(out, f"w{i}", "best.tflite"), *extra],
                       {"cluster": cluster, "task": {"type": "worker", "index": i}}) for i in range(2)]

    for i in range(2):
        os.makedirs(os.path.join(out, f"w{i}"))
    uninterrupted = _start(["--keras", "2", "--out", out, "--tag", "full", "--epochs", "4"])
    _finish(workers("killed", ["--kill-after-epoch", "1"]), expect_rc=3)
    _finish(workers("resumed", []))
    _finish([uninterrupted])
    full = _result(out, "full")
    for i in range(2):
        r = _result(out, f"resumed{i}")
        assert r["first_epoch"] == 2 and r["epochs_run"] == 2 and r["num_replicas"] == 2
        assert r["iterations"] == r["step"] == 4 * STEPS_PER_EPOCH
        _assert_same_state(full["state"], r["state"], atol=1e-5)
        assert r["val_int8_accuracy"] == full["val_int8_accuracy"][2:]
    assert os.listdir(os.path.join(out, "w1")) == []


# -- fast: the callback's resume logic --------------------------------------------------------------
def _tiny_qat_model(version):
    k = keras3 if version == "3" else keras
    inp = k.Input((4, 4, 1))
    x = k.layers.Conv2D(2, 3, use_bias=False, name="conv")(inp)
    x = k.layers.BatchNormalization(name="bn")(x)
    x = k.layers.ReLU(name="relu")(x)
    out = k.layers.Dense(3, name="fc")(k.layers.Flatten()(x))
    qm = qtoolkit.quantize_model(k.Model(inp, out), "int8")
    qm.compile(k.optimizers.SGD(0.01), k.losses.SparseCategoricalCrossentropy(from_logits=True))
    return qm, k


def _flags(qm):
    conv = next(layer for layer in qm.layers if hasattr(layer, "bn_frozen"))
    return bool(np.asarray(conv.quant_active)), bool(np.asarray(conv.bn_frozen))


@pytest.mark.parametrize("version", ["2", "3"])
def test_callback_step_comes_from_the_optimizer_and_best_from_its_file(tmp_path, version):
    qm, _ = _tiny_qat_model(version)
    best = tmp_path / "best.tflite"
    best.write_bytes(b"an earlier run's model")
    (tmp_path / "best.tflite.json").write_text(json.dumps({"best": 0.75, "epoch": 1, "step": 8}))

    def callback():
        cb = QuantizationCallback(quant_delay=5, bn_freeze_step=10, best_path=str(best))
        cb.set_model(qm)
        return cb

    # A fresh run (the optimizer at step 0): quant delayed, BN not frozen, an old .json ignored.
    cb = callback()
    cb.on_train_begin()
    cb.on_train_batch_begin(0)
    assert cb.step == 0 and cb.best == -np.inf and _flags(qm) == (False, False)
    # Restored (BackupAndRestore / ModelCheckpoint put the optimizer at step 7, after this on_train_begin ran):
    # a new callback takes the step at the first batch, the best-so-far from the .json.
    cb = callback()
    cb.on_train_begin()
    qm.optimizer.iterations.assign(7)
    cb.on_train_batch_begin(0)
    assert cb.step == 7 and cb.best == 0.75 and _flags(qm) == (True, False)
    # The step follows the optimizer (steps_per_execution runs several steps between two batch calls).
    cb.on_train_batch_end(0)
    qm.optimizer.iterations.assign(12)
    cb.on_train_batch_begin(1)
    assert cb.step == 12 and _flags(qm) == (True, True)
    # Compiled again in this process (a new optimizer, at 0): the schedule goes on from the callback's count.
    cb.on_train_begin()
    qm.optimizer.iterations.assign(0)
    cb.on_train_batch_begin(0)
    qm.optimizer.iterations.assign(3)
    cb.on_train_batch_begin(1)
    assert cb.step == 15 and _flags(qm) == (True, True)
    qm.optimizer.iterations.assign(12)
    # No .json (or no model beside it): nothing to restore.
    (tmp_path / "best.tflite.json").unlink()
    cb = callback()
    cb.on_train_begin()
    cb.on_train_batch_begin(0)
    assert cb.step == 12 and cb.best == -np.inf


def test_callback_measures_on_every_worker_and_writes_only_on_the_chief(tmp_path, monkeypatch):
    """A worker that is not the chief logs the int8 metrics (all workers' logs agree) but writes nothing."""
    from qtoolkit import callbacks

    qm, _ = _tiny_qat_model("2")
    x = np.random.default_rng(0).uniform(-1, 1, (16, 4, 4, 1)).astype(np.float32)
    y = np.arange(16) % 3
    qm.fit(x, y, epochs=1, verbose=0)
    for chief, name in ((False, "worker.tflite"), (True, "chief.tflite")):
        monkeypatch.setattr(callbacks, "is_chief", lambda model, chief=chief: chief)
        cb = QuantizationCallback(validation_data=(x, y), best_path=str(tmp_path / name))
        cb.set_model(qm)
        logs = {}
        cb.on_epoch_end(0, logs)
        assert "val_int8_accuracy" in logs and cb.best == logs["val_int8_accuracy"]
    assert sorted(os.listdir(tmp_path)) == ["chief.tflite", "chief.tflite.json"]
    assert json.loads((tmp_path / "chief.tflite.json").read_text())["best"] == logs["val_int8_accuracy"]


def test_is_chief_without_a_cluster():
    qm, _ = _tiny_qat_model("2")
    assert qtoolkit.qat.is_chief(qm) and qtoolkit.qat.is_chief()
