"""Real data sets that install offline: scikit-learn's digits and Fashion-MNIST.

    from qtoolkit import datasets
    (x_train, y_train), (x_test, y_test) = datasets.load("digits")
    x_train.shape  # (1437, 8, 8, 1), float32 in [0, 1]

Both return NHWC float32 images scaled to [0, 1] and int64 labels, split
deterministically.  Fashion-MNIST comes from the Debian package
`dataset-fashion-mnist` (MIT license, Zalando Research); scikit-learn's digits
ship inside the scikit-learn wheel (BSD-3-Clause).
"""

from __future__ import annotations

import gzip
import os
import struct

import numpy as np

from qtoolkit.errors import DatasetUnavailable  # noqa: F401  (raised here; defined with the others)

FASHION_MNIST_DIR = os.environ.get("QTOOLKIT_FASHION_MNIST_DIR", "/usr/share/datasets/fashion-mnist")
FASHION_MNIST_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                         "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")
NAMES = ("digits", "fashion_mnist")


Split = tuple[np.ndarray, np.ndarray]


def load(name: str) -> tuple[Split, Split]:
    """Loads a data set by name.

    Args:
      name: "digits" or "fashion_mnist".

    Returns:
      ((x_train, y_train), (x_test, y_test)).

    Raises:
      ValueError: unknown name.
      DatasetUnavailable: the data set is not installed (says how to install it).
    """
    loaders = {"digits": load_digits, "fashion_mnist": load_fashion_mnist}
    if name not in loaders:
        raise ValueError(f"unknown data set {name!r}; known data sets are {', '.join(NAMES)}")
    return loaders[name]()


def load_digits(test_fraction: float = 0.2) -> tuple[Split, Split]:
    """scikit-learn's 8x8 digits (1,797 images), a fixed shuffled split."""
    try:
        from sklearn.datasets import load_digits as _load
    except ImportError:
        raise DatasetUnavailable("scikit-learn is not installed; install it with "
                                 "`pip install scikit-learn` (or `pip install qtoolkit[data]`)") from None
    data = _load()
    x = (data.images.astype(np.float32) / 16.0)[..., None]
    y = data.target.astype(np.int64)
    order = np.random.default_rng(0).permutation(len(x))
    n_test = int(round(len(x) * test_fraction))
    test, train = order[:n_test], order[n_test:]
    return (x[train], y[train]), (x[test], y[test])


def _read_idx(path: str) -> np.ndarray:
    with gzip.open(path, "rb") as f:
        magic = f.read(4)
        if len(magic) != 4 or magic[:2] != b"\0\0" or magic[2] != 0x08:
            raise DatasetUnavailable(f"{path}: not an IDX file of unsigned bytes")
        ndim = magic[3]
        shape = struct.unpack(">" + "I" * ndim, f.read(4 * ndim))
        data = np.frombuffer(f.read(), np.uint8)
    if data.size != int(np.prod(shape)):
        raise DatasetUnavailable(f"{path}: truncated ({data.size} values for shape {shape})")
    return data.reshape(shape)


def load_fashion_mnist(folder: str = FASHION_MNIST_DIR) -> tuple[Split, Split]:
    """Fashion-MNIST (60,000 train + 10,000 test 28x28 images) from the Debian package."""
    out = []
    for split in ("train", "t10k"):
        images = os.path.join(folder, f"{split}-images-idx3-ubyte.gz")
        labels = os.path.join(folder, f"{split}-labels-idx1-ubyte.gz")
        if not (os.path.isfile(images) and os.path.isfile(labels)):
            raise DatasetUnavailable(
                f"Fashion-MNIST is not installed in {folder}; install it with "
                "`sudo apt-get update && sudo apt-get install -y dataset-fashion-mnist` "
                "(or set QTOOLKIT_FASHION_MNIST_DIR to a folder with the IDX .gz files)")
        x = (_read_idx(images).astype(np.float32) / 255.0)[..., None]
        out.append((x, _read_idx(labels).astype(np.int64)))
    return out[0], out[1]
