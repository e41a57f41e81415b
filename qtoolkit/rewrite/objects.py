"""The custom-object scope of every layer the rewriter and QAT build.

It sits above `layers.py` and `qat_layers.py` (which imports `layers.py`),
so neither has to import the other to list them all.

    model = keras.models.load_model(path, custom_objects=custom_objects())
"""

from __future__ import annotations

from qtoolkit.rewrite.layers import FoldedConv, QuantizeActivation, RangeQuantizer, ScaleMap
from qtoolkit.rewrite.qat_layers import QATFoldedConv, QATQuantizeActivation


def custom_objects() -> dict:
    """The scope to load a model saved after rewriting: `load_model(p, custom_objects=custom_objects())`.

    With Keras 3 loaded in the process it also holds the Keras 3 QAT layers (for `keras.saving.load_model`).
    """
    objects = {"RangeQuantizer": RangeQuantizer, "QuantizeActivation": QuantizeActivation,
               "FoldedConv": FoldedConv, "ScaleMap": ScaleMap,
               "QATFoldedConv": QATFoldedConv, "QATQuantizeActivation": QATQuantizeActivation}
    from qtoolkit.rewrite import keras3

    if keras3._keras3() is not None:
        from qtoolkit.rewrite.qat_layers3 import QATFoldedConv3, QATQuantizeActivation3

        objects.update({"QATFoldedConv3": QATFoldedConv3, "QATQuantizeActivation3": QATQuantizeActivation3})
    return objects
