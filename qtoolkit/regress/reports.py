"""The regression job's files: report.md (`markdown`), JUnit XML (`junit`), JSON-ready values, the baseline.

A result (one per case, built by `run`) is a dict with id, metrics (None on
an error), checks, baseline, passed, failures and seconds.
"""

from __future__ import annotations

import json
import math
import os
import xml.etree.ElementTree as ET
from typing import Optional

import numpy as np

from qtoolkit.regress.config import ConfigError


def _pct(v):
    return "–" if v is None else f"{100 * v:.2f}"


def markdown(results: list[dict], title: str) -> str:
    """report.md: PASSED/FAILED, a table of every case, and a sentence per regression."""
    failed = [r for r in results if not r["passed"]]
    lines = [f"# {title}", "",
             f"**{'FAILED' if failed else 'PASSED'}**: {len(results) - len(failed)} of {len(results)} cases "
             "passed (accuracies in %, measured with the LiteRT interpreter).", "",
             "| case | method | float | int8 | drop (pts) | SQNR (dB) | simulated | sim gap (pts) | baseline | "
             "status |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---|"]
    for r in results:
        m = r["metrics"]
        if m is None:
            lines.append(f"| {r['id']} | – | – | – | – | – | – | – | – | ERROR |")
            continue
        gap = "–" if m["simulation_gap"] is None else f"{m['simulation_gap']:.2f}"
        base = "–" if r["baseline"] is None else _pct(r["baseline"])
        lines.append(f"| {r['id']} | {m['method']} | {_pct(m['float_accuracy'])} | "
                     f"{_pct(m['int8_accuracy'])} | {m['accuracy_drop']:.2f} | {m['sqnr_db']:.1f} | "
                     f"{_pct(m['simulated_accuracy'])} | {gap} | {base} | "
                     f"{'pass' if r['passed'] else '**FAIL**'} |")
    if failed:
        lines += ["", "## Regressions", ""]
        for r in failed:
            for message in r["failures"]:
                lines.append(f"- `{r['id']}`: {message}")
    return "\n".join(lines) + "\n"


def junit(results: list[dict], name: str) -> bytes:
    """JUnit XML: one testsuite, one testcase per case, a <failure> per failed case."""
    failures = sum(1 for r in results if not r["passed"] and r["metrics"] is not None)
    errors = sum(1 for r in results if r["metrics"] is None)
    total = sum(r["seconds"] for r in results)
    suites = ET.Element("testsuites", name=name, tests=str(len(results)), failures=str(failures),
                        errors=str(errors), time=f"{total:.3f}")
    suite = ET.SubElement(suites, "testsuite", name=name, tests=str(len(results)), failures=str(failures),
                          errors=str(errors), skipped="0", time=f"{total:.3f}")
    for r in results:
        entry, _, scheme = r["id"].partition("/")
        tc = ET.SubElement(suite, "testcase", classname=f"regress.{entry}", name=scheme, time=f"{r['seconds']:.3f}")
        if r["metrics"] is None:
            ET.SubElement(tc, "error", message=r["failures"][0], type="error").text = r["failures"][0]
        elif not r["passed"]:
            ET.SubElement(tc, "failure", message="; ".join(r["failures"]), type="regression").text = \
                "\n".join(r["failures"])
        if r["metrics"] is not None:
            m = r["metrics"]
            ET.SubElement(tc, "system-out").text = (
                f"float {_pct(m['float_accuracy'])}% int8 {_pct(m['int8_accuracy'])}% "
                f"drop {m['accuracy_drop']:.2f} SQNR {m['sqnr_db']:.1f} dB")
    ET.indent(suites)
    return b'<?xml version="1.0" encoding="UTF-8"?>\n' + ET.tostring(suites, encoding="utf-8") + b"\n"


def _json_value(v):
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)
    if isinstance(v, np.generic):
        return v.item()
    return v


def clean_json(obj):
    """`obj` (dicts, lists, values) with numpy scalars as Python values and non-finite floats as strings."""
    if isinstance(obj, dict):
        return {k: clean_json(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [clean_json(v) for v in obj]
    return _json_value(obj)


def read_baseline(path: Optional[str]) -> Optional[dict]:
    """The baseline's cases (id -> {"int8_accuracy": x}), or None when there is no baseline file.

    Raises:
      ConfigError: the file cannot be read or is not a qtoolkit baseline.
    """
    if path is None or not os.path.isfile(path):
        return None
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, ValueError) as e:
        raise ConfigError(f"{path}: cannot read the baseline ({e}); fix it or rewrite it with --update_baseline")
    cases = data.get("cases") if isinstance(data, dict) else None
    if not isinstance(cases, dict) or not all(isinstance(v, dict) and isinstance(v.get("int8_accuracy"), float)
                                              for v in cases.values()):
        raise ConfigError(f"{path}: not a qtoolkit baseline (expected {{\"cases\": {{ID: {{\"int8_accuracy\": "
                          "x}}}}}}); rewrite it with --update_baseline")
    return cases
