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
ModelCheckpoint (placed after this callback) see them.
"""

from __future__ import annotations

from typing import Optional

import numpy as np
import tf_keras as keras

from qtoolkit.qat import export_tflite, set_schedule


class QuantizationCallback(keras.callbacks.Callback):
    """QAT schedule + per-epoch int8 export and LiteRT evaluation.

    Args:
      validation_data: (x, y) with integer labels, or None (no int8 evaluation).
      quant_delay: training steps before fake quant is applied.
      bn_freeze_step: step at which batch-norm statistics freeze (None: never).
      range_freeze_step: step at which activation ranges freeze (None: never).
      export_every: evaluate the int8 model every this many epochs.
      best_path: keep the best int8 model (by val_int8_accuracy) here.
      io_dtype: exported model inputs/outputs.
      verbose: print the int8 accuracy each time it is measured.
    """

    def __init__(self, validation_data=None, quant_delay: int = 0, bn_freeze_step: Optional[int] = None,
                 range_freeze_step: Optional[int] = None, export_every: int = 1, best_path: Optional[str] = None,
                 io_dtype: str = "int8", verbose: int = 0):
        super().__init__()
        self.validation_data = validation_data
        self.quant_delay, self.bn_freeze_step, self.range_freeze_step = quant_delay, bn_freeze_step, range_freeze_step
        self.export_every, self.best_path, self.io_dtype, self.verbose = export_every, best_path, io_dtype, verbose
        self.step = 0
        self.best = -np.inf
        self.history: list[dict] = []

    def _apply_schedule(self):
        set_schedule(self.model,
                     quant_active=self.step >= self.quant_delay,
                     bn_frozen=self.bn_freeze_step is not None and self.step >= self.bn_freeze_step,
                     ranges_frozen=self.range_freeze_step is not None and self.step >= self.range_freeze_step)

    def on_train_begin(self, logs=None):
        self._apply_schedule()

    def on_train_batch_begin(self, batch, logs=None):
        if self.step in (self.quant_delay, self.bn_freeze_step, self.range_freeze_step):
            self._apply_schedule()

    def on_train_batch_end(self, batch, logs=None):
        self.step += 1

    def on_epoch_end(self, epoch, logs=None):
        if self.validation_data is None or (epoch + 1) % self.export_every:
            return
        from qtoolkit import export, verify

        x, y = self.validation_data
        data, _ = export_tflite(self.model, io_dtype=self.io_dtype)
        tfl = verify.LiteRTModel(data)
        int8_out = tfl.predict(x)
        keras_out = self.model.predict(x, batch_size=256, verbose=0)
        cmp = verify.compare(keras_out, int8_out, y, tfl.output_step())
        logs = logs if logs is not None else {}
        logs["val_int8_accuracy"] = cmp.candidate_accuracy
        logs["val_qat_accuracy"] = cmp.reference_accuracy
        logs["val_int8_sim_gap"] = cmp.max_error_steps
        self.history.append({"epoch": epoch, **{k: logs[k] for k in ("val_int8_accuracy", "val_qat_accuracy",
                                                                      "val_int8_sim_gap")}})
        if self.verbose:
            print(f"epoch {epoch + 1}: int8 TFLite accuracy {cmp.candidate_accuracy:.4f} "
                  f"(Keras QAT {cmp.reference_accuracy:.4f}), simulation gap {cmp.max_error_steps:.2f} steps")
        if self.best_path and cmp.candidate_accuracy > self.best:
            self.best = cmp.candidate_accuracy
            export.write_atomic(self.best_path, data)


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
