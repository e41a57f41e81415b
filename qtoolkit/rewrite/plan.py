"""Planning: one `Step` per layer call, saying how TFLite will run it.

`plan` walks a flat graph in order and, from the op policy in `ops.py`,
decides each node's step kind and which following layers it absorbs (batch
norms and ReLUs fused into a conv, consecutive affine layers merged, an input
affine folded into the next conv).  It builds nothing: `build.py` turns the
steps into Keras layers.

    steps = plan(graph.flatten(model), scheme)
    [(s.kind, s.node.name, [a.name for a in s.absorbed]) for s in steps]
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import numpy as np
import tf_keras as keras

from qtoolkit.rewrite import graph as g
from qtoolkit.rewrite import ops
from qtoolkit.rewrite.avgpool import avgpool_as_depthwise
from qtoolkit.rewrite.fold import affine_params, constant_add, constant_multiply, is_affine, is_channel_last_bn
from qtoolkit.errors import SchemeError
from qtoolkit.schemes import QuantScheme

L = keras.layers


@dataclasses.dataclass
class Step:
    """How one node (and the nodes it absorbs) is rewritten.

    Attributes:
      kind: fused (conv/dense with batch norm and activation folded in),
        affine (per-channel scale and offset), pre_affine (an affine folded
        into the next conv), quantized (own output range), fixed (range TFLite
        fixes), swish, avgpool, same_scale (input's range), identity, or
        float (kept as is: no rewrite for it, or the scheme's `layers` keys ask).
      node: the node the step starts at.
      absorbed: the following nodes folded into it, in order.
      activation: the fused activation; "?" for one the conv cannot fuse.
      fixed_range: the output range TFLite fixes, or None.
      affine: (scale, offset) of an affine step that is not a layer's own.
      pre_affine: (scale, offset) per input channel folded into a conv.
      into: the conv a pre_affine step is folded into.
      requested: for a float step the scheme asked for, the key and value that asked
        ("layers.float_types LayerNormalization"); else None.
    """

    kind: str
    node: g.Node
    absorbed: list = dataclasses.field(default_factory=list)
    activation: str = "linear"
    fixed_range: Optional[tuple] = None
    affine: Optional[tuple] = None
    pre_affine: Optional[tuple] = None
    into: Optional[str] = None
    requested: Optional[str] = None


def _affine_target(step: Step, nxt, single_consumer):
    """The conv an affine step folds into exactly, or None.

    conv(pad(s x + o)) == conv'(pad(x)) with the kernel scaled by s per input
    channel when o is zero (zero padding commutes with a scale), and with the
    bias also taking sum(kernel * o) when no padding is involved.  Like the
    converter does for EfficientNet's Rescaling, this saves an int8 depthwise
    pass over the input, slow on few channels (3/16 of XNNPACK's channel tile).
    """
    scale, offset = step.affine
    zero_offset = not np.any(offset)
    if nxt is not None and isinstance(nxt.layer, L.ZeroPadding2D) and zero_offset:
        nxt = single_consumer(nxt.outputs[0])
        padded = True
    else:
        padded = False
    if nxt is None or len(nxt.inputs) != 1 or ops.conv_kind(nxt.layer) not in ("conv2d", "conv1d", "depthwise"):
        return None
    if not zero_offset and (padded or nxt.layer.padding != "valid"):
        return None
    if not np.all(np.isfinite(scale)) or not np.all(np.isfinite(offset)):
        return None
    return nxt


def plan(graph: g.Graph, scheme: QuantScheme, fold_affine: bool = True) -> list[Step]:
    """Decides how each node of `graph` is rewritten.

    Args:
      graph: the flattened model.
      scheme: the quantization scheme (8-bit activations enable TFLite's
        fixed ranges, swish as LOGISTIC+MUL and average pooling as a conv).
      fold_affine: fold an affine layer on a model input into the conv after
        it (off for QAT, whose convs train their unfolded kernel); off, a
        LayerNormalization or MultiHeadAttention is also kept as it is (QAT
        trains the layer, not its int8 lowering).

    Returns:
      The steps in graph order; absorbed nodes have no step of their own.

    Raises:
      SchemeError: a name, the pattern or a type of the scheme's `layers` keys matches no layer.
    """
    pre_affine: dict[int, tuple] = {}
    consumers = graph.consumers()
    outputs = set(graph.outputs)
    absorbed: set[int] = set()
    steps = []
    requested = requested_float(graph, scheme)

    def single_consumer(tensor):
        # A layer the user keeps float is never folded into the step before it.
        users = consumers.get(tensor, [])
        one = users[0] if len(users) == 1 and tensor not in outputs else None
        return None if one is None or id(one) in requested else one

    def absorb(step, node):
        step.absorbed.append(node)
        absorbed.add(id(node))

    fixed_8bit = scheme.activations is not None and scheme.activations.bits == 8
    for node in graph.nodes:
        if id(node) in absorbed:
            continue
        layer = node.layer
        kind = ops.conv_kind(layer)
        if id(node) in requested:
            steps.append(Step("float", node, requested=requested[id(node)]))
        elif kind and len(node.inputs) == 1 and len(node.outputs) == 1:
            step = Step("fused", node, activation=getattr(layer.activation, "__name__", "?"))
            if step.activation not in ops.FUSABLE_ACTIVATIONS:
                if step.activation in ops.FIXED_RANGE_8BIT and fixed_8bit:
                    step.fixed_range = ops.FIXED_RANGE_8BIT[step.activation]
                step.activation = "?"
            nxt = single_consumer(node.outputs[0])
            if step.activation == "linear" and nxt is not None and isinstance(nxt.layer, L.BatchNormalization) \
                    and is_channel_last_bn(nxt.layer, len(nxt.layer.input_shape)):
                absorb(step, nxt)
                nxt = single_consumer(nxt.outputs[0])
            if step.activation == "linear" and nxt is not None \
                    and ops.activation_name(nxt.layer) in ops.ABSORBED_ACTIVATIONS:
                step.activation = ops.activation_name(nxt.layer)
                absorb(step, nxt)
            steps.append(step)
        elif is_affine(layer):
            step = Step("affine", node, affine=affine_params(layer))
            nxt = single_consumer(node.outputs[0])
            while nxt is not None and is_affine(nxt.layer):
                # Consecutive affine layers (EfficientNet's Rescaling then Normalization) are one
                # 1x1 depthwise conv: one int8 op at input resolution instead of two.
                scale, offset = affine_params(nxt.layer)
                step.affine = (step.affine[0] * scale, step.affine[1] * scale + offset)
                absorb(step, nxt)
                nxt = single_consumer(nxt.outputs[0])
            # Only preprocessing on a model input: elsewhere the 1x1 depthwise conv keeps its own range.
            on_input = node.inputs and node.inputs[0] in graph.inputs
            conv = _affine_target(step, nxt, single_consumer) if fold_affine and on_input else None
            if conv is not None:
                step.kind = "pre_affine"  # folded into the conv's kernel and bias (see fold.fold)
                pre_affine[id(conv)] = step.affine
                step.into = conv.name
            steps.append(step)
        elif constant_add(node) is not None and scheme.activations is not None:
            step = Step("affine", node, affine=constant_add(node))
            nxt = single_consumer(node.outputs[0])
            if nxt is not None and ops.activation_name(nxt.layer) in ops.ABSORBED_ACTIVATIONS:
                step.activation = ops.activation_name(nxt.layer)
                absorb(step, nxt)
                after = single_consumer(nxt.outputs[0])
                factor = constant_multiply(after) if after is not None else None
                if step.activation == "relu6" and factor is not None and factor > 0 and fixed_8bit:
                    # relu6(x + c) * k == clip(k x + k c, 0, 6 k): a linear conv whose output
                    # range [0, 6 k] is fixed; the int8 output saturates exactly there.
                    step.affine = (step.affine[0] * factor, step.affine[1] * factor)
                    step.activation = "linear"
                    step.fixed_range = (0.0, 6.0 * factor)
                    absorb(step, after)
            steps.append(step)
        elif fixed_8bit and fold_affine and ops.lowers_layernorm(layer):
            steps.append(Step("layernorm", node))  # QAT (fold_affine off) trains the layer as it is
        elif fixed_8bit and fold_affine and ops.lowers_attention(node):
            steps.append(Step("attention", node))
        elif fixed_8bit and fold_affine and ops.is_recurrent(layer):
            problem = ops.recurrent_problem(node)
            if problem is not None:
                raise ValueError(f"layer {node.name} ({type(layer).__name__}) cannot be quantized: {problem}; "
                                 "qtoolkit lowers LSTM/GRU by unrolling their static time steps into int8 ops")
            steps.append(Step("recurrent", node))  # unrolled int8 cell ops (recurrent.py)
        elif fixed_8bit and avgpool_as_depthwise(layer):
            steps.append(Step("avgpool", node))
        elif isinstance(layer, ops.IDENTITY) or ops.activation_name(layer) == "linear":
            steps.append(Step("identity", node))
        elif ops.is_same_scale(layer):
            steps.append(Step("same_scale", node))
        else:
            steps.append(_output_step(node, fixed_8bit, single_consumer, absorb))
    for step in steps:
        if step.kind == "fused" and id(step.node) in pre_affine:
            step.pre_affine = pre_affine[id(step.node)]
    return steps


def requested_float(graph: g.Graph, scheme: QuantScheme) -> dict:
    """id(node) -> the scheme key keeping it float (`schemes.LayerChoices`), for every node it names.

    A node matches by its flat name ("outer/inner" in a nested model), its layer's own name, or its class.

    Raises:
      SchemeError: a key's value matches no layer (named, with the model's layers).
    """
    choices = scheme.layers
    if not choices.any:
        return {}
    names = [n.name for n in graph.nodes] + [n.layer.name for n in graph.nodes]
    types = [type(n.layer).__name__ for n in graph.nodes]
    missing = choices.unmatched(names, types)
    if missing:
        listed = ", ".join(f"{n.name} ({type(n.layer).__name__})" for n in graph.nodes[:60])
        more = f" and {len(graph.nodes) - 60} more" if len(graph.nodes) > 60 else ""
        raise SchemeError(f"scheme {scheme.name!r}: {'; '.join(missing)}: matches no layer of the model; its "
                          f"layers are {listed}{more}")
    found = {}
    for node in graph.nodes:
        key = choices.float_key(node.name, type(node.layer).__name__) or \
            choices.float_key(node.layer.name, type(node.layer).__name__)
        if key is not None:
            found[id(node)] = key
    return found


def _output_step(node: g.Node, fixed_8bit: bool, single_consumer, absorb) -> Step:
    """The step of an op that sets its own output range (swish, fixed, quantized), or a float step."""
    layer = node.layer
    act = ops.activation_name(layer)
    if isinstance(layer, L.Softmax):
        act = "softmax"
    symbol = getattr(layer, "symbol", None)
    if fixed_8bit and (act in ops.SWISH_ACTIVATIONS or symbol in ops.SWISH_TF_OPS) and len(node.inputs) == 1:
        return Step("swish", node)
    if act in ops.FIXED_RANGE_8BIT and fixed_8bit:
        return Step("fixed", node, fixed_range=ops.FIXED_RANGE_8BIT[act])
    if ops.is_quantized(layer, act):
        step = Step("quantized", node)
        nxt = single_consumer(node.outputs[0]) if len(node.outputs) == 1 else None
        if isinstance(layer, ops.FUSE_AFTER) and nxt is not None \
                and ops.activation_name(nxt.layer) in ops.ABSORBED_ACTIVATIONS:
            absorb(step, nxt)
        return step
    return Step("float", node)
