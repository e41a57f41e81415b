"""A flat view of a tf_keras model: nodes in topological order, tensors by id.

Keras keeps the graph of a Functional (or built Sequential) model in its
nodes; nested models are single nodes whose inner graph is another model.
`flatten` inlines nested models recursively, so the rewriter sees one flat
list of layer calls, whatever the nesting (TFMOT refuses nested models).

    graph = flatten(model)
    for node in graph.nodes:
        print(node.name, type(node.layer).__name__, node.inputs, node.outputs)
"""

from __future__ import annotations

import dataclasses
from typing import Any

import tensorflow as tf
import tf_keras as keras

from qtoolkit.errors import UnsupportedModelError  # noqa: F401  (raised here; defined with the others)


@dataclasses.dataclass
class TensorRef:
    """A placeholder for tensor `id` inside a node's call arguments."""

    id: int


@dataclasses.dataclass
class Node:
    """One layer call.

    Attributes:
      name: unique name (nested models' layers are prefixed "outer/inner").
      layer: the Keras layer called.
      args, kwargs: the call's arguments, tensors replaced by TensorRef.
      inputs: ids of the tensors among the arguments, in order.
      outputs: ids of the tensors the call produced.
    """

    name: str
    layer: Any
    args: tuple
    kwargs: dict
    inputs: list[int]
    outputs: list[int]


@dataclasses.dataclass
class Graph:
    """A flat model: input tensors, nodes in topological order, output tensors.

    Attributes:
      inputs: ids of the model inputs, in the model's order.
      input_specs: (name, shape, dtype) of each input.
      nodes: the layer calls.
      outputs: ids of the model outputs.
      output_names: the names of the model outputs.
    """

    inputs: list[int]
    input_specs: list[tuple[str, tuple, Any]]
    nodes: list[Node]
    outputs: list[int]
    output_names: list[str]

    def consumers(self) -> dict[int, list[Node]]:
        """Tensor id -> nodes that read it."""
        out: dict[int, list[Node]] = {}
        for node in self.nodes:
            for t in node.inputs:
                out.setdefault(t, []).append(node)
        return out

    def producer(self) -> dict[int, Node]:
        """Tensor id -> node that writes it."""
        return {t: node for node in self.nodes for t in node.outputs}


def _is_model(layer) -> bool:
    return isinstance(layer, keras.Model)


def flatten(model) -> Graph:
    """Flattens a built tf_keras Functional or Sequential model.

    Raises:
      UnsupportedModelError: subclassed (non-graph) models, or models that are
        not tf_keras models (e.g. Keras 3).
    """
    if not isinstance(model, keras.Model):
        from qtoolkit.rewrite import keras3

        if keras3.is_keras3(model):
            raise UnsupportedModelError(
                f"{model.name!r} is a Keras 3 model: the rewriter reads tf_keras graphs; qtoolkit.ptq, "
                "qtoolkit.quantize_model, qtoolkit.debug and `python -m qtoolkit.convert` read a Keras 3 model "
                "into its tf_keras twin first (qtoolkit.rewrite.keras3.to_tf_keras)")
        raise UnsupportedModelError(
            f"expected a Keras model, got {type(model).__module__}.{type(model).__name__}")
    if not getattr(model, "_is_graph_network", False):
        raise UnsupportedModelError(
            f"model {model.name!r} is a subclassed or unbuilt model; qtoolkit needs a Functional or a "
            "built Sequential model (give the first layer an input shape)")
    counter = iter(range(1 << 62))
    ids: dict[int, int] = {}
    specs = []
    inputs = []
    for t in model.inputs:
        ids[id(t)] = next(counter)
        inputs.append(ids[id(t)])
        specs.append((t.name.split(":")[0], tuple(t.shape), t.dtype))
    nodes: list[Node] = []
    _inline(model, "", ids, counter, nodes)
    outputs = [ids[id(t)] for t in model.outputs]
    return Graph(inputs, specs, nodes, outputs, list(model.output_names))


def _inline(model, prefix: str, ids: dict[int, int], counter, nodes: list[Node]) -> None:
    """Appends the nodes of `model` (its inputs already in `ids`)."""
    for depth in sorted(model._nodes_by_depth, reverse=True):
        for node in model._nodes_by_depth[depth]:
            layer = node.layer
            if isinstance(layer, keras.layers.InputLayer):
                continue
            in_tensors = tf.nest.flatten(node.keras_inputs)
            missing = [t for t in in_tensors if id(t) not in ids]
            if missing:
                raise UnsupportedModelError(f"layer {prefix}{layer.name!r} reads a tensor that is not "
                                            "computed from the model inputs")
            out_tensors = tf.nest.flatten(node.outputs)
            if _is_model(layer):
                if not getattr(layer, "_is_graph_network", False):
                    raise UnsupportedModelError(f"nested model {prefix}{layer.name!r} is subclassed; "
                                                "only Functional/Sequential models can be inlined")
                if len(in_tensors) != len(layer.inputs):
                    raise UnsupportedModelError(f"nested model {prefix}{layer.name!r} is called with "
                                                f"{len(in_tensors)} tensors for {len(layer.inputs)} inputs")
                for inner, outer in zip(layer.inputs, in_tensors):
                    ids[id(inner)] = ids[id(outer)]
                _inline(layer, f"{prefix}{layer.name}/", ids, counter, nodes)
                for inner, outer in zip(tf.nest.flatten(layer.outputs), out_tensors):
                    ids[id(outer)] = ids[id(inner)]
                continue
            for t in out_tensors:
                ids[id(t)] = next(counter)

            def ref(value):
                return TensorRef(ids[id(value)]) if id(value) in ids and keras.backend.is_keras_tensor(value) \
                    else value

            args = tf.nest.map_structure(ref, tuple(node.call_args))
            kwargs = tf.nest.map_structure(ref, dict(node.call_kwargs))
            nodes.append(Node(
                name=prefix + layer.name, layer=layer, args=args, kwargs=kwargs,
                inputs=[ids[id(t)] for t in in_tensors], outputs=[ids[id(t)] for t in out_tensors]))


def call(node: Node, tensors: dict[int, Any], layer=None):
    """Calls `layer` (default: the node's) on the node's arguments, from `tensors`."""
    def real(value):
        return tensors[value.id] if isinstance(value, TensorRef) else value

    args = tf.nest.map_structure(real, node.args)
    kwargs = tf.nest.map_structure(real, node.kwargs)
    return (layer or node.layer)(*args, **kwargs)


def inbound_layers(layer) -> list:
    """The layers a built model's `layer` reads, at its first call (empty for an input layer)."""
    nodes = getattr(layer, "_inbound_nodes", None) or []
    inbound = nodes[0].inbound_layers if nodes else []
    return list(inbound) if isinstance(inbound, (list, tuple)) else [inbound]
