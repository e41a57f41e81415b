"""Calibration in parts: shards observed separately merge into one pass's ranges (calibrate/shards.py)."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from qtoolkit import calibrate, errors, prepare as prep
from tests import models

N_CAL = 150  # with batch 32: blocks of whole batches, the last one short, the auto hold-out across two shards


@pytest.fixture(scope="module")
def model():
    return models.conv_bn_relu()


@pytest.fixture(scope="module")
def data():
    return np.random.default_rng(0).normal(size=(200, 16, 16, 3)).astype(np.float32)


def _parts(model, data, n, folder, **kw):
    paths = []
    for i in range(n):
        part = prep.prepare(model, data, "int8", num_calibration_samples=N_CAL, progress=False,
                            calibration_shard=f"{i}/{n}", **kw).calibration_part
        paths.append(os.path.join(folder, f"part{i}.npz"))
        part.save(paths[-1])
    return paths


@pytest.mark.parametrize("method", ["auto", pytest.param("ema", marks=pytest.mark.slow)])
def test_merged_shards_give_one_pass_ranges(model, data, tmp_path, method):
    """auto: the held-out samples and the observers before them come from the shards that saw them; ema: the
    batch extremes are replayed in stream order. The parts go through files, given out of order."""
    one = prep.prepare(model, data, "int8", num_calibration_samples=N_CAL, range_method=method, progress=False)
    paths = _parts(model, data, 3, tmp_path, range_method=method)
    merged = prep.prepare(model, data, "int8", range_method=method, progress=False,
                          calibration_parts=paths[::-1])
    assert merged.num_calibration == N_CAL and merged.calibration.shards == 3
    assert merged.calibration.ranges == one.calibration.ranges
    np.testing.assert_array_equal(merged.verification_inputs[0], one.verification_inputs[0])
    if method == "auto":
        assert merged.calibration.selection.choice == one.calibration.selection.choice


def test_blocks_are_whole_batches_covering_the_pass():
    blocks = [calibrate.shards.block((i, 3), 150, 32) for i in range(3)]
    assert blocks == [(0, 32), (32, 96), (96, 150)]  # 5 batches: 1, 2 and 2 of them
    assert calibrate.shards.block((0, 8), 40, 32) == (0, 0)  # more shards than batches: empty parts


@pytest.mark.slow
def test_tfrecord_stream_shards_and_cli(model, data, tmp_path, capsys):
    """The command lines: shards of a TFRecord stream in separate processes, a partial merge, convert with the
    parts: the same ranges and the same file as one pass."""
    from qtoolkit import convert
    from qtoolkit.calibrate import __main__ as cli

    records = str(tmp_path / "calib.tfrecord")
    assert calibrate.write_records(records, {model.inputs[0].name.split(":")[0]: data}) == 200
    path = str(tmp_path / "model.keras")
    model.save(path)
    # Shards 0 and 1: two processes at once, through the command line; shard 2 in this process.
    env = {**os.environ, "PYTHONPATH": os.getcwd()}
    procs = [subprocess.Popen([sys.executable, "-m", "qtoolkit.calibrate", "--model", path, "--calibration_data",
                               records, "--num_calibration_samples", str(N_CAL), "--calibration_shard", f"{i}/3",
                               "--output", str(tmp_path / f"p{i}.npz")], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for i in range(2)]
    cli.shard(path, records, "2/3", str(tmp_path / "p2.npz"), num_calibration_samples=N_CAL, progress=False)
    for proc in procs:
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err[-2000:]
        assert "wrote" in out and "error" not in err
    cli.merge([str(tmp_path / "p0.npz"), str(tmp_path / "p2.npz")], str(tmp_path / "p02.npz"))
    said = capsys.readouterr().out
    assert "shard 2/3: samples 96 to 149 of 150" in said
    assert "merged shards 0, 2 of 3" in said and "shards 1 still to merge" in said
    common = dict(num_calibration_samples=N_CAL, num_verification_samples=20)
    one = convert.run(path, None, records, **common)
    merged = convert.run(path, None, records, merge_calibration=[str(tmp_path / "p02.npz"), str(tmp_path / "p1.npz")],
                         **common)
    assert "merged from 3 shards' parts" in capsys.readouterr().out
    assert merged.calibration.ranges == one.calibration.ranges
    assert merged.tflite == one.tflite  # the same file, byte for byte


def test_parts_that_do_not_belong_together(model, data, tmp_path):
    paths = _parts(model, data, 2, tmp_path)
    other = prep.prepare(model, data, "int8", num_calibration_samples=N_CAL - 32, progress=False,
                         calibration_shard="1/2").calibration_part
    with pytest.raises(errors.DataError, match="different runs"):
        calibrate.merge_parts([paths[0], other])
    with pytest.raises(errors.DataError, match="given twice"):
        calibrate.merge_parts([paths[0], paths[0]])
    with pytest.raises(errors.DataError, match=r"shard\(s\) 1/2 missing"):
        prep.prepare(model, data, "int8", progress=False, calibration_parts=paths[:1])
    with pytest.raises(errors.DataError, match="another model, scheme"):
        prep.prepare(model, data, "int8", progress=False, calibration_parts=paths, range_method="minmax")
    bad = tmp_path / "bad.npz"
    np.savez(bad, meta=np.array(json.dumps({"format": "something else"})))
    with pytest.raises(errors.DataError, match="not a qtoolkit calibration part"):
        calibrate.load_part(str(bad))
    with pytest.raises(errors.DataError, match="does not exist"):
        calibrate.load_part(str(tmp_path / "missing.npz"))


@pytest.mark.parametrize("shard, message", [("2/2", "from 0 to 1"), ("a/b", "must look like i/n")])
def test_bad_shard_and_schemes_without_own_calibration(model, data, shard, message):
    with pytest.raises(errors.DataError, match=message):
        prep.prepare(model, data, "int8", progress=False, calibration_shard=shard)
    with pytest.raises(errors.DataError, match="weight-only schemes have no activation ranges"):
        prep.prepare(model, data, "weight_only_int8", progress=False, calibration_shard="0/2")
    with pytest.raises(errors.DataError, match="read the calibration samples themselves"):
        prep.prepare(model, data, "w4a8_adaround", progress=False, calibration_shard="0/2")
