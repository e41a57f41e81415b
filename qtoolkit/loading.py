"""Loading models from disk: .keras, .h5, SavedModel folders, with clear errors.

    loaded = load_model("model.keras")
    loaded.keras_model     # a tf_keras model, or None for a non-Keras SavedModel
    loaded.path

Models are loaded with Keras' safe mode: serialized Python code (Lambda
layers) is refused unless `allow_unsafe=True`.  A Keras 3 `.keras` file is
loaded by Keras 3 and read into its tf_keras twin (`rewrite.keras3`).
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import zipfile
from typing import Optional

import tf_keras as keras

from qtoolkit.rewrite.objects import custom_objects
from qtoolkit.errors import ModelLoadError  # noqa: F401  (raised here; defined with the others)


@dataclasses.dataclass
class LoadedModel:
    """A loaded model: a tf_keras model, or only a SavedModel path.

    Attributes:
      path: the file or folder, or "<in memory>".
      keras_model: the tf_keras model qtoolkit rewrites (for a Keras 3 model: its tf_keras twin, see
        `rewrite.keras3`), or None for a SavedModel without Keras metadata.
      kind: "keras", "h5", "saved_model_keras" or "saved_model".
      source_model: the user's Keras 3 model when `keras_model` is its twin (the float reference), else None.
    """

    path: str
    keras_model: Optional[keras.Model]
    kind: str  # "keras", "h5", "saved_model_keras", "saved_model"
    source_model: Optional[object] = None

    @property
    def keras_version(self) -> str:
        """"3" for a Keras 3 model, "2" for tf_keras, "" without a Keras model."""
        return "3" if self.source_model is not None else ("2" if self.keras_model is not None else "")

    @property
    def reference_model(self):
        """The model whose float outputs the quantized one is compared with: the user's own."""
        return self.source_model if self.source_model is not None else self.keras_model


def from_memory(model) -> LoadedModel:
    """A model object the user passed (tf_keras or Keras 3), as a LoadedModel; never modified."""
    from qtoolkit.rewrite import keras3

    if keras3.is_keras3(model):
        return LoadedModel("<in memory>", keras3.to_tf_keras(model), "keras", source_model=model)
    return LoadedModel("<in memory>", model, "keras")


def _keras_version_of_zip(path: str) -> Optional[str]:
    try:
        with zipfile.ZipFile(path) as z:
            meta = json.loads(z.read("metadata.json")) if "metadata.json" in z.namelist() else {}
            return str(meta.get("keras_version", ""))
    except (zipfile.BadZipFile, KeyError, ValueError, OSError):
        return None


def _lambda_layers(config) -> list[str]:
    """Names of the Lambda layers (serialized Python code) anywhere in a model config."""
    found = []

    def walk(node):
        if isinstance(node, dict):
            if node.get("class_name") == "Lambda":
                cfg = node.get("config", {})
                found.append(str(cfg.get("name", "?")) if isinstance(cfg, dict) else "?")
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    walk(config)
    return found


def _model_config(path: str, kind: str):
    """The model's JSON config read without deserializing anything, or None."""
    try:
        if kind == "keras":
            with zipfile.ZipFile(path) as z:
                return json.loads(z.read("config.json"))
        if kind == "h5":
            import h5py

            with h5py.File(path, "r") as f:
                raw = f.attrs.get("model_config")
            if raw is None:
                return None
            return json.loads(raw.decode() if isinstance(raw, bytes) else raw)
        if kind == "saved_model":
            meta = os.path.join(path, "keras_metadata.pb")
            if not os.path.isfile(meta):
                return None
            with open(meta, "rb") as f:
                data = f.read()
            # The metadata proto embeds one JSON document per layer; look for Lambda ones.
            names = [m.decode(errors="replace") for m in
                     re.findall(rb'"class_name": "Lambda", "config": \{"name": "([^"]+)"', data)]
            return {"layers": [{"class_name": "Lambda", "config": {"name": n}} for n in names]}
    except (OSError, KeyError, ValueError, zipfile.BadZipFile):
        return None
    return None


def _refuse_unsafe(path: str, kind: str, allow_unsafe: bool) -> None:
    if allow_unsafe:
        return
    lambdas = _lambda_layers(_model_config(path, kind))
    if lambdas:
        raise ModelLoadError(
            f"{path} contains serialized Python code in Lambda layer(s) {', '.join(sorted(set(lambdas)))}; "
            "qtoolkit does not run code from model files by default. If you trust the file, pass "
            "--allow_unsafe_deserialization (allow_unsafe=True)")


def _keras_version_of_h5(path: str) -> str:
    """The `keras_version` an .h5 file was written by, or "" when unreadable or absent."""
    try:
        import h5py

        with h5py.File(path, "r") as f:
            value = f.attrs.get("keras_version", "")
        return value.decode() if isinstance(value, bytes) else str(value)
    except (OSError, ValueError):
        return ""


def _load_keras3(path: str, kind: str, version: str, allow_unsafe: bool) -> LoadedModel:
    """A file written by Keras 3: loaded by Keras 3 (safe mode), read into its tf_keras twin."""
    _refuse_unsafe(path, kind, allow_unsafe)
    from qtoolkit.rewrite import keras3

    import keras as keras_3  # Keras 3 itself reads its files

    keras3.check_backend()
    try:
        model = keras_3.saving.load_model(path, compile=False, safe_mode=not allow_unsafe)
    except Exception as e:  # noqa: BLE001  (Keras raises many types for bad files)
        message = _first_line(e)
        if "could not locate" in message.lower() or "unknown layer" in message.lower():
            raise ModelLoadError(f"{path}: cannot load the model ({message}); it names a class Keras 3 does not "
                                 "know: a custom layer must be registered (keras.saving.register_keras_serializable) "
                                 "and imported before loading") from None
        raise ModelLoadError(f"{path}: cannot load the model saved by Keras {version} ({message}); is the file "
                             "complete?") from None
    if not isinstance(model, keras_3.Model):
        raise ModelLoadError(f"{path}: loaded a {type(model).__name__}, not a Keras model")
    return LoadedModel(path, keras3.to_tf_keras(model), kind, source_model=model)


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
        _refuse_unsafe(path, "saved_model", allow_unsafe)
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
        kind = "keras"
        if version.startswith("3"):
            return _load_keras3(path, kind, version, allow_unsafe)
    elif lower.endswith((".h5", ".hdf5")):
        kind = "h5"
        version = _keras_version_of_h5(path)
        if version.startswith("3"):
            return _load_keras3(path, kind, version, allow_unsafe)
    else:
        raise ModelLoadError(f"{path}: unknown model format; give a SavedModel folder, a .keras or an .h5 file")
    _refuse_unsafe(path, kind, allow_unsafe)
    try:
        model = keras.models.load_model(path, compile=False, custom_objects=scope, safe_mode=not allow_unsafe)
    except Exception as e:  # noqa: BLE001  (Keras raises many types for bad files)
        message = _first_line(e)
        if "unsafe" in message.lower() or "lambda" in message.lower() or "safe_mode" in message:
            raise ModelLoadError(f"{path} contains serialized Python code (a Lambda layer) that qtoolkit will "
                                 "not run by default; if you trust the file, pass --allow_unsafe_deserialization"
                                 ) from None
        raise ModelLoadError(f"{path}: cannot load the model ({message}); is the file complete?") from None
    if not isinstance(model, keras.Model):
        raise ModelLoadError(f"{path}: loaded a {type(model).__name__}, not a Keras model")
    return LoadedModel(path, model, kind)
