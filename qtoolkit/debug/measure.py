"""Per-layer measurement: what `analyze` returns (`Report`, `LayerError`) and how it measures it.

For every activation quantizer ("layer") it measures the sensitivity (only
that layer quantized), the cumulative error (everything quantized; simulated
and in the TFLite model) and the local error estimated from the cumulative
numbers; see the `qtoolkit.debug` docstring. The helpers that switch
quantizers on and off and run the Keras model in batches are shared with
`mixed_precision`.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Optional

import numpy as np

from qtoolkit.batched import run_batched
from qtoolkit import export, rewrite, verify
from qtoolkit.debug.report_files import format_db, write_report
from qtoolkit.debug.setup import setup
from qtoolkit.debug.tflite_tensors import end_quantizers, export_for_debug, read_tensors


@dataclasses.dataclass(frozen=True)
class LayerError:
    """One quantized layer's measurements (SQNR in dB; MSE of the output)."""

    name: str
    quantizer: str
    weights: Optional[str]
    sensitivity_sqnr: float
    sensitivity_mse: float
    sim_sqnr: float
    sim_mse: float
    sim_local_sqnr: float
    tflite_sqnr: Optional[float]
    tflite_mse: Optional[float]
    tflite_local_sqnr: Optional[float]
    tflite_tensor: Optional[str]
    range: tuple

    def to_dict(self) -> dict:
        """The fields as JSON-ready values (infinite SQNR becomes None)."""
        return {k: (None if isinstance(v, float) and not math.isfinite(v) else v)
                for k, v in dataclasses.asdict(self).items()}


@dataclasses.dataclass(frozen=True)
class Report:
    """What `analyze` measured.

    Attributes:
      layers: LayerError per quantized layer, ranked worst first (sensitivity).
      scheme: the scheme's name; samples: held-out samples measured.
      output_sqnr: {"simulated": dB, "tflite": dB} of the whole model (several outputs: `joint_sqnr_db`, and
        "simulated NAME" / "tflite NAME" for each output).
      output: the report folder, or None.
    """

    layers: tuple
    scheme: str
    samples: int
    output_sqnr: dict
    output: Optional[str]

    def ranked(self, by: str = "sensitivity_sqnr") -> list:
        """The layers sorted by the LayerError field `by`, lowest first (None last)."""
        key = lambda e: (math.inf if getattr(e, by) is None else getattr(e, by))  # noqa: E731
        return sorted(self.layers, key=key)

    def table(self, top: Optional[int] = None) -> str:
        """A Markdown table of the layers in report order (the first `top` only, if given)."""
        rows = ["| rank | layer | sensitivity SQNR (dB) | sim. cumulative (dB) | sim. local (dB) | "
                "TFLite cumulative (dB) | TFLite local (dB) | sensitivity MSE |",
                "|---:|---|---:|---:|---:|---:|---:|---:|"]
        for i, e in enumerate(self.layers[:top] if top else self.layers, 1):
            rows.append(f"| {i} | {e.name} | {format_db(e.sensitivity_sqnr)} | {format_db(e.sim_sqnr)} "
                        f"| {format_db(e.sim_local_sqnr)} | {format_db(e.tflite_sqnr)} "
                        f"| {format_db(e.tflite_local_sqnr)} | {e.sensitivity_mse:.3g} |")
        return "\n".join(rows)

    def to_dict(self) -> dict:
        """The report as JSON-ready values (what report.json holds)."""
        return {"scheme": self.scheme, "samples": self.samples,
                "output_sqnr": {k: (None if not math.isfinite(v) else v) for k, v in self.output_sqnr.items()},
                "layers": [e.to_dict() for e in self.layers]}


def worst_layers(report: Report, n: int = 3) -> str:
    """A few lines naming the `n` most sensitive layers."""
    return "\n".join(f"  {i}. {e.name}: {format_db(e.sensitivity_sqnr)} dB output SQNR with only this layer "
                     "quantized" for i, e in enumerate(report.layers[:n], 1))


def _mse(a, b) -> float:
    return float(np.mean((np.asarray(a, np.float64) - np.asarray(b, np.float64)) ** 2))


def _local(cumulative: float, upstream: float) -> float:
    """SQNR of the noise a layer adds: its noise-to-signal ratio minus its input's."""
    ratio = 10 ** (-cumulative / 10) - (0.0 if upstream == math.inf else 10 ** (-upstream / 10))
    return math.inf if ratio <= 0 else -10 * math.log10(ratio)


def layer_quantizers(model) -> list:
    """(layer name, quantizer) of every activation quantizer and FoldedConv weight quantizer of `model`."""
    out = []
    for layer in model.layers:
        if isinstance(layer, rewrite.QuantizeActivation):
            out.append((layer.name, layer.quantizer))
        elif isinstance(layer, rewrite.FoldedConv) and layer.weight_quantizer is not None:
            out.append((layer.name, layer.weight_quantizer))
    return out


class EnabledQuantizers:
    """Context: only the named layers' quantizers enabled (None: all); the previous states restored on exit.

    Args:
      model: the rewritten model.
      names: layer names (see `layer_quantizers`) whose quantizers stay enabled, or None for all.
    """

    def __init__(self, model, names):
        self.quantizers, self.names = layer_quantizers(model), names

    def __enter__(self):
        self.saved = [(q, q.enabled) for _, q in self.quantizers]
        for name, q in self.quantizers:
            q.enabled = self.names is None or name in self.names

    def __exit__(self, *exc):
        for q, state in self.saved:
            q.enabled = state


