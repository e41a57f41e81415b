"""The regression job: every case of a config run, checked and written to report.json/.md/.xml (`run`)."""

from __future__ import annotations

import json
import os
import sys
import time

from qtoolkit.regress.config import ConfigError, load_config
from qtoolkit.regress.evaluate import check, evaluate_case
from qtoolkit.regress.reports import clean_json, junit, markdown, read_baseline


def run(config_path: str, output: str = "regression_report", update_baseline: bool = False,
        progress: bool = True, log=print) -> int:
    """Runs a regression config; returns the exit code (0 pass, 1 regression)."""
    from qtoolkit import calibrate, export, loading, rewrite, schemes, zoo

    config = load_config(config_path)
    baseline = None if update_baseline else read_baseline(config.baseline)
    try:
        os.makedirs(output, exist_ok=True)
    except OSError as e:
        raise export.ExportError(f"cannot create the report folder {output} ({e.strerror}); choose another "
                                 "--output") from None
    export.check_writable(os.path.join(output, "report.json"))
    if update_baseline:
        if config.baseline is None:
            raise ConfigError(f"{config_path}: --update_baseline needs a `baseline:` file in the config")
        export.check_writable(config.baseline)
    known = (loading.ModelLoadError, calibrate.DataError, rewrite.UnquantizableLayersError,
             rewrite.UnsupportedModelError, export.ExportError, schemes.SchemeError, zoo.ReferenceUnavailable)
    results = []
    t0 = time.perf_counter()
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(config.cases), desc="regression", unit="case", file=sys.stderr)
    for case in config.cases:
        if bar is not None:
            bar.set_postfix_str(case.id)
        start = time.perf_counter()
        try:
            metrics = evaluate_case(case)
        except known as e:
            metrics, checks = None, []
            failures = [f"error: {e}"]
        else:
            checks = check(case, metrics, baseline)
            failures = [c["message"] for c in checks if not c["passed"]]
        results.append({"id": case.id, "entry": case.entry, "scheme": case.scheme, "qat": case.qat,
                        "model": case.model, "thresholds": case.thresholds, "metrics": metrics, "checks": checks,
                        "baseline": None if baseline is None or case.id not in baseline
                        else baseline[case.id]["int8_accuracy"],
                        "passed": metrics is not None and not failures, "failures": failures,
                        "seconds": time.perf_counter() - start})
        if bar is not None:
            bar.update(1)
        elif log:
            log(f"{case.id}: {'pass' if results[-1]['passed'] else 'FAIL'}")
    if bar is not None:
        bar.close()
    failed = [r for r in results if not r["passed"]]
    title = f"qtoolkit accuracy regression: {os.path.basename(config_path)}"
    report = {"config": os.path.abspath(config_path), "baseline": config.baseline, "passed": not failed,
              "seconds": time.perf_counter() - t0, "cases": results}
    export.write_atomic(os.path.join(output, "report.json"),
                        (json.dumps(clean_json(report), indent=1) + "\n").encode())
    md = markdown(results, title)
    export.write_atomic(os.path.join(output, "report.md"), md.encode())
    export.write_atomic(os.path.join(output, "report.xml"), junit(results, title))
    if log:
        log(md)
    if update_baseline:
        measured = {r["id"]: {"int8_accuracy": r["metrics"]["int8_accuracy"]} for r in results if r["metrics"]}
        export.write_atomic(config.baseline, (json.dumps({"config": os.path.basename(config_path),
                                                          "cases": measured}, indent=1, sort_keys=True)
                                              + "\n").encode())
        if log:
            log(f"baseline written: {config.baseline} ({len(measured)} cases)")
    if failed and log:
        for r in failed:
            for message in r["failures"]:
                print(f"REGRESSION {r['id']}: {message}", file=sys.stderr)
    if log:
        log(f"reports: {os.path.join(output, 'report.md')}, report.json, report.xml")
    return 1 if failed else 0
