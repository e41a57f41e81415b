"""Float vs quantized: run TFLite models with LiteRT and measure the difference.

    from qtoolkit import verify
    tfl = verify.LiteRTModel("model_int8.tflite")
    report = verify.compare(float_outputs, tfl.predict(x), labels=y)
    print(verify.format_table({"float vs int8": report}))

Every number comes from running the models on the data given; nothing is
estimated.  Metrics (all on the model's real-valued outputs):
  * SQNR (dB): 10 log10(sum(ref^2) / sum((ref - out)^2)), the paper's measure;
  * max and mean absolute error; cosine similarity;
  * top-1 agreement (same arg-max over the last axis, at every position: per
    sample for a classifier, per pixel for segmentation, per anchor for a
    detection head), and accuracy of each side when labels are given;
  * the error in units of the output's quantization step (for the simulation gap);
  * a metric of the user's, per output (`metric=`: a function of reference, candidate, labels).

Each output has a task: "classification" (class scores on the last axis),
"regression" (values: SQNR and error metrics only) or "auto" (classification
when the last axis has more than one value).  `compare_outputs` measures every
output of a model against its own float twin.
"""

from __future__ import annotations

import dataclasses
import json
import math
from typing import Callable, Mapping, Optional, Sequence

import numpy as np


@dataclasses.dataclass(frozen=True)
class Comparison:
    """How far `candidate` outputs are from `reference` outputs.

    Attributes:
      samples: number of samples compared.
      sqnr_db: signal-to-quantization-noise ratio in dB (inf when identical).
      max_abs_error, mean_abs_error: absolute output errors.
      cosine: mean cosine similarity of the per-sample output vectors.
      top1_agreement: fraction of positions (samples, pixels, anchors) with the same arg-max over the last
        axis (None for regression outputs and single values).
      reference_accuracy, candidate_accuracy: top-1 accuracy with labels (per position), else None.
      max_error_steps: max abs error divided by the output quantization step, if known.
      beyond_one_step: fraction of output values off by more than one step, if known.
      task: "classification", "regression" or "auto" (see the module docstring).
      metric_name, reference_metric, candidate_metric: the user's metric on each side, if one was given.
    """

    samples: int
    sqnr_db: float
    max_abs_error: float
    mean_abs_error: float
    cosine: float
    top1_agreement: Optional[float]
    reference_accuracy: Optional[float] = None
    candidate_accuracy: Optional[float] = None
    max_error_steps: Optional[float] = None
    beyond_one_step: Optional[float] = None
    task: str = "auto"
    metric_name: Optional[str] = None
    reference_metric: Optional[float] = None
    candidate_metric: Optional[float] = None

    def to_dict(self) -> dict:
        # JSON has no inf/NaN: write them as strings ("inf" for identical outputs).
        return {k: (str(v) if isinstance(v, float) and not math.isfinite(v) else v)
                for k, v in dataclasses.asdict(self).items()}

    @property
    def accuracy_drop(self) -> Optional[float]:
        """Reference minus candidate accuracy, in points (percent), if labels were given."""
        if self.reference_accuracy is None or self.candidate_accuracy is None:
            return None
        return 100.0 * (self.reference_accuracy - self.candidate_accuracy)


def sqnr_db(reference: np.ndarray, candidate: np.ndarray) -> float:
    """10 log10(signal power / noise power); inf for identical outputs."""
    ref = np.asarray(reference, np.float64)
    noise = float(np.sum((ref - np.asarray(candidate, np.float64)) ** 2))
    signal = float(np.sum(ref ** 2))
    if noise == 0.0:
        return math.inf
    if signal == 0.0:
        return -math.inf
    return 10.0 * math.log10(signal / noise)


TASKS = ("auto", "classification", "regression")
Metric = Callable[[np.ndarray, Optional[np.ndarray]], float]  # (outputs, labels) -> value, e.g. a mean IoU


def mean_iou(outputs: np.ndarray, labels: Optional[np.ndarray]) -> float:
    """Mean intersection over union of the arg-max classes with per-position labels (segmentation)."""
    if labels is None:
        raise ValueError("mean_iou needs labels (one class id per position)")
    predicted, y = outputs.argmax(-1).ravel(), np.asarray(labels).reshape(outputs.shape[:-1]).ravel()
    ious = []
    for c in range(outputs.shape[-1]):
        union = np.sum((predicted == c) | (y == c))
        if union:
            ious.append(np.sum((predicted == c) & (y == c)) / union)
    return float(np.mean(ious)) if ious else 0.0


