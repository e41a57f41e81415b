#!/usr/bin/env bash
# Sets up .venv, trains a small CNN on scikit-learn's digits, quantizes it to a
# fully-int8 TFLite model and prints the verification report.
#   scripts/demo.sh [--workdir DIR]
source "$(dirname "${BASH_SOURCE[0]}")/_venv.sh"
exec python scripts/demo.py "$@"
