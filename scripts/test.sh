#!/usr/bin/env bash
# The whole test suite on a fresh machine: installs (idempotent), lints, runs pytest.
# Extra arguments go to pytest, e.g. `scripts/test.sh -k mask`.
# WORLDVLA_ROS_DISTRO=jazzy runs it against ROS 2 Jazzy (LTS) in .venv-jazzy instead of Kilted.
set -euo pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
distro=${WORLDVLA_ROS_DISTRO:-kilted}
bash "$repo/scripts/install.sh" "$distro"
venv=$repo/.venv
[[ $distro == jazzy ]] && venv=$repo/.venv-jazzy
cd "$repo"
"$venv/bin/python" -m ruff check .
exec "$venv/bin/python" -m pytest -p no:cacheprovider -q -rs "$@"