def mean_abs_error(outputs: np.ndarray, labels: Optional[np.ndarray]) -> float:
    """Mean |output - label| (regression outputs with target values of the output's shape)."""
    if labels is None:
        raise ValueError("mean_abs_error needs labels (target values of the output's shape)")
    return float(np.mean(np.abs(outputs - np.asarray(labels, np.float32).reshape(outputs.shape))))


def top5_accuracy(outputs: np.ndarray, labels: Optional[np.ndarray]) -> float:
    """Fraction of positions whose label is among the five highest scores."""
    if labels is None:
        raise ValueError("top5_accuracy needs labels")
    top = np.argsort(outputs, axis=-1)[..., -5:]
    y = np.asarray(labels).reshape(outputs.shape[:-1] + (1,))
    return float(np.mean(np.any(top == y, axis=-1)))


# Metrics by name: what `--output_metrics name=metric` chooses from (Python: these names or any function).
METRICS = {"mean_iou": mean_iou, "mean_abs_error": mean_abs_error, "top5_accuracy": top5_accuracy}


def metric_function(metric) -> Optional[Metric]:
    """A metric given by name (see METRICS) or as a function -> the function; None -> None."""
    if metric is None or callable(metric):
        return metric
    if metric not in METRICS:
        raise ValueError(f"unknown metric {metric!r}; choose one of {', '.join(METRICS)} or pass a function")
    return METRICS[metric]


def compare(reference, candidate, labels=None, output_step: Optional[float] = None, task: str = "auto",
            metric: Optional[Metric] = None) -> Comparison:
    """Compares two models' outputs on the same samples (samples on axis 0).

    Args:
      reference: float outputs, shape (n, ...).
      candidate: quantized outputs, same shape.
      labels: optional int labels for accuracy: one per position, shape (n,) for a classifier, (n, H, W)
        for per-pixel classes (the outputs' shape without the last axis).
      output_step: the output tensor's quantization scale, to express the maximum error in steps.
      task: "classification", "regression" or "auto" (classification when the last axis has > 1 value).
      metric: a function (outputs, labels) -> float, or the name of one in METRICS, measured on both sides
        (its __name__ names it).

    Returns:
      A Comparison.

    Raises:
      ValueError: if the shapes differ, there are no samples, the task is unknown or labels do not fit.
    """
    if task not in TASKS:
        raise ValueError(f"unknown output task {task!r}; choose one of {', '.join(TASKS)}")
    ref = np.asarray(reference, np.float32)
    out = np.asarray(candidate, np.float32)
    if ref.shape != out.shape:
        raise ValueError(f"outputs have different shapes: {ref.shape} vs {out.shape}")
    if ref.shape[0] == 0:
        raise ValueError("no samples to compare")
    n = ref.shape[0]
    diff = np.abs(ref.astype(np.float64) - out)
    flat_r, flat_o = ref.reshape(n, -1).astype(np.float64), out.reshape(n, -1).astype(np.float64)
    norms = np.linalg.norm(flat_r, axis=1) * np.linalg.norm(flat_o, axis=1)
    cos = np.where(norms > 0, np.sum(flat_r * flat_o, axis=1) / np.maximum(norms, 1e-300),
                   np.all(flat_r == flat_o, axis=1).astype(np.float64))
    top1 = ref_acc = out_acc = None
    classes = ref.shape[-1] if ref.ndim > 1 else 1
    if task == "classification" and classes < 2:
        raise ValueError(f"a classification output needs class scores on its last axis; shape {ref.shape}")
    if task == "classification" or (task == "auto" and classes > 1):
        r_cls, o_cls = ref.argmax(-1), out.argmax(-1)  # per sample, per pixel, per anchor
        top1 = float(np.mean(r_cls == o_cls))
        if labels is not None:
            y = np.asarray(labels)
            if y.size != r_cls.size:
                raise ValueError(f"labels of shape {y.shape} do not fit outputs of shape {ref.shape} "
                                 f"(one class id per position: {r_cls.shape})")
            y = y.reshape(r_cls.shape)
            ref_acc, out_acc = float(np.mean(r_cls == y)), float(np.mean(o_cls == y))
    metric_values = (None, None)
    metric = metric_function(metric)
    if metric is not None:
        metric_values = (float(metric(ref, labels)), float(metric(out, labels)))
    return Comparison(
        samples=n, sqnr_db=sqnr_db(ref, out), max_abs_error=float(diff.max()),
        mean_abs_error=float(diff.mean()), cosine=float(cos.mean()), top1_agreement=top1,
        reference_accuracy=ref_acc, candidate_accuracy=out_acc,
        max_error_steps=None if not output_step else float(diff.max() / output_step),
        beyond_one_step=None if not output_step else float(np.mean(diff > output_step * 1.001)),
        task=task, metric_name=None if metric is None else getattr(metric, "__name__", "metric"),
        reference_metric=metric_values[0], candidate_metric=metric_values[1])


