"""The regression job: every case of a config run, checked and written to report.json/.md/.xml (`run`)."""

from __future__ import annotations

import json
import os
import sys
import time
from typing import Optional

from qtoolkit.regress.config import ConfigError, load_config
from qtoolkit.regress.evaluate import check, evaluate_case
from qtoolkit.regress.reports import clean_json, junit, markdown, read_baseline
from qtoolkit.regress.shards import parse_shard, read_parts, select


def _prepare_output(output: str, update_baseline: bool, baseline_path, config_path: str) -> None:
    from qtoolkit import export

    try:
        os.makedirs(output, exist_ok=True)
    except OSError as e:
        raise export.ExportError(f"cannot create the report folder {output} ({e.strerror}); choose another "
                                 "--output") from None
    export.check_writable(os.path.join(output, "report.json"))
    if update_baseline:
        if baseline_path is None:
            raise ConfigError(f"{config_path}: --update_baseline needs a `baseline:` file in the config")
        export.check_writable(baseline_path)


def run(config_path: str, output: str = "regression_report", update_baseline: bool = False,
        progress: bool = True, log=print, shard: Optional[str] = None) -> int:
    """Runs a regression config (or shard "i/n" of its cases, see `shards`); returns the exit code (0 pass,
    1 regression)."""
    from qtoolkit import calibrate, export, loading, rewrite, schemes, zoo

    config = load_config(config_path)
    part = parse_shard(shard)
    if part and update_baseline:
        raise ConfigError("--update_baseline with --shard: merge the parts first (--merge), then update there")
    baseline = None if update_baseline else read_baseline(config.baseline)
    _prepare_output(output, update_baseline, config.baseline, config_path)
    known = (loading.ModelLoadError, calibrate.DataError, rewrite.UnquantizableLayersError,
             rewrite.UnsupportedModelError, export.ExportError, schemes.SchemeError, zoo.ReferenceUnavailable)
    results = []
    t0 = time.perf_counter()
    bar = None
    chosen = select(config.cases, part)
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(chosen), desc="regression", unit="case", file=sys.stderr)
    for position, case in chosen:
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
        results.append({"position": position, "id": case.id, "entry": case.entry, "scheme": case.scheme, "qat": case.qat,
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
    extra = {"shard": list(part)} if part else {}
    return _write(os.path.abspath(config_path), config.baseline, results, output, update_baseline, log,
                  time.perf_counter() - t0, extra)


def merge(folders: list[str], output: str = "regression_report", update_baseline: bool = False, log=print) -> int:
    """Joins the reports of shard runs into the whole job's (see `shards`); returns the exit code."""
    first, results = read_parts(folders)
    _prepare_output(output, update_baseline, first["baseline"], first["config"])
    return _write(first["config"], first["baseline"], results, output, update_baseline, log,
                  sum(r["seconds"] for r in results))


def _write(config_path: str, baseline_path, results: list, output: str, update_baseline: bool, log,
           seconds: float, extra: Optional[dict] = None) -> int:
    """report.json/.md/.xml (and the baseline when asked); the exit code."""
    from qtoolkit import export

    failed = [r for r in results if not r["passed"]]
    title = f"qtoolkit accuracy regression: {os.path.basename(config_path)}"
    report = {"config": config_path, "baseline": baseline_path, **(extra or {}), "passed": not failed,
              "seconds": seconds, "cases": results}
    export.write_atomic(os.path.join(output, "report.json"),
                        (json.dumps(clean_json(report), indent=1) + "\n").encode())
    md = markdown(results, title)
    export.write_atomic(os.path.join(output, "report.md"), md.encode())
    export.write_atomic(os.path.join(output, "report.xml"), junit(results, title))
    if log:
        log(md)
    if update_baseline:
        measured = {r["id"]: {"int8_accuracy": r["metrics"]["int8_accuracy"]} for r in results if r["metrics"]}
        export.write_atomic(baseline_path, (json.dumps({"config": os.path.basename(config_path),
                                                        "cases": measured}, indent=1, sort_keys=True)
                                            + "\n").encode())
        if log:
            log(f"baseline written: {baseline_path} ({len(measured)} cases)")
    if failed and log:
        for r in failed:
            for message in r["failures"]:
                print(f"REGRESSION {r['id']}: {message}", file=sys.stderr)
    if log:
        log(f"reports: {os.path.join(output, 'report.md')}, report.json, report.xml")
    return 1 if failed else 0
