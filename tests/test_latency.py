"""latency.median_ms feeds valid inputs: real samples when given, zero ids to integer inputs without them."""

import numpy as np
import pytest
import tf_keras as keras

from qtoolkit import export, latency

L = keras.layers


@pytest.fixture(scope="module")
def embedding_tflite():
    """A float TFLite file of an Embedding (vocab 50) text model: an int32 token input, a GATHER."""
    keras.utils.set_random_seed(0)
    inp = keras.Input((8,), dtype="int32", name="tokens")
    h = L.GlobalAveragePooling1D(name="gap")(L.Embedding(50, 4, name="emb")(inp))
    return export.float_tflite(keras.Model(inp, L.Dense(3, name="fc")(h)))


def test_token_ids_are_valid_without_samples(embedding_tflite):
    # Random ids over the int32 range made GATHER fail ("gather index out of bounds").
    assert latency.median_ms(embedding_tflite, runs=2, warmup=1) > 0


def test_real_samples_are_fed(embedding_tflite):
    tokens = np.random.default_rng(0).integers(0, 50, (4, 8)).astype(np.int32)
    assert latency.median_ms(embedding_tflite, runs=2, warmup=1, inputs=tokens) > 0
    assert latency.median_ms(embedding_tflite, runs=2, warmup=1, inputs=[tokens]) > 0
    with pytest.raises(ValueError, match="1 inputs, got 2"):
        latency.median_ms(embedding_tflite, runs=1, inputs=[tokens, tokens])
    with pytest.raises(RuntimeError, match="gather index out of bounds"):  # an out-of-range id is the caller's sample: LiteRT's error, not ours
        latency.median_ms(embedding_tflite, runs=1, inputs=np.full((1, 8), 10**6, np.int32))
