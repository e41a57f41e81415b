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

from qtoolkit import user_code
from qtoolkit.rewrite.objects import custom_objects as qtoolkit_objects
from qtoolkit.errors import ModelLoadError, UnsupportedModelError  # noqa: F401  (raised here)


@dataclasses.dataclass
class LoadedModel:
    """A loaded model: a tf_keras model, or only a SavedModel path.

    Attributes:
      path: the file or folder, or "<in memory>".
      keras_model: the tf_keras model qtoolkit rewrites (for a Keras 3 model: its tf_keras twin, see
        `rewrite.keras3`), or None for a SavedModel without Keras metadata.
      kind: "keras", "h5", "saved_model_keras", "saved_model", or "subclassed" (a subclassed model qtoolkit
        could not trace into a graph: `keras_model` is None and the converter calibrates `source_model`).
      source_model: the user's own model when `keras_model` is another object computing the same (a Keras 3
        model's tf_keras twin, a subclassed model traced into a graph): the float reference; else None.
      note: how the model was read, in words, when it was not simply loaded (traced, twinned), else "".
    """

    path: str
    keras_model: Optional[keras.Model]
    kind: str  # "keras", "h5", "saved_model_keras", "saved_model", "subclassed"
    source_model: Optional[object] = None
    note: str = ""

    @property
    def keras_version(self) -> str:
        """"3" for a Keras 3 model, "2" for tf_keras, "" without a Keras model."""
        from qtoolkit.rewrite import keras3

        if self.source_model is not None:
            return "3" if keras3.is_keras3(self.source_model) else "2"
        return "2" if self.keras_model is not None else ""

    @property
    def reference_model(self):
        """The model whose float outputs the quantized one is compared with: the user's own."""
        return self.source_model if self.source_model is not None else self.keras_model


def from_memory(model, path: str = "<in memory>", kind: str = "keras") -> LoadedModel:
    """A model object (tf_keras or Keras 3, functional, Sequential or subclassed) as a LoadedModel; never
    modified.  A subclassed model is traced into a graph of its own layers (`trace`)."""
    from qtoolkit.rewrite import keras3

    if not hasattr(model, "layers") or not callable(model):
        raise ModelLoadError(f"expected a Keras model, got a {type(model).__name__}")
    if not is_graph(model):
        try:
            graph = trace(model)
        except UnsupportedModelError as e:
            if keras3.is_keras3(model) or not input_specs(model):
                raise
            return LoadedModel(path, None, "subclassed", source_model=model, note=str(e))
        traced = keras3.to_tf_keras(graph) if keras3.is_keras3(graph) else graph
        return LoadedModel(path, traced, kind, source_model=model,
                           note=f"subclassed model {model.name!r} traced into a graph of its own layers (its "
                                "outputs checked on the verification samples)")
    if keras3.is_keras3(model):
        return LoadedModel(path, keras3.to_tf_keras(model), kind, source_model=model)
    return LoadedModel(path, model, kind)


def is_graph(model) -> bool:
    return bool(getattr(model, "_is_graph_network", False)) or type(model).__name__ in ("Functional", "Sequential")


def trace(model):
    """A subclassed model as a Functional model of the same layers, by calling its `call` on symbolic inputs.

    Layers stay shared with `model` (nothing is copied, nothing is changed); TensorFlow ops inside `call`
    become op layers the rewrite reads.  The caller checks the outputs against `model`'s.

    Raises:
      UnsupportedModelError: the model was never built or called (its input shape is unknown), or its `call`
        cannot run on symbolic tensors (Python control flow on values, for example).
    """
    from qtoolkit.rewrite import keras3

    k = __import__("keras") if keras3.is_keras3(model) else keras
    specs = input_specs(model)
    if not specs:
        raise UnsupportedModelError(f"subclassed model {model.name!r} was never built or called, so its input "
                                    "shape is unknown; call it once on a batch (or model.build(shape)) first")
    inputs = [k.Input(shape=tuple(s.shape[1:]), dtype=s.dtype.name if hasattr(s.dtype, "name") else s.dtype,
                      name=(getattr(s, "name", None) or f"input_{i}").split(":")[0])
              for i, s in enumerate(specs)]
    try:
        outputs = model.call(inputs[0] if len(inputs) == 1 else inputs)
        return k.Model(inputs, outputs, name=model.name)
    except Exception as e:  # noqa: BLE001  (user code raises anything on symbolic tensors)
        raise UnsupportedModelError(f"subclassed model {model.name!r} could not be traced into a graph "
                                    f"({type(e).__name__}: {_first_line(e)})") from None


