"""Keras callbacks for quantization-aware training.

    qat_model = qtoolkit.quantize_model(model, "int8")
    qat_model.fit(x, y, epochs=5, callbacks=[
        QuantizationCallback(validation_data=(x_val, y_val), quant_delay=200, bn_freeze_step=1000,
                             best_path="best_int8.tflite"),
        keras.callbacks.EarlyStopping(monitor="val_int8_accuracy", mode="max", patience=2),
    ])

The callback drives the schedule of the paper (section 3.2): fake quant is
off for the first `quant_delay` steps (ranges are still learned), batch-norm
statistics are frozen at `bn_freeze_step`, ranges at `range_freeze_step`.
At the end of every `export_every` epochs it exports the int8 TFLite model,
runs it with the LiteRT interpreter on the validation data and puts
`val_int8_accuracy` and `val_int8_sim_gap` (max |Keras QAT - TFLite| in
output steps) into the epoch logs, where TensorBoard, EarlyStopping and
ModelCheckpoint (placed after this callback) see them.  Multi-output models
get these per output, segmentation and detection heads per pixel / anchor,
and a user's metric per output (see QuantizationCallback).

Resumable and multi-worker (docs/distributed.md): the schedule's step is the
optimizer's `iterations`, so a run restored by BackupAndRestore or
ModelCheckpoint goes on with the schedule where it was; the best score is
kept beside `best_path` (`best_path + ".json"`) and read back when a
restored run starts. Under MultiWorkerMirroredStrategy every worker measures
(the logs agree, so EarlyStopping stops all or none) and only the chief writes.
"""

from __future__ import annotations

from typing import Optional

import numpy as np
import tf_keras as keras

from qtoolkit.qat import export_tflite, is_chief, set_schedule, student_of


