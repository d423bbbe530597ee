"""evaluate_bag: score a WorldVLA checkpoint on recorded ros2 bags before going live.

    evaluate_bag BAG [BAG ...] --checkpoint DIR [--mode lockstep|live] [--out eval_report]

lockstep (default): every frame, in order, through the action node's own conversion, history,
model call and safety filter; deterministic, as fast as the model runs.
live: the bag is played through rclpy at its recorded rate (``--rate`` scales it) with /clock,
the real nodes answer, their outputs are recorded into ``OUT/outputs_<bag>`` and scored, so
latency, drops and stale frames are measured as the robot would see them.

Ground truth: EndEffectorCommand, ActionChunk, TwistStamped (+ ``--gripper-topic``) or
Float64MultiArray; topics are found by type when a bag has one of a kind. Exit status: 0 done,
1 checkpoint problem, 2 bag or usage problem, 3 anything unexpected.
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from worldvla_ros.chunk_merge import MERGES
from worldvla_ros.control import ControlSettings
from worldvla_ros.launch_plan import node_parameters

from .bag_io import BagError
from .episode import Episode, TopicMap, read_episode
from .node_config import action_scale, parse_action_scale, safety_limits
from .scoring import RunRecord, action_scores, executed_from_chunks, timing_scores, world_model_scores


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog='evaluate_bag', description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('bags', nargs='+', help='rosbag2 bags: directories (sqlite3 or mcap) or single .mcap files')
    p.add_argument('--checkpoint', required=True, help='WorldVLA checkpoint directory')
    p.add_argument('--tokenizer-dir', default='')
    p.add_argument('--device', default='auto')
    p.add_argument('--dtype', default='auto')
    p.add_argument('--config', action='append', default=[],
                   help="the nodes' parameter file (default: the installed config/worldvla.yaml); repeat it to "
                        'layer files as ROS does, e.g. --config worldvla.yaml --config tabletop_sim.yaml')
    p.add_argument('--mode', choices=('lockstep', 'live'), default='lockstep')
    p.add_argument('--out', default='eval_report',
                   help='report directory; one that already holds files is refused unless --overwrite')
    p.add_argument('--overwrite', action='store_true',
                   help='replace the report files (report.*, *.png, outputs_*) an earlier run left in --out')
    t = p.add_argument_group('topics')
    t.add_argument('--image-topic', default='')
    t.add_argument('--instruction-topic', default='')
    t.add_argument('--instruction', default='', help='instruction text (instead of a topic)')
    t.add_argument('--action-topic', default='', help='recorded (ground-truth) actions')
    t.add_argument('--gripper-topic', default='',
                   help='gripper state with TwistStamped actions: Bool (true = closed) or Float64/Float32 '
                        'with --gripper-open/--gripper-closed')
    t.add_argument('--gripper-open', type=float, default=None, help="a Float gripper topic's value when open (→ -1)")
    t.add_argument('--gripper-closed', type=float, default=None,
                   help="a Float gripper topic's value when closed (→ +1)")
    t.add_argument('--time-source', choices=('header', 'bag'), default='header')
    e = p.add_argument_group('evaluation')
    e.add_argument('--replan-every', type=int, default=None,
                   help="lockstep: frames between chunks (0: a chunk runs out first); default: the action node's "
                        'replan_threshold from the parameter file (-1: a chunk on every frame)')
    e.add_argument('--sequential', action='store_true', help='release decoding loop instead of batched')
    e.add_argument('--chunk-merge', choices=MERGES, default=None,
                   help="lockstep: a new chunk vs the actions still queued (default: the action node's chunk_merge); "
                        'the report compares every choice on the same chunks')
    e.add_argument('--ensemble-decay', type=float, default=None,
                   help="lockstep, ensemble: weights exp(-decay·i) (default: the action node's ensemble_decay)")
    e.add_argument('--no-world-model', action='store_true')
    e.add_argument('--wm-horizon', type=int, default=1, help='imagined frames per rollout')
    e.add_argument('--wm-every', type=int, default=1, help='lockstep: roll out from every n-th chunk')
    e.add_argument('--deadline', type=float, default=0.0, help='s; default: the chunk’s duration')
    e.add_argument('--control-rate', type=float, default=None, metavar='HZ',
                   help="rate the actions are executed at (jerk, deadlines, twist conversion, live nodes); "
                        "default: the bags' camera rate")
    e.add_argument('--gripper-threshold', type=float, default=0.0)
    e.add_argument('--action-scale', type=_action_scale, default=None, metavar='PRESET|7 VALUES',
                   help='metres/radians per action unit for errors and jerk in physical units: libero '
                        '(0.05 m, 0.5 rad), tabletop (0.02 m, 0.1 rad) or 7 comma-separated values '
                        "(default: the action node's action_scale in the config)")
    e.add_argument('--rate', type=float, default=1.0, help='live: playback speed factor')
    e.add_argument('--await-chunks', action='store_true',
                   help="live: the clock waits at each frame the action node asks a chunk from until that chunk "
                        "is out (the node's commands then do not depend on the machine's speed; latency is not "
                        'felt)')
    e.add_argument('--domain-id', type=int, default=None,
                   help='live: ROS domain of the replay (default: a random one, localhost only, so that its '
                        '/clock and commands never reach a running robot)')
    m = p.add_argument_group('world-model monitor calibration')
    m.add_argument('--calibrate-monitor', default='', metavar='FILE',
                   help='instead of evaluating: score every transition of the (normal) bags with the monitor and '
                        "write thresholds for --false-alarm-rate to FILE, the world-model node's monitor_calibration")
    m.add_argument('--false-alarm-rate', type=float, default=0.05,
                   help='share of normal transitions that may raise an alarm (default 0.05)')
    m.add_argument('--monitor-signals', nargs='+', default=None, metavar='SIGNAL',
                   help='signals that alarm (default: peak_excess_bits action_consistency motion_cusum; '
                        'frame_change adds the model-free pixel change, which sees lighting and camera changes best)')
    m.add_argument('--no-motion-check', action='store_true',
                   help='no motion model in the calibration (no motion_evidence / motion_cusum): the robot moving '
                        'the wrong way or a camera seeing late go unseen')
    e.add_argument('--no-progress', action='store_true')
    e.add_argument('--debug', action='store_true', help='show the traceback of unexpected errors')
    return p


def _action_scale(text: str) -> tuple[float, ...]:
    try:
        return parse_action_scale(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from exc


def _config_paths(given: list[str]) -> list[Path]:
    if given:
        missing = [g for g in given if not Path(g).is_file()]
        if missing:
            raise BagError(f'no parameter file {", ".join(missing)}')  # exit 2 like every usage problem
        return [Path(g) for g in given]
    from worldvla_ros.bringup import default_config

    return [default_config()]


def checkpoint_settings(checkpoint: str, tokenizer_dir: str = ''):
    """The checkpoint's WorldVLA settings (resolution, instruction limit …) from its config.json, the model not
    loaded."""
    from worldvla_ros.model.checkpoint import find_checkpoint_files, read_config, worldvla_settings

    files = find_checkpoint_files(checkpoint, tokenizer_dir or None)
    return worldvla_settings(read_config(files), files.root)


def check_instructions(episodes: list[Episode], max_chars: int) -> None:
    """Every bag's instruction as the model would take it, else a BagError naming the bag (before any work)."""
    from worldvla_ros.model.prompts import check_instruction

    for ep in episodes:
        try:
            ep.instruction = check_instruction(ep.instruction, max_chars)
        except ValueError as exc:
            raise BagError(f'{ep.name}: the model refuses its instruction: {exc} (give another with --instruction)') \
                from exc


