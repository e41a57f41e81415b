"""qtoolkit: accurate, verified int8 TFLite models from TensorFlow/Keras.

    import qtoolkit
    scheme = qtoolkit.load_scheme("int8")

The package sets TF_USE_LEGACY_KERAS=1 before TensorFlow is imported (see
`qtoolkit/_env.py`): qtoolkit works on Keras 2 (`tf_keras`) models.
"""

from qtoolkit import _env  # noqa: F401  (must run before TensorFlow is imported)
from qtoolkit.schemes import QuantScheme, SchemeError
from qtoolkit.schemes import load as load_scheme

__version__ = "0.1.0"
__all__ = ["QuantScheme", "SchemeError", "load_scheme", "ptq", "__version__"]


def ptq(*args, **kwargs):
    """Post-training quantization; see `qtoolkit.pipeline.ptq` (imports TensorFlow on first use)."""
    from qtoolkit.pipeline import ptq as _ptq

    return _ptq(*args, **kwargs)
