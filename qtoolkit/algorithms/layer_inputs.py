"""Layer inputs for layer-by-layer algorithms, from one pass through the model.

    stepper = LayerInputs(rewritten.model, inputs)
    x = stepper.inputs_of("conv_pw_3")[0]   # runs every layer before it, once
    ...                                     # change conv_pw_3's weights
    y = stepper.run_next()[0]               # runs conv_pw_3 with its new weights

Running `keras.Model(model.inputs, layer.input)` for every layer recomputes
the whole model up to that layer each time (and traces a new predict
function); AdaRound's asymmetric reconstruction needs each layer's input in
the quantized model with the earlier layers already changed, which a single
pass gives when it pauses before each layer: the layers after it run only
once its weights are final.  Each layer runs eagerly on chunks of the held
samples; a tensor is dropped once every layer that reads it has run.
"""

from __future__ import annotations

import tensorflow as tf

from qtoolkit.rewrite.graph import TensorRef, flatten


class LayerInputs:
    """Steps through a tf_keras model's flattened graph on held samples.

    Args:
      model: a Functional tf_keras model (nested models are inlined).
      inputs: one array per model input, samples on axis 0.
      chunk: samples per layer call (bounds the memory of one call).
      keep: names of nodes whose outputs `outputs_of` returns, whenever they ran.
    """

    def __init__(self, model, inputs, chunk: int = 64, keep=()):
        self.graph = flatten(model)
        self.keep, self.kept = set(keep), {}
        self.chunk = chunk
        self.n = int(inputs[0].shape[0])
        self.values = {t: tf.convert_to_tensor(a) for t, a in zip(self.graph.inputs, inputs)}
        self.readers: dict[int, int] = {}
        for node in self.graph.nodes:
            for t in node.inputs:
                self.readers[t] = self.readers.get(t, 0) + 1
        self.position = 0

    def outputs_of(self, name: str) -> list:
        """The outputs of the node `name` (one of `keep`), running the nodes up to it if it has not run yet.

        Two models of one graph may order independent layers differently (a residual block's conv and its
        shortcut): a kept node's outputs wait here from when it runs until they are asked for.
        """
        while name not in self.kept:
            if self.position == len(self.graph.nodes):
                raise KeyError(f"no layer {name!r} kept or left to run")
            self.run_next()
        return self.kept.pop(name)

    def inputs_of(self, name: str) -> list:
        """Runs every node before the node `name` (not yet run); returns the tensors it reads, in order."""
        nodes = self.graph.nodes
        while self.position < len(nodes) and nodes[self.position].name != name:
            self.run_next()
        if self.position == len(nodes):
            raise KeyError(f"no layer {name!r} left to run in {[n.name for n in nodes]}")
        return [self.values[t] for t in nodes[self.position].inputs]

    def run_next(self) -> list:
        """Runs the next node on all samples; returns its outputs."""
        node = self.graph.nodes[self.position]
        self.position += 1
        parts = []
        for start in range(0, self.n, self.chunk):
            def value(x, start=start):
                return self.values[x.id][start:start + self.chunk] if isinstance(x, TensorRef) else x

            args = tf.nest.map_structure(value, node.args, check_types=False)
            kwargs = tf.nest.map_structure(value, node.kwargs, check_types=False)
            parts.append(tf.nest.flatten(node.layer(*args, **kwargs)))
        outputs = [p[0] if len(p) == 1 else tf.concat(p, 0) for p in zip(*parts)]
        for t in node.inputs:
            self.readers[t] -= 1
            if self.readers[t] == 0:
                del self.values[t]
        for t, y in zip(node.outputs, outputs):
            if self.readers.get(t, 0):
                self.values[t] = y
        if node.name in self.keep:
            self.kept[node.name] = outputs
        return outputs
