"""Per-layer quantization error: where a quantized model loses accuracy, in tables and pictures.

    python -m qtoolkit.debug --model model.keras --calibration_data calib.npy --output report_dir
    report = qtoolkit.debug.analyze("model.keras", "calib.npy", output="report_dir")

For every activation quantizer of the rewritten model (a "layer": the op
whose output it quantizes, with that op's weight quantizer) it measures, on
held-out samples, the SQNR and MSE against the float model:

- sensitivity: only that layer quantized, everything else float; SQNR of the
  model output.
- cumulative: everything quantized; SQNR of that layer's output against the
  float twin's, in the simulation and in the exported TFLite model (its
  intermediate tensors, read with the interpreter's
  experimental_preserve_all_tensors and matched by the quantizer's name).
- local: the error the layer adds to what it receives, estimated from the
  cumulative numbers (noise-to-signal ratio of the layer's output minus that
  of its noisiest quantized input), for both measurements.

It writes a ranked table (report.md, report.json), PNG plots and index.html
into the output folder (a temporary folder renamed into place).

`mixed_precision` uses the sensitivities to keep the fewest layers float so
that a budget (minimum output SQNR, or maximum accuracy drop) is met on the
exported model, measured with the LiteRT interpreter.
"""

from __future__ import annotations

import dataclasses
import html
import json
import math
import os
import shutil
import sys
import tempfile
from typing import Any, Optional

import numpy as np

from qtoolkit import _env  # noqa: F401  (before TensorFlow)
from qtoolkit import calibrate as cal
from qtoolkit import export, latency, rewrite, verify
from qtoolkit.loading import LoadedModel, load_model
from qtoolkit.schemes import QuantScheme, load as load_scheme


class DebugError(ValueError):
    """The model or scheme cannot be debugged (e.g. weight-only scheme)."""


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
        return {k: (None if isinstance(v, float) and not math.isfinite(v) else v)
                for k, v in dataclasses.asdict(self).items()}


@dataclasses.dataclass(frozen=True)
class Report:
    """What `analyze` measured.

    Attributes:
      layers: LayerError per quantized layer, ranked worst first (sensitivity).
      scheme: the scheme's name; samples: held-out samples measured.
      output_sqnr: {"simulated": dB, "tflite": dB} of the whole model.
      output: the report folder, or None.
    """

    layers: tuple
    scheme: str
    samples: int
    output_sqnr: dict
    output: Optional[str]

    def ranked(self, by: str = "sensitivity_sqnr") -> list:
        key = lambda e: (math.inf if getattr(e, by) is None else getattr(e, by))  # noqa: E731
        return sorted(self.layers, key=key)

    def table(self, top: Optional[int] = None) -> str:
        rows = ["| rank | layer | sensitivity SQNR (dB) | sim. cumulative (dB) | sim. local (dB) | "
                "TFLite cumulative (dB) | TFLite local (dB) | sensitivity MSE |",
                "|---:|---|---:|---:|---:|---:|---:|---:|"]
        for i, e in enumerate(self.layers[:top] if top else self.layers, 1):
            rows.append(f"| {i} | {e.name} | {_db(e.sensitivity_sqnr)} | {_db(e.sim_sqnr)} | {_db(e.sim_local_sqnr)} "
                        f"| {_db(e.tflite_sqnr)} | {_db(e.tflite_local_sqnr)} | {e.sensitivity_mse:.3g} |")
        return "\n".join(rows)

    def to_dict(self) -> dict:
        return {"scheme": self.scheme, "samples": self.samples,
                "output_sqnr": {k: (None if not math.isfinite(v) else v) for k, v in self.output_sqnr.items()},
                "layers": [e.to_dict() for e in self.layers]}


def _db(value) -> str:
    if value is None:
        return "-"
    return "inf" if value == math.inf else f"{value:.1f}"


def _mse(a, b) -> float:
    return float(np.mean((np.asarray(a, np.float64) - np.asarray(b, np.float64)) ** 2))


def _local(cumulative: float, upstream: float) -> float:
    """SQNR of the noise a layer adds: its noise-to-signal ratio minus its input's."""
    ratio = 10 ** (-cumulative / 10) - (0.0 if upstream == math.inf else 10 ** (-upstream / 10))
    return math.inf if ratio <= 0 else -10 * math.log10(ratio)


