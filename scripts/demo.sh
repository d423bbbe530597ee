#!/usr/bin/env bash
# The main job on a fresh machine: install (idempotent), then bring up the tabletop sim, the
# action node and the world-model node on the bundled model, print what flows and task success.
# Extra arguments go to worldvla_bringup, e.g. `scripts/demo.sh --checkpoint DIR --device cuda`.
set -euo pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
bash "$repo/scripts/install.sh"
export ROS_AUTOMATIC_DISCOVERY_RANGE=${ROS_AUTOMATIC_DISCOVERY_RANGE:-LOCALHOST}
exec "$repo/.venv/bin/python" -m worldvla_ros.bringup --demo "${WORLDVLA_DEMO_SECONDS:-300}" \
  --episodes "${WORLDVLA_DEMO_EPISODES:-5}" "$@"