def summarize(args: argparse.Namespace, policy_info: dict[str, Any], episodes: list[Episode],
              runs: list[RunRecord], control_rate_hz: float, scale: tuple[float, ...],
              rate_source: str = '') -> dict[str, Any]:
    return {
        'mode': args.mode,
        **policy_info,
        'bags': [str(b) for b in args.bags],
        'frames': sum(len(e.frames) for e in episodes),
        'action_sources': [e.action_source for e in episodes],
        'control_rate_hz': control_rate_hz,
        'control_rate_source': rate_source,
        'action_conversion': sorted({e.conversion for e in episodes if e.conversion}),
        'actions': action_scores(runs, args.gripper_threshold, action_scale=scale, control_rate_hz=control_rate_hz),
        'world_model': world_model_scores(runs),
        'timing': timing_scores(runs, control_rate_hz, args.deadline),
        'episodes': [{'bag': r.episode, 'instruction': e.instruction, 'frames': len(e.frames),
                      'chunks': len(r.chunks), **r.counts} for e, r in zip(episodes, runs, strict=True)],
    }


def control_rate_of(episodes: list[Episode], given: float | None, configured: float) -> tuple[float, str]:
    """The rate the recorded actions were executed at: given, else the bags' camera rate, else the YAML's."""
    if given is not None:
        if not given > 0:
            raise BagError(f'--control-rate must be > 0, got {given}')
        return float(given), '--control-rate'
    periods = [e.period_s for e in episodes if e.period_s > 0]
    if not periods:
        return configured, "the action node's control_rate_hz (no bag has two frames)"
    if max(periods) > 1.01 * min(periods):
        rates = ', '.join(f'{e.name} {1 / e.period_s:.3g} Hz' for e in episodes if e.period_s > 0)
        raise BagError(f'the bags were recorded at different rates ({rates}): evaluate them separately or give '
                       '--control-rate')
    return round(1.0 / float(np.median(periods)), 6), "the bags' camera stamps"


