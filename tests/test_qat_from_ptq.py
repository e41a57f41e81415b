"""QAT that starts where the scheme's post-training quantization ends (CLE, calibrated ranges, AdaRound)."""

import numpy as np
import pytest
import tf_keras as keras

import models
import qtoolkit
from qtoolkit import qat, verify
from qtoolkit.errors import UsageError


def test_qat_with_an_algorithm_scheme_starts_from_its_ptq_weights_and_ranges():
    """The deployed kernels and activation ranges of quantize_model(..., "w4a8_adaround") at step 0 are those
    of qtoolkit's PTQ with that scheme (prepare: CLE, calibration, AdaRound), not nearest rounding."""
    from qtoolkit import prepare
    from qtoolkit.rewrite.layers import FoldedConv, QuantizeActivation

    keras.utils.set_random_seed(0)
    model = models.conv_bn_relu((8, 8, 1))
    x = np.random.RandomState(0).rand(80, 8, 8, 1).astype(np.float32)
    scheme = qtoolkit.load_scheme("w4a8_adaround").replace(algorithms={"adaround_iterations": 50})  # quick
    ptq = prepare.prepare(model, x, scheme, num_calibration_samples=64, progress=False).rewritten.model
    inference = qat.to_inference_model(qat.quantize_model(model, scheme, calibration_data=x[:64]))
    nearest = qat.to_inference_model(qat.quantize_model(model, "w4a8", calibration_data=x[:64]))
    convs = [layer for layer in ptq.layers if isinstance(layer, FoldedConv)]
    for layer in convs:
        want = layer.quantized_kernel().numpy()
        np.testing.assert_allclose(inference.get_layer(layer.name).quantized_kernel().numpy(), want,
                                   rtol=0, atol=1e-6 * np.abs(want).max())
    assert any(not np.allclose(nearest.get_layer(layer.name).quantized_kernel().numpy(),
                               layer.quantized_kernel().numpy()) for layer in convs)
    for layer in ptq.layers:
        if isinstance(layer, QuantizeActivation) and layer.fixed_range is None:
            assert inference.get_layer(layer.name).get_range() == pytest.approx(layer.get_range(), rel=1e-6)
    with pytest.raises(UsageError, match="runs cle, adaround before training, which needs data: pass "
                                         "calibration_data="):
        qat.quantize_model(model, "w4a8_adaround")


@pytest.mark.slow  # the default suite must stay under 3 minutes on 2 cores; runs in the accuracy-regression workflow
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
