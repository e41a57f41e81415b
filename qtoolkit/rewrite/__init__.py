"""Keras graph rewriter: BN folding, activation fusion, fake-quant placement.

    from qtoolkit import rewrite
    result = rewrite.rewrite(model, scheme)
"""

from qtoolkit.rewrite.graph import UnsupportedModelError, flatten
from qtoolkit.rewrite.layers import FoldedConv, QuantizeActivation, RangeQuantizer
from qtoolkit.rewrite.objects import custom_objects
from qtoolkit.rewrite.rewriter import Rewritten, UnquantizableLayersError, rewrite

__all__ = ["rewrite", "Rewritten", "flatten", "custom_objects", "UnsupportedModelError",
           "UnquantizableLayersError", "RangeQuantizer", "QuantizeActivation", "FoldedConv"]