def prepare_out_dir(out: Path, overwrite: bool) -> None:
    """Before any work: --out is writable, and holds no report of another run unless --overwrite."""
    if out.exists() and not out.is_dir():
        raise BagError(f'--out {out} is a file, not a directory')
    ours = [p for p in (out.iterdir() if out.is_dir() else ())
            if p.name in ('report.json', 'report.md') or p.suffix == '.png' or p.name.startswith('outputs_')]
    others = [p for p in (out.iterdir() if out.is_dir() else ()) if p not in ours]
    if ours and not overwrite:
        raise BagError(f'--out {out} already holds a report ({", ".join(sorted(p.name for p in ours)[:4])}); '
                       'choose another directory or pass --overwrite to replace it')
    if others and not ours:
        raise BagError(f'--out {out} is not empty and holds no report: choose an empty or new directory')
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / '.write-test'
        probe.write_text('')
        probe.unlink()
    except OSError as exc:
        raise BagError(f'cannot write the report to {out}: {exc.strerror or exc}') from exc
    for p in ours:
        shutil.rmtree(p) if p.is_dir() else p.unlink()


def run(args: argparse.Namespace) -> tuple[dict[str, Any], list[RunRecord]]:
    from tqdm import tqdm

    config = _config_paths(args.config)
    action_params = node_parameters(config, 'worldvla_action')
    scale = args.action_scale or action_scale(action_params)
    if not args.calibrate_monitor:
        prepare_out_dir(Path(args.out), args.overwrite)
    topics = TopicMap(args.image_topic, args.instruction_topic, args.action_topic, args.gripper_topic,
                      args.instruction, args.time_source, args.gripper_open, args.gripper_closed)
    period = 1.0 / args.control_rate if args.control_rate and args.control_rate > 0 else None
    # every bag checked before the model loads, each frame kept only as the model's crop: bounded memory
    settings = checkpoint_settings(args.checkpoint, args.tokenizer_dir)
    episodes = [read_episode(b, topics, action_scale=scale, period_s=period, frame_size=settings.resolution,
                             motion=bool(args.calibrate_monitor) and not args.no_motion_check) for b in args.bags]
    check_instructions(episodes, settings.max_instruction_chars)
    control_rate, source = control_rate_of(episodes, args.control_rate,
                                           float(action_params.get('control_rate_hz', 10.0)))
    print(f'evaluate_bag: control period {1e3 / control_rate:.1f} ms ({control_rate:g} Hz), from {source}',
          file=sys.stderr)
    if args.calibrate_monitor:
        return calibrate_monitor(args, episodes, control_rate, action_params), []
    if args.mode == 'live':
        from .live import evaluate_live

        runs, policy_info = evaluate_live(args, episodes, config, control_rate)
        return summarize(args, policy_info, episodes, runs, control_rate, scale, source), runs

    from worldvla_ros.model import load_policy

    from .lockstep import LockstepSettings, evaluate_lockstep

    merge = args.chunk_merge or action_params.get('chunk_merge', 'replace')
    decay = args.ensemble_decay if args.ensemble_decay is not None else float(action_params.get('ensemble_decay', 0.01))
    if merge not in MERGES or not 0.0 <= decay <= 10.0:
        raise BagError(f'chunk merge {merge!r} / ensemble decay {decay}: use replace|ensemble, decay in [0, 10]')
    if args.replan_every is not None and args.replan_every < 0:
        raise BagError(f'--replan-every must be ≥ 0, got {args.replan_every}')
    overrides = {k: int(action_params[k]) for k in ('chunk_size', 'history_frames') if action_params.get(k)}
    policy = load_policy(args.checkpoint, args.device, args.dtype, args.tokenizer_dir or None, **overrides)
    control = replace(ControlSettings.from_parameters(action_params), rate_hz=control_rate, chunk_merge=merge,
                      ensemble_decay=decay)
    if args.replan_every is not None:  # a chunk every N frames: asked for once K - N are left (0: run out)
        control = replace(control, replan_threshold=max(policy.chunk_size - args.replan_every, 0)
                          if args.replan_every else 0)
    settings = LockstepSettings(not args.sequential, not args.no_world_model, args.wm_horizon, args.wm_every)
    runs = []
    t0 = time.perf_counter()
    with tqdm(total=sum(len(e.frames) for e in episodes), unit='frame', disable=args.no_progress,
              desc='lockstep', file=sys.stderr) as bar:
        for ep in episodes:
            bar.set_postfix_str(ep.name)
            runs.append(evaluate_lockstep(policy, ep, safety_limits(action_params), control, settings, bar.update))
    info = {'model_id': policy.model_id, 'device': str(policy.device), 'chunk_size': policy.chunk_size,
            'history_frames': policy.config.history_frames, 'rotate_180': policy.config.rotate_180,
            'throughput_frames_per_s': round(sum(len(e.frames) for e in episodes) / (time.perf_counter() - t0), 3)}
    summary = summarize(args, info, episodes, runs, control_rate, scale, source)
    summary['chunk_merge'] = merge_comparison(runs, merge, decay, args.gripper_threshold, scale, control_rate)
    return summary, runs


