"""`python -m qtoolkit.calibrate`: calibration in parts, across processes or hosts.

    # shard i of n, in each process (the same flags everywhere but the shard):
    python -m qtoolkit.calibrate --model model.keras --calibration_data 'calib-*.tfrecord' \\
        --num_calibration_samples 10000 --calibration_shard 0/4 --output part0.npz
    # optionally merge parts where they meet (a tree of merges is fine):
    python -m qtoolkit.calibrate --merge_calibration part0.npz,part1.npz --output part01.npz
    # convert with the merged ranges: the same ranges as one pass over the 10000 samples
    python -m qtoolkit.convert --model model.keras --calibration_data 'calib-*.tfrecord' \\
        --num_calibration_samples 10000 --merge_calibration part01.npz,part2.npz,part3.npz --output model.tflite

Shard i of n observes a contiguous block of whole batches of the calibration
samples (the samples before it are read and skipped) and writes what its
range observers saw (min/max, EMA batch extremes, exact histograms) as an
.npz; merging gives what one pass would have seen.  Exit code 0, 1 with one
`error:` line for bad input, 2 on wrong usage.
"""

from qtoolkit import _env  # noqa: F401  (before TensorFlow)

from absl import app, flags

from qtoolkit import _cli
from qtoolkit import _cli_calibration as _calflags

flags.adopt_module_key_flags(_cli)  # --model, --calibration_data, --scheme, --output, ... shown in --help
flags.adopt_module_key_flags(_calflags)  # --batch_size, --range_method, --merge_calibration
_SHARD = flags.DEFINE_string("calibration_shard", None, "i/n: observe shard i (from 0) of n of the calibration "
                             "samples and write the part to --output (.npz).")


def main(argv):
    """absl main: one shard (--calibration_shard) or a merge (--merge_calibration); returns the exit code."""
    if bool(_SHARD.value) == bool(_calflags.MERGE_CALIBRATION.value):
        raise app.UsageError("give --calibration_shard i/n (observe one shard) or --merge_calibration PARTS "
                             "(merge parts), one of the two")
    if _SHARD.value:
        _cli.require(argv, _cli.MODEL, _cli.CALIBRATION, _cli.OUTPUT)
        return _cli.run(lambda: shard(_cli.MODEL.value, _cli.CALIBRATION.value, _SHARD.value, _cli.OUTPUT.value,
                                      **_prepare_flags()))
    _cli.require(argv, _cli.OUTPUT)
    return _cli.run(lambda: merge(_calflags.MERGE_CALIBRATION.value, _cli.OUTPUT.value))


def _prepare_flags() -> dict:
    """`prepare`'s keywords from the shared flags (the convert run that merges must be given the same)."""
    return dict(
        scheme=_cli.SCHEME.value, num_calibration_samples=_cli.NUM_CALIBRATION.value,
        range_method=_calflags.RANGE_METHOD.value, batch_size=_calflags.BATCH_SIZE.value,
        image_size=_cli.pair(_cli.IMAGE_SIZE.value, "image_size", int) if _cli.IMAGE_SIZE.value else None,
        image_scale=_cli.pair(_cli.IMAGE_SCALE.value, "image_scale", float), image_mean=_cli.IMAGE_MEAN.value,
        image_std=_cli.IMAGE_STD.value, image_resize=_cli.IMAGE_RESIZE.value, allow_unsafe=_cli.UNSAFE.value,
        custom_objects=_cli.CUSTOM_OBJECTS.value)


def shard(model, data, which, output, out=None, **prepare_kwargs):
    """Observes shard `which` ("i/n") of `data` for `model` and writes the part to `output`.

    `prepare_kwargs` go to `prepare.prepare` (scheme, num_calibration_samples, batch_size, ...).
    """
    import sys

    from qtoolkit import export, prepare
    from qtoolkit.calibrate import shards

    out = out or sys.stdout
    i, n = shards.parse_shard(which)
    export.check_writable(output)
    log = lambda message: print(message, file=out, flush=True)  # noqa: E731
    prepared = prepare.prepare(model, data, log=log, calibration_shard=(i, n), **prepare_kwargs)
    part = prepared.calibration_part
    start, stop = shards.block((i, n), part.total, part.batch_size)
    part.save(output)
    print(f"shard {i}/{n}: samples {start} to {stop - 1} of {part.total}, {len(part.observed.observers)} activation "
          f"observers ({part.method}), {prepared.seconds.get('calibrate', 0.0):.1f} s", file=out)
    print(f"wrote {output}; merge every shard's part with --merge_calibration (python -m qtoolkit.convert, or "
          "python -m qtoolkit.calibrate to merge parts into one)", file=out)


def merge(parts, output, out=None):
    """Merges calibration parts into one part file."""
    import sys

    from qtoolkit import export
    from qtoolkit.calibrate import shards

    out = out or sys.stdout
    export.check_writable(output)
    merged = shards.merge_parts(parts)
    merged.save(output)
    held = ", ".join(str(i) for i in merged.indices)
    rest = "" if merged.complete else (f"; shards {', '.join(str(i) for i in range(merged.shards) if i not in merged.indices)}"
                                       " still to merge")
    print(f"merged shards {held} of {merged.shards}: {merged.observed.samples} of {merged.total} samples "
          f"({merged.method}){rest}", file=out)
    print(f"wrote {output}", file=out)


if __name__ == "__main__":
    app.run(main)