class QuantizationCallback(keras.callbacks.Callback):
    """QAT schedule + per-epoch int8 export and LiteRT evaluation, for any outputs and tasks.

    Args:
      validation_data: (x, y) or None (no int8 evaluation).  `x`: an array, or one per model input; `y`: labels
        of the first output, or one per output (a list, or a dict keyed by output name; None for an output
        without labels), per position for per-pixel or per-anchor outputs.
      quant_delay: training steps before fake quant is applied. Steps are the optimizer's `iterations` (restored
        with the model: a resumed run does not replay the schedule).
      bn_freeze_step: step at which batch-norm statistics freeze (None: never).
      range_freeze_step: step at which activation ranges freeze (None: never).
      export_every: evaluate the int8 model every this many epochs.
      best_path: keep the best int8 model (by val_int8_accuracy, else the user's metric) here; without either,
        the latest. Its score goes to `best_path + ".json"`, read back when a restored run (optimizer step > 0)
        starts, so that a restart keeps the best-so-far. Only the chief (`qat.is_chief`) writes.
      io_dtype: exported model inputs/outputs.
      output_tasks: "classification", "regression" or "auto", for all outputs or per output (see verify).
      metrics: a function (outputs, labels) -> float (higher is better), or one per output: logged as
        `val_int8_<name>` (and `val_qat_<name>` for the Keras model).
      verbose: print the int8 accuracy each time it is measured.

    Logs (single-output model): val_int8_accuracy, val_qat_accuracy, val_int8_sim_gap.  With several
    outputs, each output's `val_int8_<output>_accuracy`, `val_qat_<output>_accuracy`,
    `val_int8_<output>_sim_gap`, plus val_int8_accuracy (mean over outputs with labels) and val_int8_sim_gap
    (the largest).  A metric that cannot be computed (e.g. labels that do not fit an output) is left out
    of the logs and said once; `fit` goes on.
    """

    def __init__(self, validation_data=None, quant_delay: int = 0, bn_freeze_step: Optional[int] = None,
                 range_freeze_step: Optional[int] = None, export_every: int = 1, best_path: Optional[str] = None,
                 io_dtype: str = "int8", verbose: int = 0, output_tasks=None, metrics=None):
        super().__init__()
        self.validation_data = validation_data
        self.quant_delay, self.bn_freeze_step, self.range_freeze_step = quant_delay, bn_freeze_step, range_freeze_step
        self.export_every, self.best_path, self.io_dtype, self.verbose = export_every, best_path, io_dtype, verbose
        self.output_tasks, self.metrics = output_tasks, metrics
        self.step = 0  # training steps done: the optimizer's iterations (restored with it), read each batch
        self.best = -np.inf
        self.history: list[dict] = []
        self._said: set = set()
        self._applied = None  # the schedule flags last set
        self._offset = 0  # steps before this optimizer's first (a model compiled again in this process)
        self._synced = False  # step and best-so-far read back in this fit (after BackupAndRestore restored)

    # -- the schedule, from the optimizer's step ------------------------------------------------
    def _optimizer_step(self) -> Optional[int]:
        """The optimizer's `iterations` (steps applied, checkpointed with the model), or None."""
        iterations = getattr(getattr(self.model, "optimizer", None), "iterations", None)
        if iterations is None:
            return None
        try:
            return int(iterations.numpy() if hasattr(iterations, "numpy") else np.asarray(iterations))
        except Exception:  # noqa: BLE001  (an optimizer whose counter cannot be read: count batches here)
            return None

    def _apply_schedule(self, force: bool = False):
        flags = (self.step >= self.quant_delay,
                 self.bn_freeze_step is not None and self.step >= self.bn_freeze_step,
                 self.range_freeze_step is not None and self.step >= self.range_freeze_step)
        if force or flags != self._applied:
            set_schedule(self.model, quant_active=flags[0], bn_frozen=flags[1], ranges_frozen=flags[2])
            self._applied = flags

    def _sync(self):
        """Step from the optimizer, schedule applied; on a resumed run (step > 0), the best-so-far read back."""
        step = self._optimizer_step()
        if step == 0 and self.step > 0:  # a new optimizer after steps this callback counted: the schedule goes on
            self._offset = self.step
        elif step is not None:  # the optimizer's own (a restored run's included)
            self._offset, self.step = 0, step
        self._apply_schedule(force=True)
        if self.step > 0 and self.best == -np.inf:
            self.best = self._read_best()

    def _state_path(self) -> Optional[str]:
        return f"{self.best_path}.json" if self.best_path else None

    def _read_best(self) -> float:
        """The best score of `best_path` (its .json beside it), written by an earlier, interrupted run."""
        import json
        import os

        path = self._state_path()
        if not path or not os.path.exists(path) or not os.path.exists(self.best_path):
            return -np.inf
        try:
            with open(path) as f:
                best = json.load(f).get("best")
        except (OSError, ValueError, AttributeError):
            return -np.inf
        return -np.inf if best is None else float(best)

    def on_train_begin(self, logs=None):
        self._synced = False
        self._sync()  # BackupAndRestore may restore after this (callbacks run in order): again at the first batch

    def on_train_batch_begin(self, batch, logs=None):
        if not self._synced:
            self._synced = True
            self._sync()
            return
        step = self._optimizer_step()
        if step is not None:
            self.step = step + self._offset
        self._apply_schedule()

    def on_train_batch_end(self, batch, logs=None):
        self.step += 1  # the optimizer's count replaces it at the next batch (steps_per_execution: several)

    def _say_once(self, key: str, message: str) -> None:
        if key not in self._said:
            self._said.add(key)
            print(f"QuantizationCallback: {message}")

    def on_epoch_end(self, epoch, logs=None):
        if self.validation_data is None or (epoch + 1) % self.export_every:
            return
        from qtoolkit import export, verify

        x, y = self.validation_data
        data, _ = export_tflite(self.model, io_dtype=self.io_dtype)
        tfl = verify.LiteRTModel(data)
        int8_out = tfl.predict(list(x) if isinstance(x, tuple) else x)
        int8_out = int8_out if isinstance(int8_out, list) else [int8_out]
        keras_out = verify.predict_keras(student_of(self.model), x, batch_size=256, all_outputs=True)
        names = export.output_names(student_of(self.model))[:len(int8_out)]
        found, score = self._measure(names, keras_out, int8_out, y, [tfl.output_step(i) for i in range(len(names))])
        logs = logs if logs is not None else {}
        logs.update(found)
        self.history.append({"epoch": epoch, **found})
        accuracy = found.get("val_int8_accuracy")
        if self.verbose:
            shown = "-" if accuracy is None else f"{accuracy:.4f}"
            print(f"epoch {epoch + 1}: int8 TFLite accuracy {shown}, simulation gap "
                  f"{found.get('val_int8_sim_gap', float('nan')):.2f} steps")
        if self.best_path and (score is None or score > self.best):
            self.best = -np.inf if score is None else score
            # Every worker measures (the logs must agree: EarlyStopping stops all or none); the chief writes.
            if is_chief(self.model):
                import json

                export.write_atomic(self.best_path, data)
                state = {"best": None if score is None else float(score), "epoch": epoch, "step": self.step}
                export.write_atomic(self._state_path(), json.dumps(state).encode())

    def _measure(self, names, keras_out, int8_out, y, steps) -> tuple[dict, Optional[float]]:
        """The epoch's logs (per output accuracy, user metric and simulation gap: what can be computed) and the
        score `best_path` keeps the best of: the int8 accuracy, else the first user metric, else None."""
        from qtoolkit import verify

        several = len(names) > 1
        try:
            labels = verify.per_output(y, names, "labels")
            tasks = verify.per_output(self.output_tasks, names, "output_tasks")
            metrics = verify.per_output(self.metrics, names, "metrics")
        except ValueError as e:
            self._say_once("per_output", f"{e}; int8 metrics other than the simulation gap are skipped")
            labels = tasks = metrics = [None] * len(names)
        found, accuracies, gaps, metric_values = {}, [], [], []
        for name, ref, out, lab, task, metric, step in zip(names, keras_out, int8_out, labels, tasks, metrics,
                                                            steps):
            tag = f"{name}_" if several else ""
            try:
                cmp = verify.compare(ref, out, lab, step, task or "auto", metric)
            except ValueError as e:  # labels or task that do not fit this output: say so, keep training
                self._say_once(name, f"output {name!r}: {e}; its accuracy/metric is skipped")
                cmp = verify.compare(ref, out, None, step, "regression")
            if cmp.candidate_accuracy is not None:
                found[f"val_int8_{tag}accuracy"] = cmp.candidate_accuracy
                found[f"val_qat_{tag}accuracy"] = cmp.reference_accuracy
                accuracies.append(cmp.candidate_accuracy)
            if cmp.metric_name:
                found[f"val_int8_{tag}{cmp.metric_name}"] = cmp.candidate_metric
                found[f"val_qat_{tag}{cmp.metric_name}"] = cmp.reference_metric
                metric_values.append(cmp.candidate_metric)
            if cmp.max_error_steps is not None:
                found[f"val_int8_{tag}sim_gap"] = cmp.max_error_steps
                gaps.append(cmp.max_error_steps)
        if several and accuracies:
            found["val_int8_accuracy"] = float(np.mean(accuracies))
        if several and gaps:
            found["val_int8_sim_gap"] = max(gaps)
        accuracy = found.get("val_int8_accuracy")
        return found, accuracy if accuracy is not None else (metric_values[0] if metric_values else None)


