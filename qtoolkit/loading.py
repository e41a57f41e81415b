"""Loading models from disk: .keras, .h5, SavedModel folders, with clear errors.

    loaded = load_model("model.keras")
    loaded.keras_model     # a tf_keras model, or None for a non-Keras SavedModel
    loaded.path

Models are loaded with Keras' safe mode: serialized Python code (Lambda
layers) is refused unless `allow_unsafe=True`.  A Keras 3 `.keras` file is
recognised and refused with what to do instead.
"""

from __future__ import annotations

import dataclasses
import json
import os
import zipfile
from typing import Optional

import tf_keras as keras

from qtoolkit.rewrite.layers import custom_objects


class ModelLoadError(ValueError):
    """The model cannot be loaded; the message says why and what to do."""


@dataclasses.dataclass
class LoadedModel:
    """A loaded model: a tf_keras model, or only a SavedModel path."""

    path: str
    keras_model: Optional[keras.Model]
    kind: str  # "keras", "h5", "saved_model_keras", "saved_model"


def _keras_version_of_zip(path: str) -> Optional[str]:
    try:
        with zipfile.ZipFile(path) as z:
            meta = json.loads(z.read("metadata.json")) if "metadata.json" in z.namelist() else {}
            return str(meta.get("keras_version", ""))
    except (zipfile.BadZipFile, KeyError, ValueError, OSError):
        return None


def _first_line(e: Exception) -> str:
    text = str(e).strip()
    return text.splitlines()[0][:300] if text else type(e).__name__


def load_model(path: str, allow_unsafe: bool = False) -> LoadedModel:
    """Loads a model for quantization.

    Raises:
      ModelLoadError: missing path, unreadable or corrupt file, Keras 3 file,
        unsafe content without `allow_unsafe`.
    """
    if not os.path.exists(path):
        raise ModelLoadError(f"model {path!r} does not exist; give a SavedModel folder, a .keras or an .h5 file")
    scope = custom_objects()
    if os.path.isdir(path):
        if not (os.path.isfile(os.path.join(path, "saved_model.pb"))
                or os.path.isfile(os.path.join(path, "saved_model.pbtxt"))):
            raise ModelLoadError(f"{path} is a folder but not a SavedModel (no saved_model.pb); "
                                 "give a SavedModel folder, a .keras or an .h5 file")
        try:
            model = keras.models.load_model(path, compile=False, custom_objects=scope,
                                            safe_mode=not allow_unsafe)
            if isinstance(model, keras.Model) and getattr(model, "_is_graph_network", False):
                return LoadedModel(path, model, "saved_model_keras")
        except Exception:  # noqa: BLE001  (not a Keras SavedModel: fall back to the converter path)
            pass
        import tensorflow as tf

        try:
            tf.saved_model.load(path)
        except Exception as e:  # noqa: BLE001
            raise ModelLoadError(f"{path}: cannot load the SavedModel ({_first_line(e)}); "
                                 "is it complete and written by TensorFlow 2?") from None
        return LoadedModel(path, None, "saved_model")
    lower = path.lower()
    if lower.endswith(".keras"):
        version = _keras_version_of_zip(path)
        if version is None:
            raise ModelLoadError(f"{path}: not a valid .keras file (corrupt or truncated zip archive); "
                                 "save the model again")
        if version.startswith("3"):
            raise ModelLoadError(f"{path} was saved by Keras {version} (Keras 3), which qtoolkit does not "
                                 "support yet; rebuild the model with `import tf_keras as keras` and save it "
                                 "again, or export a SavedModel (model.export(dir)) and convert that")
        kind = "keras"
    elif lower.endswith((".h5", ".hdf5")):
        kind = "h5"
    else:
        raise ModelLoadError(f"{path}: unknown model format; give a SavedModel folder, a .keras or an .h5 file")
    try:
        model = keras.models.load_model(path, compile=False, custom_objects=scope, safe_mode=not allow_unsafe)
    except Exception as e:  # noqa: BLE001  (Keras raises many types for bad files)
        message = _first_line(e)
        if "unsafe" in message.lower() or "lambda" in message.lower() or "safe_mode" in message:
            raise ModelLoadError(f"{path} contains serialized Python code (a Lambda layer) that qtoolkit will "
                                 "not run by default; if you trust the file, pass --allow_unsafe_deserialization"
                                 ) from None
        raise ModelLoadError(f"{path}: cannot load the model ({message}); is the file complete and "
                             "written by tf_keras (Keras 2)?") from None
    if not isinstance(model, keras.Model):
        raise ModelLoadError(f"{path}: loaded a {type(model).__name__}, not a Keras model")
    return LoadedModel(path, model, kind)