def calibrate_monitor(args: argparse.Namespace, episodes: list[Episode], control_rate: float,
                      action_params: dict[str, Any]) -> dict[str, Any]:
    """The monitor's signals on every transition of the bags, one control period apart, and thresholds for the
    false-alarm rate written to ``args.calibrate_monitor``."""
    from tqdm import tqdm

    from worldvla_ros.model import load_policy
    from worldvla_ros.monitor import (
        DEFAULT_ALERT_SIGNALS,
        LIKELIHOOD_SIGNALS,
        MOTION_ALERT_SIGNALS,
        MOTION_SIGNALS,
        CalibrationEpisode,
        CalibrationError,
        MotionFitError,
        calibrate,
        calibrate_episodes,
        min_transitions,
        transition_signals,
    )
    from worldvla_ros.motion_check import motion_features

    chosen = tuple(args.monitor_signals or (DEFAULT_ALERT_SIGNALS if args.no_motion_check else MOTION_ALERT_SIGNALS))
    known = {*LIKELIHOOD_SIGNALS, 'frame_change', *(() if args.no_motion_check else MOTION_SIGNALS)}
    unknown = set(chosen) - known
    if unknown:
        raise BagError(f'unknown monitor signals {sorted(unknown)}; known: {", ".join(sorted(known))}')

    # what can fail without the model fails before it loads: the output place, the rate, too little data
    target = Path(args.calibrate_monitor)
    if not target.parent.is_dir() or not os.access(target.parent, os.W_OK) or target.is_dir():
        raise BagError(f'cannot write {target}: not a file in a writable directory')
    if not 0.0 < args.false_alarm_rate < 1.0:
        raise BagError(f'--false-alarm-rate must lie in (0, 1), got {args.false_alarm_rate}')
    pairs = []  # (episode, frame index, frames a control period later)
    skipped = 0
    for ep in episodes:
        step = max(1, round(1.0 / (ep.period_s * control_rate))) if ep.period_s > 0 else 1
        for i in range(len(ep.frames) - step):
            if np.all(np.isfinite(ep.actions[i])):
                pairs.append((ep, i, step))
            else:
                skipped += 1  # no recorded command for this frame
    needed = min_transitions(args.false_alarm_rate)
    if len(pairs) < needed:
        raise BagError(f'the bags hold {len(pairs)} transitions with a command, too few for a false-alarm rate of '
                       f'{args.false_alarm_rate} (need at least {needed})')

    overrides = {k: int(action_params[k]) for k in ('chunk_size', 'history_frames') if action_params.get(k)}
    policy = load_policy(args.checkpoint, args.device, args.dtype, args.tokenizer_dir or None, **overrides)
    sequences = []
    with tqdm(total=len(pairs), unit='transition', disable=args.no_progress, desc='monitor', file=sys.stderr) as bar:
        for chain in transition_chains(pairs):
            got = CalibrationEpisode(chain[0][0].name, [], [], [])
            sequences.append(got)
            for ep, i, step in chain:
                bar.update()
                before, after = ep.frames[i], ep.frames[i + step]
                lik = policy.transition_likelihood(before, ep.actions[i], after)
                got.signals.append(transition_signals(lik, policy.model_frame(before), policy.model_frame(after)))
                got.commands.append(ep.actions[i])
                if ep.motion_frames:
                    got.features.append(motion_features(ep.motion_frames[i], ep.motion_frames[i + step]))
    try:
        if args.no_motion_check:
            cal = calibrate([s for e in sequences for s in e.signals], args.false_alarm_rate, chosen,
                            model_id=policy.model_id, weights=policy.weights_digest)
        else:
            cal = calibrate_episodes(sequences, args.false_alarm_rate, chosen,
                                     model_id=policy.model_id, weights=policy.weights_digest)
    except MotionFitError as exc:
        raise BagError(f'{exc} (record more normal work, or calibrate without it: --no-motion-check)') from exc
    except CalibrationError as exc:
        raise BagError(str(exc)) from exc
    cal.source = [e.name for e in episodes]
    try:
        cal.save(args.calibrate_monitor)
    except OSError as exc:
        raise BagError(f'cannot write {args.calibrate_monitor}: {exc.strerror or exc}') from exc
    print(f'evaluate_bag: monitor calibrated on {cal.transitions} transitions ({skipped} without a command): '
          f'false alarms {cal.measured_rate:.3f} (asked {cal.false_alarm_rate}); thresholds '
          + ', '.join(f'{k} {v:.4g}' for k, v in cal.thresholds.items()) + f' → {args.calibrate_monitor}',
          file=sys.stderr)
    return {'calibration': cal.to_json()}


