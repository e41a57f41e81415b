"""The debugger's report folder: report.md, report.json, PNG plots and index.html, written atomically.

Also the one dB format every debugger table uses (`format_db`).
"""

from __future__ import annotations

import html
import json
import math
import os
import shutil
import tempfile
from typing import TYPE_CHECKING

import numpy as np

from qtoolkit.debug.setup import Setup

if TYPE_CHECKING:
    from qtoolkit.debug.measure import Report


def format_db(value) -> str:
    """A dB value for tables: one decimal, "inf", or "-" for None."""
    if value is None:
        return "-"
    return "inf" if value == math.inf else f"{value:.1f}"


def write_report(report: Report, s: Setup, probes: dict, output: str) -> None:
    """Writes the report folder `output` (built in a temporary folder beside it, then renamed into place).

    Args:
      report: what `analyze` measured.
      s: the Setup it measured (network order of the layers, folded weights).
      probes: quantizer name -> the float twin's activations at that quantizer (for the histograms).
      output: the folder; an existing one is replaced.
    """
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
            ax.set_title(f"{e.weights}: per-channel weight ranges (sensitivity {format_db(e.sensitivity_sqnr)} dB)")
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
              f"Output SQNR: simulated {format_db(report.output_sqnr['simulated'])} dB, "
              f"TFLite {format_db(report.output_sqnr.get('tflite'))} dB.\n\n{report.table()}\n")
        with open(os.path.join(tmp, "report.md"), "w") as f:
            f.write(md)
        with open(os.path.join(tmp, "report.json"), "w") as f:
            json.dump(report.to_dict(), f, indent=2)
        imgs = ["sqnr_sensitivity.png", "sqnr_cumulative.png", *weight_figs, *hist_figs]
        rows = "".join(f"<tr><td>{i}</td>" + "".join(f"<td>{html.escape(c)}</td>" for c in (
            e.name, format_db(e.sensitivity_sqnr), format_db(e.sim_sqnr), format_db(e.sim_local_sqnr),
            format_db(e.tflite_sqnr), format_db(e.tflite_local_sqnr))) + "</tr>" for i, e in enumerate(layers, 1))
        page = ("<!doctype html><meta charset=utf-8><title>qtoolkit debug</title>"
                f"<h1>Per-layer quantization error ({html.escape(report.scheme)})</h1>"
                f"<p>{report.samples} held-out samples. Output SQNR: simulated "
                f"{format_db(report.output_sqnr['simulated'])} dB, "
                f"TFLite {format_db(report.output_sqnr.get('tflite'))} dB.</p>"
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
