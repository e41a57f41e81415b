"""QAT that starts where the scheme's post-training quantization ends (CLE, calibrated ranges, AdaRound)."""

import numpy as np
import pytest
import tf_keras as keras

import models
import qtoolkit
from qtoolkit import qat, verify
from qtoolkit.errors import UsageError


def test_qat_with_an_algorithm_scheme_starts_from_the_ptq_file():
    """quantize_model(..., "w4a8_adaround") at step 0 exports the same file, output for output, as
    qtoolkit.ptq with that scheme on the same samples; plain w4a8 QAT (nearest rounding) does not."""
    keras.utils.set_random_seed(0)
    model = models.conv_bn_relu((8, 8, 1))
    before = [w.copy() for w in model.get_weights()]
    x = np.random.RandomState(0).rand(80, 8, 8, 1).astype(np.float32)
    ptq = qtoolkit.ptq(model, x, scheme="w4a8_adaround", num_calibration_samples=64, progress=False)
    qm = qat.quantize_model(model, "w4a8_adaround", calibration_data=x[:64])
    data, _ = qat.export_tflite(qm)
    plain, _ = qat.export_tflite(qat.quantize_model(model, "w4a8", calibration_data=x[:64]))
    ptq_out = verify.LiteRTModel(ptq.tflite).predict(x[64:])
    np.testing.assert_array_equal(verify.LiteRTModel(data).predict(x[64:]), ptq_out)
    assert not np.array_equal(verify.LiteRTModel(plain).predict(x[64:]), ptq_out)
    assert all(np.array_equal(a, b) for a, b in zip(before, model.get_weights()))  # the user's model untouched
    with pytest.raises(UsageError, match="runs cle, adaround before training, which needs data: pass "
                                         "calibration_data="):
        qat.quantize_model(model, "w4a8_adaround")