def per_output(value, names: Sequence[str], what: str) -> list:
    """`value` given for a model's outputs -> one entry per output name (None where not given).

    A dict is keyed by output name; a list/tuple has one entry per output; anything else is the first
    output's (the only one of a single-output model).

    Raises:
      ValueError: a dict key that names no output, or a list of the wrong length.
    """
    if value is None:
        return [None] * len(names)
    if isinstance(value, Mapping):
        unknown = [k for k in value if k not in names]
        if unknown:
            raise ValueError(f"{what} for {', '.join(map(repr, unknown))}: the model's outputs are "
                             f"{', '.join(names)}")
        return [value.get(k) for k in names]
    if isinstance(value, (list, tuple)) and (len(names) > 1 or (len(value) == 1 and what != "labels")):
        if len(value) != len(names):
            raise ValueError(f"{len(value)} {what} for the model's {len(names)} outputs ({', '.join(names)})")
        return list(value)
    return [value] + [None] * (len(names) - 1)


def compare_outputs(references: Sequence, candidates: Sequence, names: Sequence[str], labels=None,
                    output_steps: Optional[Sequence] = None, tasks=None, metrics=None) -> dict:
    """Every output against its own float twin: output name -> Comparison (see `compare`).

    `labels`, `tasks` and `metrics` are given per output as `per_output` reads them.
    """
    steps = list(output_steps) if output_steps is not None else [None] * len(names)
    ys, ts, ms = (per_output(v, names, w) for v, w in ((labels, "labels"), (tasks, "tasks"),
                                                        (metrics, "metrics")))
    return {name: compare(r, c, y, s, t or "auto", m)
            for name, r, c, y, s, t, m in zip(names, references, candidates, ys, steps, ts, ms)}


class LiteRTModel:
    """A TFLite flatbuffer run by the LiteRT interpreter, with real-valued I/O.

    Quantized inputs are quantized with the model's own input scale and
    zero-point and quantized outputs dequantized, so callers always pass and
    get float32.  Samples run in batches (the batch dimension is resized).

    Args:
      model: path of a .tflite file, or its bytes.
      num_threads: interpreter threads.
      batch_size: samples per invoke.
    """

    def __init__(self, model, num_threads: int = 1, batch_size: int = 32,
                 preserve_all_tensors: bool = False):
        from ai_edge_litert.interpreter import Interpreter

        kwargs = {"model_content": bytes(model)} if isinstance(model, (bytes, bytearray)) else {"model_path": str(model)}
        self._interpreter = Interpreter(num_threads=num_threads,
                                        experimental_preserve_all_tensors=preserve_all_tensors, **kwargs)
        self._interpreter.allocate_tensors()
        self.batch_size = batch_size
        self._batch = None

    @property
    def interpreter(self):
        return self._interpreter

    def input_details(self) -> list[dict]:
        return self._interpreter.get_input_details()

    def output_details(self) -> list[dict]:
        return self._interpreter.get_output_details()

    def output_step(self, index: int = 0) -> Optional[float]:
        """Quantization scale of output `index`, or None when it is float."""
        scale, _ = self.output_details()[index]["quantization"]
        return float(scale) if scale else None

    def _resize(self, n: int) -> None:
        if self._batch == n:
            return
        for d in self.input_details():
            self._interpreter.resize_tensor_input(d["index"], [n, *d["shape_signature"][1:]], strict=False)
        self._interpreter.allocate_tensors()
        self._batch = n

    def predict(self, inputs, batch_size: Optional[int] = None) -> list[np.ndarray] | np.ndarray:
        """Runs the model on float inputs; returns float outputs (a list if several)."""
        arrays = list(inputs) if isinstance(inputs, (list, tuple)) else [inputs]
        details = self.input_details()
        if len(arrays) != len(details):
            raise ValueError(f"the model has {len(details)} inputs, got {len(arrays)} arrays")
        n = arrays[0].shape[0]
        bs = batch_size or self.batch_size
        chunks = [[] for _ in self.output_details()]
        for start in range(0, n, bs):
            batch = [a[start:start + bs] for a in arrays]
            self._resize(batch[0].shape[0])
            for d, a in zip(self.input_details(), batch):
                self._interpreter.set_tensor(d["index"], _to_tensor(a, d))
            self._interpreter.invoke()
            for i, d in enumerate(self.output_details()):
                chunks[i].append(_from_tensor(self._interpreter.get_tensor(d["index"]), d))
        outputs = [np.concatenate(c) for c in chunks]
        return outputs[0] if len(outputs) == 1 else outputs