def input_specs(model) -> list:
    """The input TensorSpecs a built or called model was used with."""
    import tensorflow as tf

    spec = None
    if hasattr(model, "save_spec"):
        try:
            spec = model.save_spec()
        except Exception:  # noqa: BLE001
            spec = None
    if spec:
        flat = tf.nest.flatten(spec[0])
        if flat and all(isinstance(s, tf.TensorSpec) for s in flat):
            return flat
    shape = getattr(model, "_build_input_shape", None) or getattr(model, "_build_shapes_dict", None)
    if isinstance(shape, dict) and len(shape) == 1:
        shape = next(iter(shape.values()))
    if shape is None:
        return []
    shapes = [shape] if not isinstance(shape, (list, tuple)) or not shape or not isinstance(
        shape[0], (list, tuple)) else list(shape)
    return [tf.TensorSpec(tuple(s), tf.float32) for s in shapes]


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
    for node in user_code.config_nodes(config):
        if node.get("class_name") == "Lambda":
            cfg = node.get("config", {})
            found.append(str(cfg.get("name", "?")) if isinstance(cfg, dict) else "?")
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


def _load_keras3(path: str, kind: str, version: str, allow_unsafe: bool, user: dict) -> LoadedModel:
    """A file written by Keras 3: loaded by Keras 3 (safe mode), read into its tf_keras twin."""
    _refuse_unsafe(path, kind, allow_unsafe)
    from qtoolkit.rewrite import keras3

    import keras as keras_3  # Keras 3 itself reads its files

    keras3.check_backend()
    try:
        model = keras_3.saving.load_model(path, compile=False, safe_mode=not allow_unsafe, custom_objects=user)
    except Exception as e:  # noqa: BLE001  (Keras raises many types for bad files)
        message = _first_line(e)
        unknown = user_code.unknown_classes(_model_config(path, kind), user, keras_3)
        if unknown:
            raise user_code.unknown_class_error(path, unknown) from None
        if "could not locate" in message.lower() or "unknown layer" in message.lower():
            raise ModelLoadError(f"{path}: cannot load the model ({message}); it names a class Keras 3 does not "
                                 "know: a custom layer must be registered (keras.saving.register_keras_serializable) "
                                 "and imported before loading") from None
        raise ModelLoadError(f"{path}: cannot load the model saved by Keras {version} ({message}); is the file "
                             "complete?") from None
    if not isinstance(model, keras_3.Model):
        raise ModelLoadError(f"{path}: loaded a {type(model).__name__}, not a Keras model")
    return from_memory(model, path, kind)


def _first_line(e: Exception) -> str:
    text = str(e).strip()
    return text.splitlines()[0][:300] if text else type(e).__name__


def load_model(path: str, allow_unsafe: bool = False, custom_objects=None) -> LoadedModel:
    """Loads a model for quantization.

    Args:
      path: a SavedModel folder, a .keras or an .h5 file.
      allow_unsafe: allow serialized Python code (Lambda layers).
      custom_objects: the user's classes the file names: a dict, or a .py file defining them (see user_code).

    Raises:
      ModelLoadError: missing path, unreadable or corrupt file, Keras 3 file,
        unsafe content without `allow_unsafe`.
    """
    if not os.path.exists(path):
        raise ModelLoadError(f"model {path!r} does not exist; give a SavedModel folder, a .keras or an .h5 file")
    user = user_code.read(custom_objects)
    scope = {**qtoolkit_objects(), **user}
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
            return _load_keras3(path, kind, version, allow_unsafe, user)
    elif lower.endswith((".h5", ".hdf5")):
        kind = "h5"
        version = _keras_version_of_h5(path)
        if version.startswith("3"):
            return _load_keras3(path, kind, version, allow_unsafe, user)
    else:
        raise ModelLoadError(f"{path}: unknown model format; give a SavedModel folder, a .keras or an .h5 file")
    _refuse_unsafe(path, kind, allow_unsafe)
    try:
        model = keras.models.load_model(path, compile=False, custom_objects=scope, safe_mode=not allow_unsafe)
    except Exception as e:  # noqa: BLE001  (Keras raises many types for bad files)
        message = _first_line(e)
        unknown = user_code.unknown_classes(_model_config(path, kind), scope, keras)
        if unknown:
            raise user_code.unknown_class_error(path, unknown) from None
        if "unsafe" in message.lower() or "lambda" in message.lower() or "safe_mode" in message:
            raise ModelLoadError(f"{path} contains serialized Python code (a Lambda layer) that qtoolkit will "
                                 "not run by default; if you trust the file, pass --allow_unsafe_deserialization"
                                 ) from None
        raise ModelLoadError(f"{path}: cannot load the model ({message}); is the file complete?") from None
    if not isinstance(model, keras.Model):
        raise ModelLoadError(f"{path}: loaded a {type(model).__name__}, not a Keras model")
    return from_memory(model, path, kind)
