#!/usr/bin/env bash
# The training chain behind the first tabletop models that solve tasks in closed loop, as one
# command (docs/embedded-default.md):
#
#   scripts/train_dagger_chain.sh [WORK_DIR] [OUT]     # defaults: artifacts/chain, WORK_DIR/model
#   scripts/train_dagger_chain.sh artifacts/chain worldvla_ros/data/tabletop_model  # the bundled model
#   WORLDVLA_DEVICE=cuda scripts/train_dagger_chain.sh # on a GPU
#   WORLDVLA_CHAIN_SMOKE=1 scripts/train_dagger_chain.sh DIR   # every stage at toy size (the test)
#   WORLDVLA_CAMERA_TILT=45 scripts/train_dagger_chain.sh DIR    # the sim camera tilted 45° (shows height)
#   WORLDVLA_LIGHT_SLANT=45 scripts/train_dagger_chain.sh DIR    # relight (stages 7-8) with another lamp slant
#
# 1. 300 expert demonstrations (layouts 0–299) and 12,000 five-step expert snippets from random
#    gripper poses (one per layout, 200000–211999); action-only training from scratch with soft
#    action-bin targets, 7500 steps (this also trains the VQGAN image tokenizer, 800 steps).
# 2. 4000 ten-step snippets that start within 8 cm of the block (300000–303999); continue
#    2500 steps on them, the demonstrations and half of the uniform snippets.
# 3. DAgger rounds 1 and 2: run the model closed loop on 250 training layouts, label every state it
#    computed a chunk in with the expert's snippet from there, continue 2000 steps on all data.
# 4. Round 3, then joint training under the action attention mask: 3000 steps with half of every
#    batch world-model sequences, 2000 more with a fifth.
# 5. Rounds 4, 5 and 6 on the joint model, each continued 1000 joint steps on its new snippets,
#    the earlier of these rounds' and every fifth bag of the rest.
# 6. Carrying: 5500 snippets that start with the named block in the gripper (1500 of them within
#    8 cm of the target), 1000 joint steps (the models above dropped the block a step or two after
#    grasping it): the bundled model up to 2026-12-07 (then fine-tuned for the monitor on 2026-12-02).
# 7. Relighting (the lamp 60° from vertical: the gripper's shadow shows its height, which the models
#    above could not see): 3000 near snippets, 3000 uniform snippets and 200 demonstrations in the new
#    light; 2000 joint steps on 2000 + 1000 + 200 of them; a DAgger round from the model before
#    relighting (200 layouts); 2000 joint steps on 1500 + 500 + 200 and that round: the bundled model of
#    2026-12-07.
# 8. Standing still (the relit data had no pauses, so the world model could no longer tell a stuck arm from
#    one moving as commanded): a DAgger round from stage 7's model (200 layouts), 800 near snippets, the 200
#    demonstrations, 500 carrying snippets near the target, 300 uniform snippets, and 300 episodes in which the
#    robot pauses at 30 % of the steps as world-model data only (--world-only-data: the policy never learns to
#    pause); 1000 joint steps at lr 3e-4 with 30 % world-model sequences; this stage writes OUT.
#
# Each stage is skipped when its output is complete, so an interrupted run resumes where it
# stopped. Held-out evaluation layouts start at 100000 and are never trained on.
set -euo pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
work=$(realpath -m "${1:-$repo/artifacts/chain}")
out=$(realpath -m "${2:-$work/model}")
bin=$repo/.venv/bin
device=${WORLDVLA_DEVICE:-auto}
tilt=${WORLDVLA_CAMERA_TILT:-0}
slant=0  # stages 1-6: the lighting the models before 2026-12-07 were trained in
extra=()
dagger_extra=()
n_demos=300 n_snippets=12000 n_near=4000 n_dagger=250 n_held=4000 n_held_near=1500 n_eval=50
n_near_r=3000 n_snip_r=3000 n_demos_r=200 n_near_s=800 n_snip_s=300 n_held_near_s=500 n_pauses=300
steps() { echo "$1"; }
if [[ ${WORLDVLA_CHAIN_SMOKE:-0} == 1 ]]; then
  n_demos=2 n_snippets=6 n_near=4 n_dagger=2 n_held=2 n_held_near=2 n_eval=2
  n_near_r=3 n_snip_r=6 n_demos_r=2 n_near_s=2 n_snip_s=2 n_held_near_s=2 n_pauses=2
  steps() { echo 2; }
  extra=(--vq-steps 2 --batch-size 4 --hidden-size 64 --layers 2 --heads 2 --diagnostic-frames 16)
  dagger_extra=(--max-steps 10)
fi
mkdir -p "$work"
SECONDS=0

stage() { printf '== %s (%d min so far) %s\n' "$(date +%T)" $((SECONDS / 60)) "$*" >&2; }

record() {  # record DIR ARGS...: record_demos into DIR unless a finished DIR is there
  local dir=$1; shift
  [[ -d $dir ]] && return
  stage "record_demos $(basename "$dir") $*"
  rm -rf "$dir.partial"
  "$bin/record_demos" "$dir.partial" --camera-tilt "$tilt" --light-slant "$slant" "$@"
  mv "$dir.partial" "$dir"
}

mix() {  # mix DIR SRC[:N|%K]...: DIR links the bags of every SRC (its first N, or every K-th, only)
  local dir=$1; shift
  rm -rf "$dir" && mkdir -p "$dir"
  local spec src pick
  for spec in "$@"; do
    src=${spec%%[:%]*}
    case $spec in
      *:*) pick="NR <= ${spec##*:}" ;;
      *%*) pick="NR % ${spec##*%} == 1" ;;
      *) pick=1 ;;
    esac
    find -L "$src" -mindepth 1 -maxdepth 1 -type d -printf '%f\n' | sort | awk "$pick" |
      sed "s|^|$src/|" | xargs -r -d '\n' ln -s -t "$dir"
  done
}

