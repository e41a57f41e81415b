"""The regression job's command line: `python -m qtoolkit.regress --config C [--output DIR] [--update_baseline]
[--shard i/n]`, or `--merge DIR1,DIR2,... [--output DIR]` to join the shard runs' reports.

Exits 0 when every case passes, 1 on a regression, 2 on a config, data or
output error (one `error:` line), 130 when interrupted. Its --help shows the
`qtoolkit.regress` docstring.
"""

from absl import app, flags

from qtoolkit import _cli
from qtoolkit.regress.job import run

for _name in ("output", "verbose"):  # the shared flags this tool reads, shown in its --help
    flags.declare_key_flag(_name)
_CONFIG = flags.DEFINE_string("config", None, "Regression config (YAML), e.g. configs/regression/quick.yaml.")
_UPDATE = flags.DEFINE_bool("update_baseline", False,
                            "Store this run's int8 accuracies as the baseline (after an accepted change).")
_PROGRESS = flags.DEFINE_bool("progress", True, "Show a progress bar.")
_SHARD = flags.DEFINE_string("shard", None, "Run part i of n of the config's cases (i/n, 1 <= i <= n; every n-th case), "
                             "e.g. on parallel CI runners; join the parts with --merge.")
_MERGE = flags.DEFINE_string("merge", None, "Comma list of the --output folders of the shard runs: writes the whole "
                             "job's report.json/.md/.xml into --output (and the baseline with --update_baseline).")
DEFAULT_OUTPUT = "regression_report"


def main(argv):
    """absl main: runs the config given by the flags; returns the exit code (0, 1, 2 or 130)."""
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    output = _cli.OUTPUT.value or DEFAULT_OUTPUT
    if _MERGE.value:
        if _CONFIG.value or _SHARD.value:
            raise app.UsageError("--merge joins finished shard runs: give it without --config and --shard")
        from qtoolkit.regress.job import merge

        folders = [f for f in _MERGE.value.split(",") if f]
        return _cli.run(lambda: merge(folders, output, _UPDATE.value), error_code=2, interrupted="interrupted")
    if not _CONFIG.value:
        raise app.UsageError("missing required flag --config (e.g. --config configs/regression/quick.yaml)")
    # A regression is exit code 1, so the job's own errors (config, data, output) are 2.
    return _cli.run(lambda: run(_CONFIG.value, output, _UPDATE.value, _PROGRESS.value, shard=_SHARD.value),
                    error_code=2, interrupted="interrupted")


def entry_point():
    """Runs `main` with the flags (a console-script entry point)."""
    app.run(main)


if __name__ == "__main__":
    from qtoolkit import regress

    __doc__ = regress.__doc__  # absl's --help prints the main module's docstring: the package's, as before
    entry_point()
