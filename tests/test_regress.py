"""The accuracy-regression job: config validation, reports, baseline, exit codes."""

import json
import os
import subprocess
import sys
import xml.etree.ElementTree as ET

import pytest

from qtoolkit import regress

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
QUICK = os.path.join(ROOT, "configs", "regression", "quick.yaml")
FULL = os.path.join(ROOT, "configs", "regression", "full.yaml")


def _write(path, text):
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)
    return str(path)


GOOD = """
baseline: base.json
defaults: {calibration_samples: 200, eval_samples: 200}
entries:
  - name: good
    model: zoo:resnet_digits
    data: digits
    schemes: [int8]
"""

BROKEN_SCHEME = """
name: w2_per_tensor
weights: {bits: 2, granularity: per_tensor}
activations: {bits: 8}
"""


@pytest.mark.parametrize("text,message", [
    ("entries: []\n", "entries must be a non-empty list"),
    ("entries:\n  - {name: a, model: zoo:resnet_digits, data: digits, schemes: [int8], colour: red}\n",
     "unknown key entries[0].colour"),
    ("entries:\n  - {name: a, model: zoo:nope, data: digits, schemes: [int8]}\n", "unknown reference model 'nope'"),
    ("entries:\n  - {name: a, model: zoo:resnet_digits, data: cifar, schemes: [int8]}\n", "unknown data set 'cifar'"),
    ("entries:\n  - {name: a, model: zoo:resnet_digits, data: digits, schemes: [int9]}\n", "unknown scheme 'int9'"),
    ("entries:\n  - {name: a, model: zoo:resnet_digits, data: digits, schemes: [int8], eval_samples: 0}\n",
     "eval_samples must be an integer >= 1"),
    ("entries:\n  - {name: a, model: zoo:resnet_digits, data: digits, schemes: [int8],"
     " thresholds: {max_drop: 1}}\n", "unknown key entries[0].thresholds.max_drop"),
    ("entries:\n  - {name: a, model: zoo:resnet_digits, data: digits,"
     " schemes: [{scheme: weight_only_int8, qat: true}]}\n", "QAT needs a scheme with activation quantization"),
    ("entries:\n  - {name: a, model: zoo:resnet_digits, data: digits}\n", "is missing schemes"),
    ("entries: [\n", "not valid YAML"),
])
def test_config_errors_name_the_key(tmp_path, text, message):
    path = _write(tmp_path / "c.yaml", text)
    with pytest.raises(regress.ConfigError, match=message.replace("[", r"\[").replace("]", r"\]")):
        regress.load_config(path)


def test_bits_1_scheme_in_config_is_refused(tmp_path):
    _write(tmp_path / "bad.yaml", "weights: {bits: 1}\n")
    path = _write(tmp_path / "c.yaml", "entries:\n  - {name: a, model: zoo:resnet_digits, data: digits,"
                                       " schemes: [./bad.yaml]}\n")
    with pytest.raises(regress.ConfigError, match="weights.bits must be an integer from 2"):
        regress.load_config(path)


def test_shipped_configs_are_valid():
    quick, full = regress.load_config(QUICK), regress.load_config(FULL)
    assert len(full.cases) > len(quick.cases) >= 3
    from qtoolkit import zoo

    assert {c.model[4:] for c in full.cases} == set(zoo.REFERENCE)  # every reference model
    assert any(c.qat for c in full.cases) and {"w4a8", "w8a4", "int8_per_tensor"} <= {c.scheme for c in full.cases}


def test_broken_entry_fails_and_is_named(tmp_path):
    _write(tmp_path / "w2.yaml", BROKEN_SCHEME)
    config = _write(tmp_path / "c.yaml", GOOD + """
  - name: broken_w2
    model: zoo:resnet_digits
    data: digits
    schemes: [./w2.yaml]
    thresholds: {max_accuracy_drop: 0.5}
""")
    out = tmp_path / "out"
    code = regress.run(config, str(out), progress=False, log=None)
    assert code == 1
    report = json.loads((out / "report.json").read_text())
    by_id = {c["id"]: c for c in report["cases"]}
    assert by_id["good/int8"]["passed"], by_id["good/int8"]["failures"]
    broken = by_id["broken_w2/w2_per_tensor"]
    assert not broken["passed"] and any("points below float" in m for m in broken["failures"])
    assert broken["metrics"]["accuracy_drop"] > 0.5
    assert report["passed"] is False
    # Markdown: a table with one row per case and the regression named below it.
    md = (out / "report.md").read_text()
    assert "| case | method | float | int8 |" in md and "|---|" in md
    assert md.count("\n| good/int8 |") == 1 and "**FAIL**" in md and "`broken_w2/w2_per_tensor`" in md
    # JUnit XML: testsuites > testsuite > testcase, a <failure> on the broken case only.
    root = ET.parse(out / "report.xml").getroot()
    assert root.tag == "testsuites"
    suite = root.find("testsuite")
    assert suite.get("tests") == "2" and suite.get("failures") == "1" and suite.get("errors") == "0"
    cases = {tc.get("classname"): tc for tc in suite.findall("testcase")}
    assert set(cases) == {"regress.good", "regress.broken_w2"}
    assert cases["regress.good"].find("failure") is None
    failure = cases["regress.broken_w2"].find("failure")
    assert failure is not None and "points below float" in failure.get("message")
    assert float(suite.get("time")) > 0


