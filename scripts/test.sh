#!/usr/bin/env bash
# Sets up .venv (as scripts/demo.sh) and runs the test suite in two pytest-xdist workers (one per core; each
# test file stays in one worker, so module fixtures are built once). QTOOLKIT_TEST_WORKERS=0 runs in-process.
# Slow tests are skipped by default; run them with: scripts/test.sh -m slow
# Extra arguments go to pytest.
source "$(dirname "${BASH_SOURCE[0]}")/_venv.sh"
exec python -m pytest -n "${QTOOLKIT_TEST_WORKERS:-2}" --dist loadfile "$@"
