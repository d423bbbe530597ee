#!/usr/bin/env bash
# Every GPU figure of the fast-inference work in one run, most wanted first; one JSON per measurement in
# OUT (default benchmarks/results/gpu). Needs a Python with torch (CUDA), transformers, tokenizers and numpy
# (no ROS: the model package runs without rclpy): PYTHON=... bash benchmarks/gpu.sh [OUT]
# Each step has its own time limit (STEP_LIMIT_S, default 300) so that one slow step leaves the rest, and
# all of them together TOTAL_LIMIT_S (default 3600): a step that would start with under 30 s left is skipped.
# A machine lent for one 10-minute call: TOTAL_LIMIT_S=540 (the most wanted steps come first). The model
# code's tests pass on transformers 5.17 (what the lent GPU machines had) as on 5.24, with torch 2.13 on CPU.
set -uo pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
out=${1:-$repo/benchmarks/results/gpu}
py=${PYTHON:-python3}
limit=${STEP_LIMIT_S:-300}
total=${TOTAL_LIMIT_S:-3600}
started=$SECONDS
mkdir -p "$out"
export PYTHONPATH="$repo${PYTHONPATH:+:$PYTHONPATH}"
"$py" -c 'import torch; assert torch.cuda.is_available(), "no CUDA device"; print(torch.cuda.get_device_name())' || exit 1
nvidia-smi --query-gpu=name,memory.total,clocks.max.memory --format=csv > "$out/device.csv" 2>&1 || true

step() {  # name, command...: its JSON to OUT/name.json, its log to OUT/name.log
  local name=$1; shift
  local left=$((total - (SECONDS - started))) this=${STEP_LIMIT_S:-$limit}
  if ((left < 30)); then echo "== $name: skipped (TOTAL_LIMIT_S reached)" >&2; return; fi
  ((this > left)) && this=$left
  echo "== $name" >&2
  timeout "$this" "$@" > "$out/$name.json" 2> "$out/$name.log"
  echo "   exit $? ($(tail -c 200 "$out/$name.log" | tr '\n' ' ' | cut -c1-160))" >&2
}

# 7B, random bf16 weights: prefill and chunk (engine, CUDA graphs, transformers generate) against the floor
step model_core_7b_256_k10 "$py" "$repo/benchmarks/model_core.py" --config 7b --device cuda --dtype bfloat16 \
  --resolution 256 --chunk-size 10 --repeats 5 --skip-world-model
step model_core_7b_256_k5 "$py" "$repo/benchmarks/model_core.py" --config 7b --device cuda --dtype bfloat16 \
  --resolution 256 --chunk-size 5 --repeats 5 --skip-world-model
step model_core_7b_512_k10 "$py" "$repo/benchmarks/model_core.py" --config 7b --device cuda --dtype bfloat16 \
  --resolution 512 --chunk-size 10 --repeats 3 --skip-world-model
# the bundled model (real weights: drafted frames keep most of the draft), and the fleet
step model_core_bundled "$py" "$repo/benchmarks/model_core.py" --config bundled --device cuda --repeats 9
step fleet_bundled "$py" "$repo/benchmarks/fleet.py" --config bundled --device cuda --robots 1 2 4 8 --seconds 10
step monitor_costs "$py" "$repo/benchmarks/monitor_anomalies.py" --device cuda --costs-only
# 7B world-model frames (256 steps a frame on random weights: minutes)
STEP_LIMIT_S=${WM_LIMIT_S:-540} step model_core_7b_256_k10_world_model "$py" "$repo/benchmarks/model_core.py" \
  --config 7b --device cuda --dtype bfloat16 --resolution 256 --chunk-size 10 --repeats 2
# The paper's LIBERO table with the released checkpoints (needs scripts/install.sh --libero and the weights under
# $WORLDVLA_RELEASE, e.g. /data/WorldVLA/model_256; hours: 500 episodes per suite). Off unless LIBERO_TABLE=1.
if [[ ${LIBERO_TABLE:-0} == 1 ]]; then
  release=${WORLDVLA_RELEASE:-/data/WorldVLA/model_256}
  for suite in libero_spatial libero_object libero_goal libero_10; do
    STEP_LIMIT_S=${LIBERO_LIMIT_S:-36000} step "libero_$suite" "$py" -m worldvla_ros.sim.libero_eval --suite "$suite" \
      --checkpoint "$release/$suite" --device cuda --envs 8 --out "$out/libero_$suite" --no-progress
  done
fi
echo "results in $out" >&2
