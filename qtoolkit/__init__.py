"""qtoolkit: accurate, verified int8 TFLite models from TensorFlow/Keras.

    import qtoolkit
    scheme = qtoolkit.load_scheme("int8")

Importing qtoolkit never changes which Keras `tf.keras` is for the user's code
(see `qtoolkit/_env.py`); it reads Keras 2 models through `tf_keras` directly.
"""

from qtoolkit import _env  # noqa: F401  (TensorFlow's log level, before TensorFlow is imported)
from qtoolkit.errors import QtoolkitError
from qtoolkit.schemes import QuantScheme, SchemeError
from qtoolkit.schemes import load as load_scheme

__version__ = "0.1.0"
__all__ = ["QtoolkitError", "QuantScheme", "SchemeError", "load_scheme", "ptq", "quantize_model", "export_tflite",
           "custom_objects", "__version__"]


def ptq(*args, **kwargs):
    """Post-training quantization; see `qtoolkit.pipeline.ptq` (imports TensorFlow on first use)."""
    from qtoolkit.pipeline import ptq as _ptq

    return _ptq(*args, **kwargs)


def quantize_model(*args, **kwargs):
    """Quantization-aware training model; see `qtoolkit.qat.quantize_model`."""
    from qtoolkit.qat import quantize_model as _quantize_model

    return _quantize_model(*args, **kwargs)


def export_tflite(*args, **kwargs):
    """Exports a QAT model to int8 TFLite; see `qtoolkit.qat.export_tflite`."""
    from qtoolkit.qat import export_tflite as _export_tflite

    return _export_tflite(*args, **kwargs)


def custom_objects() -> dict:
    """The custom_objects scope to load a saved quantized (QAT or rewritten) model."""
    from qtoolkit.rewrite import custom_objects as _custom_objects

    return _custom_objects()


def __getattr__(name):
    # `qtoolkit.callbacks.QuantizationCallback` without importing TensorFlow at `import qtoolkit`.
    if name in ("callbacks", "qat", "pipeline", "export", "verify", "rewrite", "calibrate", "quantizers",
                "schemes", "datasets", "zoo", "latency"):
        import importlib

        return importlib.import_module(f"qtoolkit.{name}")
    raise AttributeError(f"module 'qtoolkit' has no attribute {name!r}")