def transition_chains(pairs: list[tuple[Any, int, int]]) -> list[list[tuple[Any, int, int]]]:
    """(episode, frame, step) transitions grouped into unbroken chains a control period apart, in order: a camera
    faster than the control rate gives ``step`` interleaved chains per bag, and a frame without a command ends
    one. The monitor's sequential evidence runs along a chain, never across a gap or between chains."""
    chains: list[list[tuple[Any, int, int]]] = []
    open_: dict[tuple[int, int], list[tuple[Any, int, int]]] = {}  # (bag, residue) → its chain
    for ep, i, step in pairs:
        key = (id(ep), i % step)
        chain = open_.get(key)
        if chain is None or i != chain[-1][1] + step:
            chain = open_[key] = []
            chains.append(chain)
        chain.append((ep, i, step))
    return chains


def merge_comparison(runs: list[RunRecord], used: str, decay: float, gripper_threshold: float,
                     scale: tuple[float, ...], control_rate: float) -> dict[str, Any]:
    """The same chunks executed with every chunk merge: jerk at seams and within chunks, L1, for each."""
    out: dict[str, Any] = {'used': used, 'ensemble_decay': decay, 'by_choice': {}}
    for merge in MERGES:
        again = [replace(r, executed=executed_from_chunks(r.chunks, len(r.gt), merge, decay)) for r in runs]
        scores = action_scores(again, gripper_threshold, action_scale=scale, control_rate_hz=control_rate)
        phys = scores.get('physical') or {}
        out['by_choice'][merge] = {k: phys.get(k) for k in ('jerk_at_seams', 'jerk_within_chunks', 'l1')}
        out['by_choice'][merge]['seam_windows'] = phys.get('seam_windows')
    return out


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from worldvla_ros.model.errors import CheckpointError

    try:
        summary, runs = run(args)
    except BagError as exc:
        print(f'evaluate_bag: error: {exc}', file=sys.stderr)
        return 2
    except CheckpointError as exc:
        print(f'evaluate_bag: error: cannot load checkpoint: {exc}', file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print('evaluate_bag: interrupted', file=sys.stderr)
        return 130
    except Exception as exc:
        if args.debug:
            raise
        print(f'evaluate_bag: error: {type(exc).__name__}: {exc} (run with --debug for the traceback)',
              file=sys.stderr)
        return 3
    if args.calibrate_monitor:
        return 0
    from .report import write_report

    paths = write_report(Path(args.out), summary, runs)
    a = summary['actions']
    print(f'{summary["frames"]} frames, {a.get("actions_compared", 0)} actions compared; '
          f'report: {paths["markdown"]}')
    return 0


if __name__ == '__main__':
    raise SystemExit(main())