@pytest.mark.slow  # five regression runs; test_broken_entry_fails_and_is_named runs the job end to end in the default suite
def test_baseline_fails_when_raised_and_update_restores_it(tmp_path):
    config = _write(tmp_path / "c.yaml", GOOD)
    out = str(tmp_path / "out")
    assert regress.run(config, out, update_baseline=True, progress=False, log=None) == 0
    base_path = tmp_path / "base.json"
    base = json.loads(base_path.read_text())
    measured = base["cases"]["good/int8"]["int8_accuracy"]
    assert 0.9 < measured <= 1.0
    assert regress.run(config, out, progress=False, log=None) == 0  # same code, same data: passes
    base["cases"]["good/int8"]["int8_accuracy"] = measured + 0.02  # someone "improved" the baseline by 2 points
    base_path.write_text(json.dumps(base))
    assert regress.run(config, out, progress=False, log=None) == 1
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    [failure] = report["cases"][0]["failures"]
    assert "below the baseline" in failure and "2.00 points" in failure
    assert regress.run(config, out, update_baseline=True, progress=False, log=None) == 0
    assert json.loads(base_path.read_text())["cases"]["good/int8"]["int8_accuracy"] == measured
    assert regress.run(config, out, progress=False, log=None) == 0


@pytest.mark.slow  # two CLI processes
def test_cli_exit_codes(tmp_path):
    _write(tmp_path / "w2.yaml", BROKEN_SCHEME)
    config = _write(tmp_path / "c.yaml", """
defaults: {calibration_samples: 100, eval_samples: 100}
entries:
  - name: broken_w2
    model: zoo:mobilenet_v1_digits
    data: digits
    schemes: [./w2.yaml]
    thresholds: {max_accuracy_drop: 0.5}
""")
    cmd = [sys.executable, "-m", "qtoolkit.regress", f"--config={config}", f"--output={tmp_path / 'out'}",
           "--noprogress"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert "REGRESSION broken_w2/w2_per_tensor: int8 accuracy" in proc.stderr
    bad = _write(tmp_path / "bad.yaml", "entries:\n  - {name: a, model: zoo:resnet_digits, data: digits,"
                                        " schemes: [int8], colour: red}\n")
    proc = subprocess.run(cmd[:3] + [f"--config={bad}"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith("error: ") and "colour" in proc.stderr
    assert "Traceback" not in proc.stderr


@pytest.mark.slow  # the quick job: three reference models, 1,000 samples each
def test_quick_config_passes(tmp_path):
    """The CI job: the quick config on the committed reference models, against its committed baseline."""
    out = tmp_path / "quick"
    code = regress.run(QUICK, str(out), progress=False, log=None)
    report = json.loads((out / "report.json").read_text())
    assert code == 0, [c["failures"] for c in report["cases"] if not c["passed"]]
    assert all(c["baseline"] is not None for c in report["cases"])  # the baseline file was used


SHARDED = """
baseline: base.json
entries:
  - {name: a, model: zoo:resnet_digits, data: digits, schemes: [int8, int8_per_tensor, w4a8]}
  - {name: b, model: zoo:mobilenet_v1_digits, data: digits, schemes: [int8, int8_per_tensor]}
"""


def _fake_evaluate(case):
    """Measured numbers without running models: each case's own, so a misplaced result shows."""
    acc = 0.9 - 0.01 * len(case.id) % 0.07
    return {"method": "ptq", "float_accuracy": 0.95, "int8_accuracy": acc, "accuracy_drop": 100 * (0.95 - acc),
            "sqnr_db": float("inf") if case.id == "b/int8" else 30.0 + len(case.id), "simulated_accuracy": acc,
            "simulation_gap": 0.1}


def test_sharded_job_merges_to_the_unsharded_report(tmp_path, monkeypatch, capsys):
    from qtoolkit.regress import __main__ as cli
    from absl.testing import flagsaver

    monkeypatch.setattr("qtoolkit.regress.job.evaluate_case", _fake_evaluate)
    config = _write(tmp_path / "c.yaml", SHARDED)
    assert regress.run(config, str(tmp_path / "whole"), progress=False, log=None) == 1  # w4a8 drop > 1 point
    parts = []
    for i in (1, 2, 3):
        parts.append(str(tmp_path / f"part{i}"))
        regress.run(config, parts[-1], progress=False, log=None, shard=f"{i}/3")
        report = json.loads((tmp_path / f"part{i}" / "report.json").read_text())
        assert report["shard"] == [i, 3] and [c["position"] for c in report["cases"]] == list(range(i - 1, 5, 3))
    with flagsaver.flagsaver(merge=",".join(reversed(parts)), output=str(tmp_path / "merged")):
        assert cli.main(["regress"]) == 1

    def without_times(path):
        data = json.loads(path.read_text())
        data.pop("seconds")
        for c in data["cases"]:
            c.pop("seconds")
        return data

    assert without_times(tmp_path / "merged" / "report.json") == without_times(tmp_path / "whole" / "report.json")
    assert (tmp_path / "merged" / "report.md").read_text() == (tmp_path / "whole" / "report.md").read_text()
    strip = lambda p: [(tc.get("classname"), tc.get("name"), [f.tag for f in tc])  # noqa: E731
                       for tc in ET.parse(p).getroot().iter("testcase")]
    assert strip(tmp_path / "merged" / "report.xml") == strip(tmp_path / "whole" / "report.xml")
    capsys.readouterr()
    for flags, fragment in ((dict(merge=",".join(parts[:2])), "missing 3/3"),
                            (dict(merge=",".join(parts + parts[:1])), "given twice 1/3"),
                            (dict(merge=str(tmp_path / "whole")), "from a run with --shard"),
                            (dict(config=config, shard="4/3"), "1 <= i <= n")):
        with flagsaver.flagsaver(output=str(tmp_path / "x"), **flags):
            assert cli.main(["regress"]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and fragment in err[0], err