def _upstream(model, quant_names) -> dict:
    """Quantizer name -> names of the nearest quantizers feeding it."""
    qset = set(quant_names)
    result = {}
    for q in quant_names:
        found, stack, seen = set(), [model.get_layer(q)], set()
        first = True
        while stack:
            layer = stack.pop()
            if id(layer) in seen:
                continue
            seen.add(id(layer))
            if layer.name in qset and not first:
                found.add(layer.name)
                continue
            first = False
            for node in layer.inbound_nodes:
                inbound = node.inbound_layers
                stack.extend(inbound if isinstance(inbound, list) else [inbound])
        result[q] = sorted(found)
    return result


def joint_sqnr_db(references, candidates) -> float:
    """The SQNR of several outputs at once, each weighed by its own signal power (a head of large values does
    not drown a head of small ones): -10 log10(mean over outputs of noise / signal); one output: its SQNR."""
    if len(references) == 1:
        return verify.sqnr_db(references[0], candidates[0])
    ratios = [10.0 ** (-verify.sqnr_db(r, c) / 10.0) for r, c in zip(references, candidates)]
    mean = float(np.mean(ratios))
    return math.inf if mean == 0.0 else -10.0 * math.log10(mean)


def analyze(model: Any, calibration_data: Any = None, scheme: Any = "int8", output: Optional[str] = None, *,
            num_calibration_samples: Optional[int] = None, num_samples: Optional[int] = None,
            tflite: bool = True, allow_unsafe: bool = False, progress: bool = False, image_size=None,
            image_scale=(0.0, 1.0), image_mean=None, image_std=None, image_resize="stretch", _setup=None) -> Report:
    """Measures every quantized layer's error (see the `qtoolkit.debug` docstring); writes the report if `output`.

    Args:
      model: a `prepare.Prepared` state (then the data, scheme and calibration arguments are the ones it was
        prepared with), a tf_keras model or its path.
      calibration_data: see `calibrate.open_source`.
      scheme: "int8", "int16x8", ... or a QuantScheme (not weight-only).
      output: report folder (replaced atomically), or None.
      num_calibration_samples: default up to 500; num_samples: held-out samples measured (default up to 200).
      tflite: also export and measure the TFLite model's intermediate tensors.
      image_size, image_scale, image_mean, image_std, image_resize: for an image folder, see
        `calibrate.open_source`.

    Raises:
      DebugError, loading.ModelLoadError, calibrate.DataError, schemes.SchemeError, export.ExportError.
    """
    if output:
        export.check_writable(output.rstrip("/") + ".tmp")
    s = _setup or setup(model, calibration_data, scheme, num_calibration_samples, num_samples, allow_unsafe,
                        progress, image_size, image_scale, image_mean, image_std, image_resize)
    rw, x = s.rewritten, s.samples
    quant_names = [u[1] for u in s.units]
    float_all = run_batched(rw.float_model, x)
    n_out = len(rw.model.outputs)
    refs, probes = float_all[:n_out], dict(zip(rw.quant_points, float_all[n_out:]))
    import tf_keras as keras

    tap = keras.Model(rw.model.inputs, [*rw.model.outputs] + [rw.model.get_layer(q).output for q in quant_names])
    with EnabledQuantizers(rw.model, None):
        cum = run_batched(tap, x)
    sim_outs = cum[:n_out]
    cum = dict(zip(quant_names, cum[n_out:]))
    sens = {}
    for name, q, conv in s.units:
        with EnabledQuantizers(rw.model, {q, conv} - {None}):
            ys = run_batched(rw.model, x)[:n_out]
        sens[q] = (joint_sqnr_db(refs, ys), float(np.mean([_mse(r, y) for r, y in zip(refs, ys)])))
    up = _upstream(rw.model, quant_names)
    sim_sqnr = {q: verify.sqnr_db(probes[q], cum[q]) for q in quant_names}
    names = export.output_names(rw.model)
    output_sqnr = {"simulated": joint_sqnr_db(refs, sim_outs)}
    if n_out > 1:
        output_sqnr.update({f"simulated {n}": verify.sqnr_db(r, o) for n, r, o in zip(names, refs, sim_outs)})
    tfl_vals, tfl_names = {}, {}
    if tflite:
        data = export_for_debug(s)
        tfl_vals, tfl_names, tfl_outs = read_tensors(data, x, quant_names, end_quantizers(rw))
        output_sqnr["tflite"] = joint_sqnr_db(refs, tfl_outs)
        if n_out > 1:
            output_sqnr.update({f"tflite {n}": verify.sqnr_db(r, o) for n, r, o in zip(names, refs, tfl_outs)})
    tfl_sqnr = {q: verify.sqnr_db(probes[q], v) for q, v in tfl_vals.items() if v.shape == probes[q].shape}

    def local(table, q):
        ups = [table[u] for u in up[q] if u in table]
        return _local(table[q], min(ups) if ups else math.inf)

    layers = []
    for name, q, conv in s.units:
        t = tfl_sqnr.get(q)
        layers.append(LayerError(
            name, q, conv, sens[q][0], sens[q][1], sim_sqnr[q], _mse(probes[q], cum[q]), local(sim_sqnr, q),
            t, None if t is None else _mse(probes[q], tfl_vals[q]), None if t is None else local(tfl_sqnr, q),
            tfl_names.get(q) if t is not None else None, s.calibration.ranges.get(q, (0.0, 0.0))))
    layers.sort(key=lambda e: e.sensitivity_sqnr)
    report = Report(tuple(layers), s.scheme.name, x[0].shape[0], output_sqnr, output)
    if output:
        write_report(report, s, probes, output)
    return report
