#!/usr/bin/env bash
# Sets up .venv, trains a small Keras 3 CNN on scikit-learn's digits, quantizes it to a
# fully-int8 TFLite model with `python -m qtoolkit.convert` and prints the
# verification report (float vs int8 on held-out digits, LiteRT interpreter).
#   scripts/demo.sh [extra qtoolkit.convert flags, e.g. --scheme int8_per_tensor]
source "$(dirname "${BASH_SOURCE[0]}")/_venv.sh"
WORK=build/demo
python scripts/demo.py --workdir "$WORK" 2> >(grep -v -E '^(WARNING: All log|[IEW][0-9]{4} )' >&2)
echo
echo "+ python -m qtoolkit.convert --model $WORK/model.keras --calibration_data $WORK/calibration.npy ..."
exec python -m qtoolkit.convert \
  --model "$WORK/model.keras" \
  --calibration_data "$WORK/calibration.npy" \
  --verification_data "$WORK/test_x.npy" --labels "$WORK/test_y.npy" \
  --output "$WORK/model_int8.tflite" --report "$WORK/report.json" "$@"
