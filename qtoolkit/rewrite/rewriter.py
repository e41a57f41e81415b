"""The Keras graph rewriter: fold batch norm, fuse activations, place fake-quant.

    from qtoolkit import rewrite, schemes
    result = rewrite.rewrite(model, schemes.load("int8"))
    result.model         # fake-quant model, ranges still to calibrate
    result.float_model   # folded float twin; extra outputs feed the observers
    result.quant_points  # names of the activation quantizers, in that order

Placement follows what TFLite executes (see docs/design.md): a quantizer on
every model input, on the output of every fused Conv/Depthwise/Dense (after
its batch norm and ReLU/ReLU6), of Add/Multiply/Concatenate/average pooling
and activations; none after ops whose int8 kernels keep their input's scale
(max pooling, reshape, flatten, padding, cropping, nearest upsampling,
transpose); fixed ranges for softmax/logistic/tanh, whose output scale
TFLite fixes.  Layers it does not know stay float, each named in a warning.

This module is the front door only: `plan.py` decides each layer's step
from the op policy in `ops.py`, `fold.py` folds the weights, `build.py`
builds both models from the steps.
"""

from __future__ import annotations

import dataclasses
import logging

import tf_keras as keras

from qtoolkit.errors import UnquantizableLayersError  # noqa: F401  (raised here; defined with the others)
from qtoolkit.rewrite import graph as g
from qtoolkit.rewrite.build import build
from qtoolkit.rewrite.fold import fold
from qtoolkit.rewrite.plan import plan
from qtoolkit.schemes import QuantScheme

log = logging.getLogger("qtoolkit")


@dataclasses.dataclass
class Rewritten:
    """What `rewrite` returns.

    Attributes:
      model: the fake-quant model (same inputs and outputs as the original).
      float_model: the folded float twin; outputs are the original outputs
        followed by the input of each calibrated activation quantizer.
      quant_points: calibrated QuantizeActivation layer names, in float_model's extra-output order.
      fixed_points: names of quantizers with a range TFLite fixes (not calibrated).
      folded: one line per fused pattern, e.g. "conv1+bn1+relu1".
      float_layers: names of the layers left in float (also those the scheme keeps float).
      requested_float: layer name -> the scheme key that keeps it float ("layers.float_types Dense"), in
        graph order (see schemes.LayerChoices).
      tied_points: (a, b) quantizer names that calibration gives one range,
        the union of what each observes (transitively): an average pooling's
        window and its count-corrected output (equal scales make the MUL exact
        where the count is full), and a concatenation's output and the range
        of each input (TFLite gives a CONCATENATION's inputs its output scale;
        an input whose range is set elsewhere — through a max pooling, or
        another concatenation — otherwise costs a requantizing QUANTIZE op and
        a second rounding).
    """

    model: keras.Model
    float_model: keras.Model
    quant_points: list[str]
    fixed_points: list[str]
    folded: list[str]
    float_layers: list[str]
    tied_points: list = dataclasses.field(default_factory=list)
    requested_float: dict = dataclasses.field(default_factory=dict)


def rewrite(model, scheme: QuantScheme, strict: bool = False, qat: bool = False,
            ema_decay: float = 0.999) -> Rewritten:
    """Rewrites a tf_keras model for quantization (see the module docstring).

    Args:
      model: a built tf_keras Functional or Sequential model (nested models are inlined).
      scheme: how weights and activations are quantized.
      strict: raise instead of leaving unknown layers in float.
      qat: build training layers (batch norm folded with correction, EMA ranges).
      ema_decay: EMA decay of activation ranges when `qat`.

    Returns:
      A Rewritten with the fake-quant model and its float twin.

    Raises:
      graph.UnsupportedModelError: the model cannot be flattened.
      UnquantizableLayersError: strict and some layers would stay float (all named).
      SchemeError: the scheme's `layers` keys name a layer the model does not have.
    """
    flat = g.flatten(model)
    steps = plan(flat, scheme, fold_affine=not qat)
    float_steps = [s for s in steps if s.kind == "float"]
    float_names = [s.node.name for s in float_steps]
    requested = {s.node.name: s.requested for s in float_steps if s.requested}
    if float_names and strict:
        raise UnquantizableLayersError(
            f"{len(float_names)} layer(s) cannot be quantized and would stay float: "
            + ", ".join(n + (f" (kept float by the scheme: {requested[n]})" if n in requested else "")
                        for n in float_names))
    for s in float_steps:
        if s.requested:
            log.info("layer %s (%s) is kept float as the scheme asks (%s)", s.node.name,
                     type(s.node.layer).__name__, s.requested)
            continue
        log.warning("layer %s (%s) has no qtoolkit rewrite: it is kept as is and unquantized in the simulation; "
                    "TFLite runs it in int8 only if it has an int8 kernel for it (see the float ops of the "
                    "inspection)", s.node.name, type(s.node.layer).__name__)
    fused = {id(s): fold(s.node.layer, [a.layer for a in s.absorbed], s.pre_affine)
             for s in steps if s.kind == "fused"}
    qmodel, _, names, fixed, ties = build(flat, steps, fused, scheme, quantize=True, model_name=model.name,
                                          qat=qat, ema_decay=ema_decay)
    fmodel, probes, names_f, _, _ = build(flat, steps, fused, scheme, quantize=False, model_name=model.name)
    assert names == names_f
    float_model = keras.Model(fmodel.inputs, [*fmodel.outputs, *probes], name=f"{model.name}_float_twin")
    # The quantized model's output layers are quantizers or op layers ("digit_quant", "tf.reshape"): the
    # exported file and the callback's logs name the outputs as the user's model does.
    object.__setattr__(qmodel, "_qtoolkit_output_names", tuple(model.output_names))
    folded = ["+".join([s.node.name, *(a.name for a in s.absorbed)]) + (f" into {s.into}" if s.into else "")
              for s in steps if s.absorbed or s.into]
    return Rewritten(qmodel, float_model, [n for n in names if n not in fixed], fixed, folded, float_names, ties,
                     requested)
