#!/usr/bin/env bash
# Runs the Python SDK's tests (unit tests and end-to-end tests against a real
# director and envoys built from this repository) with Debian's python3.
# Extra arguments go to pytest (e.g. -k safetensors, -x, -v).
# FX_BIN=/path/to/fx skips building the binary; FX_KEEP_TMP=1 keeps the
# federation's files and logs.
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${FX_PYTHON:-/usr/bin/python3}
export PYTHONPATH="$PWD/sdk/python${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONDONTWRITEBYTECODE=1 # keep __pycache__ out of the tree (generated-code checks)
export PATH="$PATH:/usr/local/go/bin"

rc=0
"$PY" -m pytest -q -p no:cacheprovider sdk/python/tests "$@" || rc=$?
if [ "$rc" -eq 5 ]; then
  echo "sdk/python/run-tests.sh: pytest collected no tests" >&2
  exit 1
fi
exit "$rc"