@dataclasses.dataclass
class _Setup:
    keras_model: Any
    scheme: QuantScheme
    rewritten: Any
    calibration: Any
    samples: list
    units: list          # (name, quantizer layer name, FoldedConv name or None)
    calibration_samples: list = None  # int16x8 only, one array per input: the converter calibrates on these


def _prepare(model, calibration_data, scheme, num_calibration_samples, num_samples, allow_unsafe,
             progress, image_size=None, image_scale=(0.0, 1.0)) -> _Setup:
    scheme = load_scheme(scheme) if not isinstance(scheme, QuantScheme) else scheme
    if scheme.activations is None:
        raise DebugError(f"scheme {scheme.name!r} quantizes only weights: there are no per-layer activation "
                         "errors to debug; use int8 or int16x8")
    loaded = model if isinstance(model, LoadedModel) else (
        load_model(model, allow_unsafe) if isinstance(model, str) else LoadedModel("<in memory>", model, "keras"))
    if loaded.keras_model is None:
        raise DebugError(f"{loaded.path}: a SavedModel without Keras metadata cannot be rewritten layer by layer; "
                         "give the .keras/.h5 model")
    keras_model = loaded.keras_model
    specs = [(t.name.split(":")[0], tuple(t.shape), t.dtype.as_numpy_dtype) for t in keras_model.inputs]
    source = cal.open_source(calibration_data, specs, image_size, image_scale)
    n = source.num_samples
    n_ver = num_samples or (min(200, max(1, n // 5)) if n else 100)
    n_cal = num_calibration_samples or (min(500, n - n_ver) if n else 250)
    if n is not None and n_cal + n_ver > n:
        raise cal.DataError(f"{source.description}: {n} samples, fewer than {n_cal} calibration + {n_ver} "
                            "measured samples; give more data or lower --num_calibration_samples/--num_samples")
    rewritten = rewrite.rewrite(keras_model, scheme)
    cal_samples = None
    if scheme.activations.bits == 16:  # kept in memory: the int16x8 export calibrates on the same samples
        cal_samples = source.collect(n_cal)
    calibration = cal.calibrate(rewritten, source if cal_samples is None else cal.open_source(list(cal_samples), specs),
                                n_cal, scheme, progress=progress)
    samples = source.collect(n_ver)
    units = []
    names = {layer.name for layer in rewritten.model.layers}
    for q in rewritten.quant_points:
        base = q[:-len("_quant")]
        conv = next((c for c in (base, base[:-len("_preact")] if base.endswith("_preact") else None)
                     if c and c in names and isinstance(rewritten.model.get_layer(c), rewrite.FoldedConv)), None)
        units.append((base, q, conv))
    return _Setup(keras_model, scheme, rewritten, calibration, samples, units, cal_samples)


def _quantizers(model):
    out = []
    for layer in model.layers:
        if isinstance(layer, rewrite.QuantizeActivation):
            out.append((layer.name, layer.quantizer))
        elif isinstance(layer, rewrite.FoldedConv) and layer.weight_quantizer is not None:
            out.append((layer.name, layer.weight_quantizer))
    return out


class _Enabled:
    """Context: only the named layers' quantizers enabled (None: all)."""

    def __init__(self, model, names):
        self.quantizers, self.names = _quantizers(model), names

    def __enter__(self):
        self.saved = [(q, q.enabled) for _, q in self.quantizers]
        for name, q in self.quantizers:
            q.enabled = self.names is None or name in self.names

    def __exit__(self, *exc):
        for q, state in self.saved:
            q.enabled = state


def _run(model, samples, batch_size=64):
    """Eager batched call (quantizers' `enabled` is read at each call)."""
    x = samples
    n = x[0].shape[0]
    outs = None
    for i in range(0, n, batch_size):
        batch = [a[i:i + batch_size] for a in x]
        y = model(batch if len(batch) > 1 else batch[0], training=False)
        y = [t.numpy() for t in (y if isinstance(y, (list, tuple)) else [y])]
        outs = [[t] for t in y] if outs is None else [o + [t] for o, t in zip(outs, y)]
    return [np.concatenate(o) for o in outs]


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


def _tflite_tensors(data: bytes, samples, quant_names, ends: Optional[dict] = None) -> tuple[dict, dict, np.ndarray]:
    """Runs the flatbuffer keeping all tensors; returns name -> dequantized values of each quantizer.

    `ends` maps quantizers no op is named after (the model input's, the model
    output's: the converter names those tensors after the signature) to
    "input" or "output": they are matched to the quantized tensor after the
    input's QUANTIZE op, or before the output's DEQUANTIZE op.
    """
    from ai_edge_litert.interpreter import Interpreter

    import warnings

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "Warning: Enabling `experimental_preserve_all_tensors`")
        interp = Interpreter(model_content=bytes(data), experimental_preserve_all_tensors=True, num_threads=1)
    interp.allocate_tensors()
    details = {d["index"]: d for d in interp.get_tensor_details()}
    ops = interp._get_ops_details()
    outputs_in_order = [i for op in ops for i in op["outputs"]]
    match = {}
    for q in quant_names:
        # The converter names an op's output after the Keras layers of the ops fused into it
        # ("model_quant/c1/Relu;model_quant/c1/Conv2D"): the layer that feeds quantizer q is q
        # without "_quant" (and without "_preact" for a conv whose activation runs separately).
        base = q[:-len("_quant")]
        wanted = {q, base, base[:-len("_preact")] if base.endswith("_preact") else base}
        for index in outputs_in_order:
            d = details[index]
            parts = {p.split("/")[1] for p in d["name"].split(";") if p.count("/") >= 1}
            if parts & wanted and d["dtype"] in (np.int8, np.int16, np.float32):
                match[q] = d  # the last op output of that layer
    for q, end in (ends or {}).items():
        if q in match:
            continue
        if end == "input":
            ins = {d["index"] for d in interp.get_input_details()}
            found = [op["outputs"][0] for op in ops if op["op_name"] == "QUANTIZE" and op["inputs"][0] in ins]
            found = found or [i for i in ins if details[i]["dtype"] != np.float32]
        else:
            outs = {d["index"] for d in interp.get_output_details()}
            found = [op["inputs"][0] for op in ops if op["op_name"] == "DEQUANTIZE" and op["outputs"][0] in outs]
            found = found or [i for i in outs if details[i]["dtype"] != np.float32]
        if len(found) == 1:
            match[q] = details[found[0]]
    values = {q: [] for q in match}
    outputs = []
    inp = interp.get_input_details()
    n = samples[0].shape[0]
    for i in range(n):
        for d, a in zip(inp, samples):
            interp.set_tensor(d["index"], verify._to_tensor(a[i:i + 1], d))
        interp.invoke()
        outputs.append(verify._from_tensor(interp.get_tensor(interp.get_output_details()[0]["index"]),
                                           interp.get_output_details()[0]))
        for q, d in match.items():
            t = interp.get_tensor(d["index"])
            scale, zero = d["quantization"]
            values[q].append(t.astype(np.float32) if not scale else (t.astype(np.float32) - zero) * scale)
    return ({q: np.concatenate(v) for q, v in values.items()}, {q: d["name"] for q, d in match.items()},
            np.concatenate(outputs))


def analyze(model: Any, calibration_data: Any, scheme: Any = "int8", output: Optional[str] = None, *,
            num_calibration_samples: Optional[int] = None, num_samples: Optional[int] = None,
            tflite: bool = True, allow_unsafe: bool = False, progress: bool = False, image_size=None,
            image_scale=(0.0, 1.0), _setup=None) -> Report:
    """Measures every quantized layer's error (see the module docstring); writes the report if `output`.

    Args:
      model: a tf_keras model or its path.
      calibration_data: see `calibrate.open_source`.
      scheme: "int8", "int16x8", ... or a QuantScheme (not weight-only).
      output: report folder (replaced atomically), or None.
      num_calibration_samples: default up to 500; num_samples: held-out samples measured (default up to 200).
      tflite: also export and measure the TFLite model's intermediate tensors.

    Raises:
      DebugError, loading.ModelLoadError, calibrate.DataError, schemes.SchemeError, export.ExportError.
    """
    if output:
        export.check_writable(output.rstrip("/") + ".tmp")
    s = _setup or _prepare(model, calibration_data, scheme, num_calibration_samples, num_samples, allow_unsafe,
                           progress, image_size, image_scale)
    rw, x = s.rewritten, s.samples
    quant_names = [u[1] for u in s.units]
    float_all = _run(rw.float_model, x)
    n_out = len(rw.model.outputs)
    ref, probes = float_all[0], dict(zip(rw.quant_points, float_all[n_out:]))
    import tf_keras as keras

    tap = keras.Model(rw.model.inputs, [rw.model.outputs[0]] + [rw.model.get_layer(q).output for q in quant_names])
    with _Enabled(rw.model, None):
        cum = _run(tap, x)
    sim_out = cum[0]
    cum = dict(zip(quant_names, cum[1:]))
    sens = {}
    for name, q, conv in s.units:
        with _Enabled(rw.model, {q, conv} - {None}):
            y = _run(rw.model, x)[0]
        sens[q] = (verify.sqnr_db(ref, y), _mse(ref, y))
    up = _upstream(rw.model, quant_names)
    sim_sqnr = {q: verify.sqnr_db(probes[q], cum[q]) for q in quant_names}
    output_sqnr = {"simulated": verify.sqnr_db(ref, sim_out)}
    tfl_vals, tfl_names = {}, {}
    if tflite:
        data = _export(s)
        tfl_vals, tfl_names, tfl_out = _tflite_tensors(data, x, quant_names, _ends(rw))
        output_sqnr["tflite"] = verify.sqnr_db(ref, tfl_out)
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
        _write(report, s, probes, output)
    return report


def _export(s: _Setup) -> bytes:
    if s.scheme.activations.bits == 16:
        # No fake-quant path for 16-bit activations: the converter calibrates the folded float twin itself on
        # the same calibration samples (its ranges are min/max, not necessarily the scheme's method).
        import tf_keras as keras

        rw = s.rewritten
        twin = keras.Model(rw.float_model.inputs, rw.float_model.outputs[:len(rw.model.outputs)])
        cal_samples = s.calibration_samples

        def representative():
            for i in range(cal_samples[0].shape[0]):
                yield [a[i:i + 1] for a in cal_samples]

        return export.converter_ptq_tflite(twin, representative, int16x8=True, io_dtype="float32")
    return export.fake_quant_to_tflite(s.rewritten.model, "float32")


def _ends(rw) -> dict:
    """Quantizers on the model's input and output (see `_tflite_tensors`)."""
    ends = {}
    for kind, tensors in (("input", rw.model.inputs), ("output", rw.model.outputs[:1])):
        for t in tensors:
            layer = t._keras_history.layer
            if kind == "input":  # the quantizer that consumes the input layer
                layer = next((n.outbound_layer for n in layer._outbound_nodes
                              if n.outbound_layer.name in rw.quant_points), None)
            if layer is not None and layer.name in rw.quant_points:
                ends[layer.name] = kind
    return ends


# ---- report writing -------------------------------------------------------------------------------------------

def _write(report: Report, s: _Setup, probes: dict, output: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    parent = os.path.dirname(os.path.abspath(output)) or "."
    tmp = tempfile.mkdtemp(prefix=".debug-", dir=parent)
    try:
        layers = list(report.layers)
        names = [e.name for e in layers]
        y = np.arange(len(layers))
        fig, ax = plt.subplots(figsize=(8, 0.32 * len(layers) + 1.5))
        cap = lambda v: 80.0 if v is None or v == math.inf else min(v, 80.0)  # noqa: E731
        h = 0.27
        ax.barh(y - h, [cap(e.sensitivity_sqnr) for e in layers], h, label="sensitivity (only this layer, output)")
        ax.barh(y, [cap(e.sim_local_sqnr) for e in layers], h, label="local, simulated")
        ax.barh(y + h, [cap(e.tflite_local_sqnr) for e in layers], h, label="local, TFLite")
        ax.set_yticks(y, names, fontsize=8)
        ax.invert_yaxis()
        ax.set_xlabel("SQNR (dB, higher is better; capped at 80)")
        ax.set_title(f"Per-layer SQNR, {report.scheme}, ranked worst first")
        ax.legend(fontsize=7, loc="lower right")
        fig.tight_layout()
        fig.savefig(os.path.join(tmp, "sqnr_sensitivity.png"), dpi=80)
        plt.close(fig)
        order = [e for e in s.units]  # network order
        by_q = {e.quantizer: e for e in layers}
        fig, ax = plt.subplots(figsize=(8, 3.5))
        xs = np.arange(len(order))
        ax.plot(xs, [cap(by_q[u[1]].sim_sqnr) for u in order], "o-", label="simulated")
        ax.plot(xs, [cap(by_q[u[1]].tflite_sqnr) for u in order], "s--", label="TFLite")
        ax.set_xticks(xs, [u[0] for u in order], rotation=60, ha="right", fontsize=7)
        ax.set_ylabel("cumulative SQNR (dB)")
        ax.set_title("Cumulative SQNR through the network (all layers quantized)")
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(os.path.join(tmp, "sqnr_cumulative.png"), dpi=80)
        plt.close(fig)
        weight_figs = []
        for e in [e for e in layers if e.weights][:3]:
            k = s.rewritten.model.get_layer(e.weights).kernel.numpy()
            k = k.reshape(-1, k.shape[-1]) if k.ndim > 1 else k[:, None]
            if s.rewritten.model.get_layer(e.weights).kind == "depthwise":
                k = s.rewritten.model.get_layer(e.weights).kernel.numpy()
                k = k.reshape(-1, k.shape[2] * k.shape[3])
            fig, ax = plt.subplots(figsize=(7, 3))
            c = np.arange(k.shape[1])
            ax.vlines(c, k.min(0), k.max(0), lw=3)
            ax.set_xlabel("output channel")
            ax.set_ylabel("weight (folded)")
            ax.set_title(f"{e.weights}: per-channel weight ranges (sensitivity {_db(e.sensitivity_sqnr)} dB)")
            fig.tight_layout()
            fname = f"weights_{_file(e.weights)}.png"
            fig.savefig(os.path.join(tmp, fname), dpi=80)
            plt.close(fig)
            weight_figs.append(fname)
        hist_figs = []
        for e in layers[:3]:
            v = probes[e.quantizer].ravel()
            lo, hi = e.range
            fig, ax = plt.subplots(figsize=(7, 3))
            ax.hist(v, bins=200, log=True)
            ax.axvline(lo, color="r", ls="--", label=f"clip range [{lo:.3g}, {hi:.3g}]")
            ax.axvline(hi, color="r", ls="--")
            ax.set_title(f"{e.name}: float activation histogram ({v.size} values)")
            ax.legend(fontsize=8)
            fig.tight_layout()
            fname = f"hist_{_file(e.name)}.png"
            fig.savefig(os.path.join(tmp, fname), dpi=80)
            plt.close(fig)
            hist_figs.append(fname)
        md = (f"# Per-layer quantization error ({report.scheme}, {report.samples} held-out samples)\n\n"
              f"Output SQNR: simulated {_db(report.output_sqnr['simulated'])} dB, "
              f"TFLite {_db(report.output_sqnr.get('tflite'))} dB.\n\n{report.table()}\n")
        with open(os.path.join(tmp, "report.md"), "w") as f:
            f.write(md)
        with open(os.path.join(tmp, "report.json"), "w") as f:
            json.dump(report.to_dict(), f, indent=2)
        imgs = ["sqnr_sensitivity.png", "sqnr_cumulative.png", *weight_figs, *hist_figs]
        rows = "".join(f"<tr><td>{i}</td>" + "".join(f"<td>{html.escape(c)}</td>" for c in (
            e.name, _db(e.sensitivity_sqnr), _db(e.sim_sqnr), _db(e.sim_local_sqnr), _db(e.tflite_sqnr),
            _db(e.tflite_local_sqnr))) + "</tr>" for i, e in enumerate(layers, 1))
        page = ("<!doctype html><meta charset=utf-8><title>qtoolkit debug</title>"
                f"<h1>Per-layer quantization error ({html.escape(report.scheme)})</h1>"
                f"<p>{report.samples} held-out samples. Output SQNR: simulated "
                f"{_db(report.output_sqnr['simulated'])} dB, TFLite {_db(report.output_sqnr.get('tflite'))} dB.</p>"
                "<table border=1 cellpadding=3><tr><th>rank<th>layer<th>sensitivity<th>sim. cumulative"
                "<th>sim. local<th>TFLite cumulative<th>TFLite local</tr>" + rows + "</table>"
                + "".join(f'<p><img src="{i}"></p>' for i in imgs))
        with open(os.path.join(tmp, "index.html"), "w") as f:
            f.write(page)
        if os.path.isdir(output):
            shutil.rmtree(output)
        os.replace(tmp, output)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _file(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_" else "_" for c in name)


# ---- automatic mixed precision --------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Choice:
    """One candidate model: the layers kept float and what was measured on it with the LiteRT interpreter."""

    kept_float: tuple
    sqnr_db: float
    accuracy_drop: Optional[float]
    size_bytes: int
    latency_ms: float
    meets_budget: bool


@dataclasses.dataclass(frozen=True)
class MixedPrecision:
    """What `mixed_precision` chose (`tflite`, the first choice meeting the budget) and every choice tried."""

    tflite: bytes
    kept_float: tuple
    choices: tuple
    budget: str
    met: bool

    def summary(self) -> str:
        lines = [f"mixed precision, budget {self.budget}: "
                 + (f"met keeping {len(self.kept_float)} layer(s) float: {', '.join(self.kept_float) or 'none'}"
                    if self.met else "NOT met even with every measured layer kept float"),
                 "| layers kept float | output SQNR (dB) | accuracy drop (points) | size (bytes) | latency (ms) | meets |",
                 "|---|---:|---:|---:|---:|---|"]
        for c in self.choices:
            drop = "-" if c.accuracy_drop is None else f"{c.accuracy_drop:.2f}"
            lines.append(f"| {', '.join(c.kept_float) or '(none: all int8)'} | {_db(c.sqnr_db)} | {drop} | "
                         f"{c.size_bytes} | {c.latency_ms:.3f} | {'yes' if c.meets_budget else 'no'} |")
        return "\n".join(lines)


def mixed_precision(model: Any, calibration_data: Any, scheme: Any = "int8", output: Optional[str] = None, *,
                    budget_min_sqnr: Optional[float] = None, budget_max_accuracy_drop: Optional[float] = None,
                    labels: Optional[np.ndarray] = None, num_calibration_samples: Optional[int] = None,
                    num_samples: Optional[int] = None, io_dtype: str = "int8", allow_unsafe: bool = False,
                    progress: bool = False, image_size=None, image_scale=(0.0, 1.0)) -> MixedPrecision:
    """Keeps the fewest layers float (most sensitive first) so the exported model meets the budget.

    Each candidate is converted and measured with the LiteRT interpreter on
    the held-out samples (output SQNR against the float model, or the top-1
    accuracy drop in points against `labels` of those samples); its size and
    median latency (latency.median_ms) are reported.  Layers kept at higher
    precision are kept float: the fake-quant path has no 16-bit activations.

    Raises:
      ValueError: no budget or both, or an accuracy budget without labels.
    """
    if (budget_min_sqnr is None) == (budget_max_accuracy_drop is None):
        raise ValueError("give exactly one budget: budget_min_sqnr (dB) or budget_max_accuracy_drop (points)")
    if budget_max_accuracy_drop is not None and labels is None:
        raise ValueError("budget_max_accuracy_drop needs the labels of the verification samples (--labels)")
    if output:
        export.check_writable(output)
    s = _prepare(model, calibration_data, scheme, num_calibration_samples, num_samples, allow_unsafe, progress,
                 image_size, image_scale)
    if s.scheme.activations.bits != 8:
        raise DebugError(f"mixed precision starts from an 8-bit activation scheme, not {s.scheme.name!r}")
    report = analyze(None, None, s.scheme, tflite=False, _setup=s)
    x = s.samples
    ref = _run(s.keras_model, x)[0]
    y = None if labels is None else np.asarray(labels).reshape(-1)[:x[0].shape[0]]
    if y is not None and y.shape[0] != x[0].shape[0]:
        raise ValueError(f"{y.shape[0]} labels for {x[0].shape[0]} verification samples")
    unit_of = {u[1]: u for u in s.units}
    budget = (f"output SQNR >= {budget_min_sqnr} dB" if budget_min_sqnr is not None
              else f"accuracy drop <= {budget_max_accuracy_drop} points")
    all_names = {name for name, _ in _quantizers(s.rewritten.model)}
    choices, chosen = [], None
    for k in range(len(report.layers) + 1):
        kept = report.layers[:k]
        off = {n for e in kept for n in unit_of[e.quantizer][1:] if n}
        with _Enabled(s.rewritten.model, all_names - off):
            data = export.fake_quant_to_tflite(s.rewritten.model, io_dtype)
        out = verify.LiteRTModel(data).predict(x)
        out = out[0] if isinstance(out, list) else out
        comparison = verify.compare(ref, out, y)
        drop = comparison.accuracy_drop
        meets = comparison.sqnr_db >= budget_min_sqnr if budget_min_sqnr is not None else (
            drop is not None and drop <= budget_max_accuracy_drop)
        choice = Choice(tuple(e.name for e in kept), comparison.sqnr_db, drop, len(data), latency.median_ms(data),
                        bool(meets))
        choices.append(choice)
        if meets:
            chosen = (data, choice)
            break
    if chosen is None:
        chosen = (data, choices[-1])
    if output:
        export.write_atomic(output, chosen[0])
    return MixedPrecision(chosen[0], chosen[1].kept_float, tuple(choices), budget, chosen[1].meets_budget)


def worst_layers(report: Report, n: int = 3) -> str:
    """A few lines naming the `n` most sensitive layers."""
    return "\n".join(f"  {i}. {e.name}: {_db(e.sensitivity_sqnr)} dB output SQNR with only this layer quantized"
                     for i, e in enumerate(report.layers[:n], 1))


# ---- command line ---------------------------------------------------------------------------------------------

def main(argv):
    from absl import app, flags

    f = flags.FLAGS
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    missing = [f"--{n}" for n in ("model", "calibration_data", "output") if not getattr(f, n)]
    if missing:
        raise app.UsageError(f"missing required flag(s): {', '.join(missing)}")
    import logging

    logging.getLogger("tensorflow").setLevel(logging.ERROR)
    from qtoolkit import loading, schemes

    known = (DebugError, loading.ModelLoadError, cal.DataError, schemes.SchemeError, export.ExportError,
             rewrite.UnsupportedModelError)
    try:
        with _env.quiet_native_stderr(enabled=True):
            report = analyze(f.model, f.calibration_data, f.scheme, f.output,
                             num_calibration_samples=f.num_calibration_samples, num_samples=f.num_samples,
                             tflite=f.tflite, allow_unsafe=f.allow_unsafe_deserialization)
    except known as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"output SQNR: simulated {_db(report.output_sqnr['simulated'])} dB, "
          f"TFLite {_db(report.output_sqnr.get('tflite'))} dB ({report.samples} held-out samples)")
    print(report.table())
    print(f"report: {os.path.join(f.output, 'index.html')} (also report.md, report.json, PNG plots)")
    return 0


def _define_flags():
    from absl import flags

    flags.DEFINE_string("model", None, ".keras/.h5 file or Keras SavedModel folder (tf_keras).")
    flags.DEFINE_string("calibration_data", None, ".npy/.npz or image folder, as for qtoolkit.convert.")
    flags.DEFINE_string("scheme", "int8", "Preset or scheme .yaml (int8, int8_per_tensor, int16x8, ...).")
    flags.DEFINE_string("output", None, "Report folder (replaced atomically).")
    flags.DEFINE_integer("num_calibration_samples", None, "Calibration samples (default up to 500).")
    flags.DEFINE_integer("num_samples", None, "Held-out samples measured (default up to 200).")
    flags.DEFINE_bool("tflite", True, "Also measure the exported TFLite model's intermediate tensors.")
    flags.DEFINE_bool("allow_unsafe_deserialization", False, "Allow Lambda layers (trusted files only).")


if __name__ == "__main__":
    from absl import app

    _define_flags()
    app.run(main)
