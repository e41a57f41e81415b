#!/usr/bin/env bash
# Sets up .venv (as scripts/demo.sh) and runs the test suite.
# Slow tests are skipped by default; run them with: scripts/test.sh -m slow
# Extra arguments go to pytest.
source "$(dirname "${BASH_SOURCE[0]}")/_venv.sh"
exec python -m pytest "$@"
