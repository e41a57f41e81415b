"""The reference models: committed weights load and score what training measured."""

import numpy as np
import pytest

from qtoolkit import datasets, zoo


@pytest.mark.parametrize("name", sorted(zoo.REFERENCE))
def test_reference_model_matches_its_manifest(name):
    ref = zoo.reference(name)
    try:
        _, (x, y) = datasets.load(ref.dataset)
    except datasets.DatasetUnavailable as e:
        pytest.skip(str(e))
    model = zoo.load(name)
    entry = zoo.manifest()[name]
    accuracy = float(np.mean(model.predict(x, batch_size=1000, verbose=0).argmax(1) == y))
    assert accuracy == pytest.approx(entry["test_accuracy"], abs=2e-4)
    assert entry["dataset"] == ref.dataset and model.count_params() == entry["parameters"]
    assert accuracy > (0.9 if ref.dataset == "fashion_mnist" else 0.97)
    assert any(l.__class__.__name__ == "BatchNormalization" for l in model.layers)


def test_architectures_are_the_papers_kinds():
    kinds = {name: {l.__class__.__name__ for l in build((28, 28, 1), 10).layers}
             for name, build in zoo.ARCHITECTURES.items()}
    assert "DepthwiseConv2D" in kinds["mobilenet_v1"] and "Add" not in kinds["mobilenet_v1"]
    assert {"DepthwiseConv2D", "Add"} <= kinds["mobilenet_v2"]
    assert "Add" in kinds["resnet"] and "DepthwiseConv2D" not in kinds["resnet"]


@pytest.mark.slow  # trains twice
def test_training_is_deterministic():
    weights = []
    import tf_keras as keras

    for _ in range(2):
        keras.utils.set_random_seed(0)  # as scripts/train_reference.py: the initial weights too
        model = zoo.mobilenet_v1_small((8, 8, 1), 10, width=8)
        zoo.train(model, "digits", epochs=1, batch_size=64)
        weights.append(model.get_weights())
    assert all(np.array_equal(a, b) for a, b in zip(*weights))


def test_unknown_and_missing_reference(monkeypatch, tmp_path):
    with pytest.raises(ValueError, match="unknown reference model 'nope'"):
        zoo.load("nope")
    monkeypatch.setattr(zoo, "WEIGHTS_DIR", str(tmp_path))
    with pytest.raises(zoo.ReferenceUnavailable, match="train_reference.py --models resnet_digits"):
        zoo.load("resnet_digits")
