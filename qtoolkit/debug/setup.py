"""The debugger's view of the prepared state: the rewritten model's layers and the samples to measure.

    s = setup(prepared, num_samples=64)                      # from the shared prepare stage
    s = setup("model.keras", "calib.npy", "int8")            # or prepares (loads, rewrites, calibrates) itself

`analyze` and `mixed_precision` both start from a `Setup`. It is built from a
`qtoolkit.prepare.Prepared` (the stage `convert` runs once and hands to every
tool), so the debugger measures exactly the model that is exported; given a
model and data instead, it runs that same stage itself.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Optional

from qtoolkit import rewrite
from qtoolkit.errors import DebugError
from qtoolkit.prepare import Prepared, prepare
from qtoolkit.schemes import QuantScheme


@dataclasses.dataclass
class Setup:
    """A calibrated rewritten model and the samples to measure it on.

    Attributes:
      keras_model: the float tf_keras model.
      scheme: the QuantScheme (with activation quantization).
      rewritten: `rewrite.rewrite(keras_model, scheme)`, calibrated.
      calibration: the `calibrate.Calibration` (its `ranges` per quantizer).
      samples: held-out samples, one array per model input.
      units: per activation quantizer, in network order: (layer name, quantizer layer name, FoldedConv name
        or None).
      calibration_samples: int16x8 only, one array per input: the converter calibrates on these.
    """

    keras_model: Any
    scheme: QuantScheme
    rewritten: Any
    calibration: Any
    samples: list
    units: list
    calibration_samples: Optional[list] = None


def setup(model, calibration_data=None, scheme="int8", num_calibration_samples=None, num_samples=None,
          allow_unsafe=False, progress=False, image_size=None, image_scale=(0.0, 1.0), image_mean=None,
          image_std=None, image_resize="stretch") -> Setup:
    """The debugger's Setup from a `Prepared` state, or from a model and data (prepared here, layer by layer).

    Args:
      model: a `prepare.Prepared` (then only `num_samples` applies), a Keras model, its path or a
        `loading.LoadedModel`.
      calibration_data: see `calibrate.open_source`.
      scheme: a preset name, a scheme .yaml path or a QuantScheme (not weight-only).
      num_calibration_samples: default up to 500 (what the data leaves after the held-out samples).
      num_samples: held-out samples measured (default: the prepared verification samples, up to 200).
      allow_unsafe: allow Lambda layers when loading from a file.
      progress: show the calibration progress bar.
      image_size, image_scale, image_mean, image_std, image_resize: for an image folder, see
        `calibrate.open_source`.

    Raises:
      DebugError: a weight-only scheme, or a SavedModel without Keras metadata.
      calibrate.DataError: too few samples for calibration plus measurement.
    """
    if isinstance(model, Prepared):
        prepared = model
    else:
        prepared = prepare(model, calibration_data, scheme, num_calibration_samples=num_calibration_samples,
                           num_verification_samples=num_samples, progress=progress, image_size=image_size,
                           image_scale=image_scale, allow_unsafe=allow_unsafe, layerwise=True,
                           image_mean=image_mean, image_std=image_std, image_resize=image_resize)
    if prepared.scheme.activations is None:
        raise DebugError(f"scheme {prepared.scheme.name!r} quantizes only weights: there are no per-layer "
                         "activation errors to debug; use int8 or int16x8")
    if prepared.keras_model is None:
        raise DebugError(f"{prepared.loaded.path}: a SavedModel without Keras metadata cannot be rewritten layer "
                         "by layer; give the .keras/.h5 model")
    if prepared.rewritten is None:
        raise DebugError("the prepared state has no layer-by-layer rewrite; prepare it with layerwise=True")
    rewritten = prepared.rewritten
    samples = prepared.verification_inputs
    if num_samples is not None:
        samples = [a[:num_samples] for a in samples]
    units = []
    names = {layer.name for layer in rewritten.model.layers}
    for q in rewritten.quant_points:
        base = q[:-len("_quant")]
        conv = next((c for c in (base, base[:-len("_preact")] if base.endswith("_preact") else None)
                     if c and c in names and isinstance(rewritten.model.get_layer(c), rewrite.FoldedConv)), None)
        units.append((base, q, conv))
    return Setup(prepared.keras_model, prepared.scheme, rewritten, prepared.calibration, samples, units,
                 prepared.calibration_inputs)