def _to_tensor(x: np.ndarray, detail: Mapping) -> np.ndarray:
    dtype = detail["dtype"]
    scale, zero_point = detail["quantization"]
    if np.issubdtype(dtype, np.integer) and scale:
        info = np.iinfo(dtype)
        q = np.round(np.asarray(x, np.float32) / scale) + zero_point
        return np.clip(q, info.min, info.max).astype(dtype)
    return np.asarray(x, dtype)


def _from_tensor(t: np.ndarray, detail: Mapping) -> np.ndarray:
    scale, zero_point = detail["quantization"]
    if np.issubdtype(t.dtype, np.integer) and scale:
        return ((t.astype(np.float32) - zero_point) * np.float32(scale)).astype(np.float32)
    return np.array(t, np.float32)


def predict_keras(model, x, batch_size: int = 64, all_outputs: bool = False):
    """Runs a Keras model (tf_keras or Keras 3) in batches, returning numpy (the first output if several).

    `x` is an array, or a list with one array per model input; `all_outputs` returns a list of every output.
    """
    if isinstance(x, (list, tuple)) and len(x) == 1:
        x = x[0]
    out = model.predict(x, batch_size=batch_size, verbose=0)
    outs = list(out.values()) if isinstance(out, dict) else (list(out) if isinstance(out, (list, tuple)) else [out])
    return [np.asarray(o) for o in outs] if all_outputs else np.asarray(outs[0])


_ROWS = (
    ("samples", "samples", "{:d}"),
    ("sqnr_db", "SQNR (dB)", "{:.2f}"),
    ("max_abs_error", "max |error|", "{:.4g}"),
    ("mean_abs_error", "mean |error|", "{:.4g}"),
    ("cosine", "cosine similarity", "{:.6f}"),
    ("top1_agreement", "top-1 agreement", "{:.2%}"),
    ("reference_accuracy", "reference accuracy", "{:.2%}"),
    ("candidate_accuracy", "candidate accuracy", "{:.2%}"),
    ("max_error_steps", "max error (output steps)", "{:.2f}"),
    ("beyond_one_step", "outputs > 1 step off", "{:.3%}"),
    ("reference_metric", "reference {metric}", "{:.4g}"),
    ("candidate_metric", "candidate {metric}", "{:.4g}"),
)


def format_table(comparisons: Mapping[str, Comparison]) -> str:
    """A plain-text table, one column per comparison, one row per metric."""
    names = list(comparisons)
    rows = [["metric", *names]]
    for key, label, fmt in _ROWS:
        values = [getattr(comparisons[n], key) for n in names]
        if all(v is None for v in values):
            continue
        metric = next((comparisons[n].metric_name for n in names if comparisons[n].metric_name), "metric")
        rows.append([label.format(metric=metric), *("-" if v is None else fmt.format(v) for v in values)])
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
             for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def to_json(comparisons: Mapping[str, Comparison], **extra) -> str:
    """The comparisons (and any extra fields) as a JSON document."""
    data = {**extra, "comparisons": {k: v.to_dict() for k, v in comparisons.items()}}
    return json.dumps(data, indent=2, sort_keys=False, default=_json_default)


def _json_default(value):
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    raise TypeError(f"not JSON serializable: {type(value).__name__}")
