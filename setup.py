"""Installs qtoolkit. `pip install -e .[test]` for development."""

from setuptools import find_packages, setup

setup(
    name="qtoolkit",
    version="0.1.0",
    description="Turns TensorFlow/Keras models into accurate, verified int8 TFLite (LiteRT) models "
                "(Krishnamoorthi 2018 and beyond).",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.10,<3.13",
    packages=find_packages(include=["qtoolkit", "qtoolkit.*"]),
    # The reference models' trained weights (qtoolkit.zoo) ship with the package, listed here only:
    # include_package_data would also pick up the weights/ folder as an (undeclared) package and warn.
    include_package_data=False,
    package_data={"qtoolkit.zoo": ["weights/*.keras", "weights/*.json"]},
    install_requires=[
        "tensorflow==2.21.*",
        # Keras 2: TFMOT's quantization API only accepts Keras 2 layers; tf-keras
        # must match TensorFlow's minor version.
        "tf-keras==2.21.*",
        "tensorflow-model-optimization~=0.8.1",
        # The LiteRT interpreter (tf.lite.Interpreter is deprecated).
        "ai-edge-litert>=2.0",
        "numpy>=1.26",
        "absl-py>=1.2",
        "pyyaml>=6.0",
        "tqdm>=4.60",
    ],
    extras_require={
        "test": ["pytest>=8", "pytest-xdist>=3.5", "hypothesis>=6.100"],
        "data": ["scikit-learn>=1.3"],
        "plots": ["matplotlib>=3.7"],
    },
    entry_points={"console_scripts": ["qtoolkit-convert=qtoolkit.convert:entry_point"]},
)
