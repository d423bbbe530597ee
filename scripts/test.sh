#!/usr/bin/env bash
# The whole test suite on a fresh machine: installs (idempotent), lints, runs pytest.
# Extra arguments go to pytest, e.g. `scripts/test.sh -k mask`.
set -euo pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
bash "$repo/scripts/install.sh"
cd "$repo"
.venv/bin/python -m ruff check .
exec .venv/bin/python -m pytest -p no:cacheprovider -q -rs "$@"
