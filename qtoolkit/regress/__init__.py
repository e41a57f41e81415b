"""The accuracy-regression job: int8 accuracy checked against float, thresholds and a baseline.

    python -m qtoolkit.regress --config configs/regression/quick.yaml [--output DIR] [--update_baseline]

A config (YAML) lists entries; each names a model (a path, or `zoo:NAME` for a
reference model of `qtoolkit.zoo`), a labeled data set, the schemes to run and
thresholds. For every entry x scheme ("case") the job quantizes the model (PTQ,
or QAT when the scheme asks for it), runs the float and the int8 TFLite models
with the LiteRT interpreter on the labeled evaluation samples and checks:

- `max_accuracy_drop`: float minus int8 top-1 accuracy, in points;
- `min_sqnr`: int8 vs float output SQNR, in dB;
- `max_simulation_gap`: |simulated (Keras fake-quant) minus int8 TFLite accuracy|, in points;
- `baseline_tolerance`: int8 accuracy may not fall more than this many points below
  the accuracy stored in the baseline file (the last accepted run).

`--shard i/n` runs every n-th case (parallel CI runners) and `--merge DIR1,DIR2,...`
joins the parts' reports into the whole job's (`regress/shards.py`, docs/regression.md).

It writes `report.json`, `report.md` and JUnit XML `report.xml` into `--output`,
and exits 1 when a case regresses, naming it and by how much. `--update_baseline`
stores this run's accuracies as the new baseline (after an accepted change).

Config keys (all validated; unknown keys are errors):

    baseline: quick.baseline.json          # relative to the config file
    defaults:                              # optional, apply to every entry
      calibration_samples: 500
      eval_samples: 1000
      thresholds: {max_accuracy_drop: 1.0, min_sqnr: 15, max_simulation_gap: 0.5, baseline_tolerance: 0.5}
    entries:
      - name: mobilenet_v1_fmnist
        model: zoo:mobilenet_v1_fmnist     # or a .keras/.h5/SavedModel path
        data: fashion_mnist                # digits | fashion_mnist | {calibration, inputs, labels[, train_inputs, train_labels]}
        schemes: [int8, {scheme: w4a8, qat: {epochs: 1, train_samples: 10000}, thresholds: {max_accuracy_drop: 3}}]
        thresholds: {max_accuracy_drop: 2.0}
"""

# The package, one concept per module:
#   config.py    Config / Case / ConfigError and `load_config` (every key validated)
#   evaluate.py  `evaluate_case` (PTQ or QAT, float and int8 TFLite measured) and `check` (thresholds, baseline)
#   reports.py   `markdown`, `junit`, JSON-ready values and the baseline file
#   job.py       `run`: every case of a config (or a shard), the reports and the baseline update; `merge`
#   shards.py    `--shard i/n` case selection and reading the parts for `--merge`
#   __main__.py  the command line (`main`, `entry_point`)

from qtoolkit import _env  # noqa: F401  (before TensorFlow)
from qtoolkit.regress.config import DEFAULT_THRESHOLDS, THRESHOLDS, Case, Config, ConfigError, load_config
from qtoolkit.regress.evaluate import check, evaluate_case
from qtoolkit.regress.job import run
from qtoolkit.regress.reports import junit, markdown

__all__ = ["load_config", "ConfigError", "Case", "Config", "evaluate_case", "check", "markdown", "junit", "run",
           "main", "entry_point", "THRESHOLDS", "DEFAULT_THRESHOLDS"]


def __getattr__(name):
    # The command line lives in __main__.py (so that `python -m qtoolkit.regress` defines its flags in the main
    # module, as absl's --help expects); importing it here eagerly would make runpy warn that
    # qtoolkit.regress.__main__ was imported before being run.
    if name in ("main", "entry_point"):
        from qtoolkit.regress import __main__ as cli

        return getattr(cli, name)
    raise AttributeError(f"module 'qtoolkit.regress' has no attribute {name!r}")