train() {  # train OUT ARGS...: worldvla_train unless OUT is finished (it writes train_log.json last)
  local dst=$1; shift
  [[ -f $dst/train_log.json ]] && return
  stage "worldvla_train $(basename "$dst") $*"
  "$bin/worldvla_train" --out "$dst" --device "$device" --bin-sigma 6 "${extra[@]}" "$@"
}

from() { echo --init-from "$1" --vqgan-from "$1" --lr 1e-3; }

record "$work/demos" --episodes "$n_demos" --seed 0
record "$work/snippets" --snippets 5 --episodes "$n_snippets" --seed 200000
mix "$work/mix1" "$work/demos" "$work/snippets"
train "$work/m1" --data "$work/mix1" --mode action --steps "$(steps 7500)"

record "$work/near" --snippets 10 --near 0.08 --episodes "$n_near" --seed 300000
data=("$work/demos" "$work/snippets:$((n_snippets / 2))" "$work/near")
mix "$work/mix2" "${data[@]}"
# shellcheck disable=SC2046
train "$work/m2" --data "$work/mix2" --mode action --steps "$(steps 2500)" $(from "$work/m1")

prev=$work/m2
dagger() {  # dagger ROUND: the expert's snippets from the states $prev visits
  record "$work/dagger$1" --snippets 5 --dagger "$prev" --episodes "$n_dagger" --seed $((400000 + 250 * ($1 - 1))) \
    "${dagger_extra[@]}"
}
for round in 1 2; do
  dagger $round
  data+=("$work/dagger$round")
  mix "$work/mix_d$round" "${data[@]}"
  # shellcheck disable=SC2046
  train "$work/d$round" --data "$work/mix_d$round" --mode action --steps "$(steps 2000)" $(from "$prev")
  prev=$work/d$round
done

dagger 3
data+=("$work/dagger3")
mix "$work/mix_d3" "${data[@]}"
# shellcheck disable=SC2046
train "$work/j1" --data "$work/mix_d3" --mode joint --world-fraction 0.5 --steps "$(steps 3000)" $(from "$prev")
# shellcheck disable=SC2046
train "$work/j2" --data "$work/mix_d3" --mode joint --world-fraction 0.2 --steps "$(steps 2000)" $(from "$work/j1")
prev=$work/j2

fresh=("$work/mix_d3%5")
joint() {  # joint DST MIX: 1000 joint steps from $prev on MIX (the sources in $fresh)
  mix "$2" "${fresh[@]}"
  # shellcheck disable=SC2046
  train "$1" --data "$2" --mode joint --world-fraction 0.2 --steps "$(steps 1000)" $(from "$prev")
  prev=$1
}
for round in 4 5 6; do
  dagger $round
  fresh+=("$work/dagger$round")
  joint "$work/j$((round - 1))" "$work/mix_d$round"
done

record "$work/held" --snippets 5 --held 1 --episodes "$n_held" --seed 500000
record "$work/held_near" --snippets 5 --held 1 --near 0.08 --episodes "$n_held_near" --seed 510000
fresh+=("$work/held" "$work/held_near")
joint "$work/base" "$work/mix_held"

slant=${WORLDVLA_LIGHT_SLANT:-60}  # from here on the sim's lamp is slanted (SimConfig().light_slant_deg)
record "$work/r_near" --snippets 10 --near 0.08 --episodes "$n_near_r" --seed 300000
record "$work/r_snippets" --snippets 5 --episodes "$n_snip_r" --seed 200000
record "$work/r_demos" --episodes "$n_demos_r" --seed 0
record "$work/dagger_r1" --snippets 5 --dagger "$work/base" --episodes "$n_demos_r" --seed 400000 "${dagger_extra[@]}"
mix "$work/mix_r1" "$work/r_near:$((n_near_r * 2 / 3))" "$work/r_snippets:$((n_snip_r / 3))" "$work/r_demos"
# shellcheck disable=SC2046
train "$work/r1" --data "$work/mix_r1" --mode joint --world-fraction 0.2 --steps "$(steps 2000)" $(from "$work/base")
mix "$work/mix_r2" "$work/r_near:$((n_near_r / 2))" "$work/r_snippets:$((n_snip_r / 6))" "$work/r_demos" \
  "$work/dagger_r1"
# shellcheck disable=SC2046
train "$work/r2" --data "$work/mix_r2" --mode joint --world-fraction 0.2 --steps "$(steps 2000)" $(from "$work/r1")

record "$work/dagger_r2" --snippets 5 --dagger "$work/r2" --episodes "$n_demos_r" --seed 400500 "${dagger_extra[@]}"
record "$work/r_held_near" --snippets 5 --held 1 --near 0.08 --episodes "$n_held_near_s" --seed 510000
record "$work/r_pauses" --pauses 0.3 --episodes "$n_pauses" --seed 720000
mix "$work/mix_r3" "$work/dagger_r2" "$work/r_near:$n_near_s" "$work/r_demos" "$work/r_held_near" \
  "$work/r_snippets:$n_snip_s"
train "$out" --data "$work/mix_r3" --world-only-data "$work/r_pauses" --mode joint --world-fraction 0.3 \
  --steps "$(steps 1000)" --init-from "$work/r2" --vqgan-from "$work/r2" --lr 3e-4
stage "done: $out"
"$bin/worldvla_sim_eval" --checkpoint "$out" --episodes "$n_eval" --camera-tilt "$tilt" --light-slant "$slant"