def fine_tune(qat_model, x, y, *, epochs: int = 1, batch_size: int = 64, learning_rate: float = 1e-4,
              seed: int = 0, bn_freeze_step: Optional[int] = None, quant_delay: int = 0,
              validation_data=None, verbose: int = 0):
    """The fine-tuning recipe of the benchmarks and the regression job: Adam, fixed seed, deterministic ops.

    Args:
      qat_model: a model from `quantize_model` (logits output, integer labels).
      x, y: training inputs and labels.
      epochs, batch_size, learning_rate, seed: the recipe.
      bn_freeze_step: step after which batch-norm statistics are frozen
        (default: half-way through, as the paper recommends freezing late).
      quant_delay: steps before fake quant is applied.
      validation_data: (x, y) for the callback's int8 TFLite accuracy each epoch.

    Returns:
      The QuantizationCallback (its `history` has the int8 accuracies when validation_data is given).
    """
    import tensorflow as tf

    keras.utils.set_random_seed(seed)
    tf.config.experimental.enable_op_determinism()
    steps = epochs * -(-len(x) // batch_size)
    callback = QuantizationCallback(validation_data, quant_delay=quant_delay,
                                    bn_freeze_step=steps // 2 if bn_freeze_step is None else bn_freeze_step)
    qat_model.compile(keras.optimizers.Adam(learning_rate),
                      keras.losses.SparseCategoricalCrossentropy(from_logits=True), ["accuracy"])
    qat_model.fit(x, y, batch_size=batch_size, epochs=epochs, verbose=verbose, shuffle=True, callbacks=[callback])
    return callback
