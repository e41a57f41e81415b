"""The user's own classes in a model file: made known on request, named when they are not.

    objects = user_code.read("my_layers.py")        # {"ChannelScale": <class>, ...}: runs that file
    loaded = loading.load_model("model.keras", custom_objects=objects)

A model saved with a layer class of the user's names that class; Keras can only
rebuild it with the class in hand.  `--custom_objects FILE.py` (Python:
`custom_objects={"Name": cls}` or the file's path) imports the user's file and
takes its `custom_objects` dict if it defines one, else every class in it that
does not come from Keras, TensorFlow or the standard library (defined there or
imported from the user's package).  Importing runs the file's code, which is why it happens only when asked
(as Lambda layers' serialized code runs only with
`--allow_unsafe_deserialization`).  Without it, a model naming a class Keras
does not know is refused with one line naming the class and the flag.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import sys
from typing import Any

from qtoolkit.errors import ModelLoadError


def read(spec: Any) -> dict:
    """The classes the user made known: a dict (returned as is), or a .py file's (see the module docstring).

    Raises:
      ModelLoadError: not a dict or an existing .py file, or the file fails when imported.
    """
    if spec is None:
        return {}
    if isinstance(spec, dict):
        return dict(spec)
    path = os.fspath(spec)
    if not path.endswith(".py") or not os.path.isfile(path):
        raise ModelLoadError(f"--custom_objects {path}: give an existing Python file (.py) that defines the "
                             "model's own classes (Python: custom_objects={'Name': cls})")
    name = "qtoolkit_user_code_" + hashlib.sha1(os.path.abspath(path).encode()).hexdigest()[:12]
    module_spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(module_spec)
    sys.modules[name] = module
    try:
        module_spec.loader.exec_module(module)
    except Exception as e:  # noqa: BLE001  (the user's code raises anything)
        del sys.modules[name]
        first = (str(e).strip().splitlines() or [""])[0][:200]
        raise ModelLoadError(f"--custom_objects {path}: importing it failed ({type(e).__name__}: {first})") from None
    objects = getattr(module, "custom_objects", None)
    if isinstance(objects, dict):
        return dict(objects)
    library = ("keras", "tf_keras", "tensorflow", "builtins", "numpy", "typing", "abc", "collections")
    return {key: value for key, value in vars(module).items()
            if isinstance(value, type) and value.__module__.split(".")[0] not in library}


def unknown_classes(config, known: dict, keras_module) -> list[str]:
    """Class names in a model config that neither Keras nor `known` can build, in order of appearance."""
    found = []

    def knows(name: str) -> bool:
        short = name.split(">")[-1]
        if name in known or short in known:
            return True
        for place in (keras_module.layers, keras_module.models, keras_module.activations,
                      keras_module.initializers, keras_module.regularizers, keras_module.constraints,
                      keras_module.optimizers, keras_module.losses, keras_module.metrics):
            if hasattr(place, short):
                return True
        try:
            return keras_module.utils.get_registered_object(name) is not None
        except Exception:  # noqa: BLE001
            return False

    for node in config_nodes(config):
        name = node.get("class_name")
        if isinstance(name, str) and name not in found and not knows(name) and name not in _BUILT_IN:
            found.append(name)
    return found


def config_nodes(config):
    """Every dict in a model config (nested dicts and lists), parents before children, in file order."""
    stack = [config]
    while stack:
        node = stack.pop()
        if isinstance(node, dict):
            yield node
            stack.extend(reversed(list(node.values())))
        elif isinstance(node, list):
            stack.extend(reversed(node))


# Serialized names Keras writes for things that are not classes in its public modules.
_BUILT_IN = {"Functional", "Sequential", "Model", "TFOpLambda", "SlicingOpLambda", "__tensor__", "__numpy__",
             "__keras_tensor__", "__lambda__", "__tuple__", "function", "DTypePolicy", "Policy", "InputLayer",
             "TensorShape", "__typespec__", "__bytes__", "__ellipsis__", "__slice__", "__dtype__",
             "FloatDTypePolicy"}


def unknown_class_error(path: str, names: list[str]) -> ModelLoadError:
    listed = ", ".join(names)
    plural = "es" if len(names) > 1 else ""
    return ModelLoadError(
        f"{path}: the model uses class{plural} {listed} that Keras does not know (your own code); pass "
        f"--custom_objects FILE.py, a Python file defining {'them' if plural else 'it'} (Python: "
        f"custom_objects={{'{names[0]}': {names[0]}}}); that file's code runs when it is imported")
