"""The paper's LIBERO evaluation, by the release's protocol (``worldvla_ros.sim.libero``), through the action
node's control loop (``worldvla_ros.control``), in process or through the real ROS nodes.

    worldvla_libero_eval --suite libero_goal --checkpoint DIR [--tasks 0,3] [--trials 50] [--envs 4]
    worldvla_libero_eval --suite libero_object --policy expert --trials 3

Every step: the frame, a chunk if the controller asks (only once the last one has run out, by default), the
command through the node's limits, one ``env.step``. ``--envs N`` runs N simulator processes side by side and
decodes their chunks together in one batch. Results are appended to ``OUT/episodes.jsonl`` as each episode
ends: a killed run resumes where it stopped. ``OUT/report.json`` and ``report.md``: success per task and suite
with Wilson 95 % intervals, steps, episodes per hour; ``OUT/episodes/*.png`` a strip of each episode.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from worldvla_ros.control import Controller, ControlSettings
from worldvla_ros.metrics import wilson95
from worldvla_ros.model.action_tokenizer import LIBERO_ACTION_MAX, LIBERO_ACTION_MIN
from worldvla_ros.safety import SafetyLimits

from .libero import RATE_HZ, SUITES, WAIT_STEPS, ActionDigest, LiberoEnv, LiberoMissing, model_view

LIMITS = SafetyLimits(LIBERO_ACTION_MIN, LIBERO_ACTION_MAX, (0.0,) * 7)
PERIOD_NS = round(1e9 / RATE_HZ)
STRIP_FRAMES = 8


@dataclass
class Options:
    suite: str
    replan: int = 0  # 0: a new chunk once the last has run out (the release); N: every N steps
    chunk_merge: str = 'replace'
    action_mask: bool = True
    prompt_source: str = 'language'  # language (the release's evaluation) | name (libero_10's training text)
    max_steps: int = 0  # 0: the suite's (the release's)


def prompt_text(env: LiberoEnv, source: str) -> str:
    return env.name.replace('_', ' ') if source == 'name' else env.language


@dataclass
class Episode:
    """One trial on one simulator: the controller, the step count and what the report keeps."""

    task: int
    trial: int
    ctrl: Controller
    instruction: str
    t: int = WAIT_STEPS  # the release counts the wait steps
    chunks: int = 0
    holds: int = 0
    silent: int = 0
    strip: list[np.ndarray] = field(default_factory=list)
    actions: ActionDigest = field(default_factory=ActionDigest)
    started: float = field(default_factory=time.perf_counter)

    @property
    def stamp(self) -> int:
        return self.t * PERIOD_NS


def new_episode(env: LiberoEnv, task: int, trial: int, opts: Options, chunk_size: int, history: int) -> Episode:
    threshold = max(chunk_size - opts.replan, 0) if opts.replan else 0
    settings = ControlSettings(rate_hz=RATE_HZ, replan_threshold=threshold, chunk_merge=opts.chunk_merge,
                               enabled=True, history_frames=history, watchdog_timeout=600.0, max_obs_age=600.0)
    ctrl = Controller(settings, LIMITS)
    instruction = prompt_text(env, opts.prompt_source)
    ctrl.set_instruction(instruction)
    ctrl.activate()
    return Episode(task, trial, ctrl, instruction)


class ModelChunks:
    """Chunks for several episodes' requests at once (one batch on the model), as the fleet decodes."""

    def __init__(self, policy: Any, action_mask: bool) -> None:
        self.policy, self.action_mask = policy, action_mask
        self.chunk_size, self.history = policy.chunk_size, policy.config.history_frames

    def __call__(self, requests: list[Any], envs: list[LiberoEnv]) -> list[tuple[np.ndarray, float]]:
        if self.action_mask and len(requests) > 1:
            preds = self.policy.predict_many([(r.frames, r.instruction) for r in requests])
        else:
            preds = [self.policy.predict(r.frames, r.instruction, batched=self.action_mask,
                                         action_mask=self.action_mask) for r in requests]
        return [(p.actions, p.timing.total_s) for p in preds]


class ExpertChunks:
    """The scripted expert as a policy of one-action chunks (the same control loop, a chunk every step)."""

    chunk_size, history = 1, 1

    def __call__(self, requests: list[Any], envs: list[LiberoEnv]) -> list[tuple[np.ndarray, float]]:
        return [(env.expert_action()[None], 0.0) for env in envs]


def run_jobs(jobs: list[tuple[int, int]], opts: Options, chunks: Any, envs: int, out: Path | None,
             progress: bool = True, resolution: int = 256, first_env: LiberoEnv | None = None
             ) -> list[dict[str, Any]]:
    """Run (task, trial) jobs over ``envs`` simulators; each finished episode's record is appended to
    ``out/episodes.jsonl`` (and returned). ``first_env``: an env already open (it is closed here), used for
    its task instead of opening another."""
    from tqdm import tqdm

    pending = list(jobs)
    slots: list[dict[str, Any]] = [{'env': None, 'episode': None, 'frame': None} for _ in range(max(envs, 1))]
    slots[0]['env'] = first_env
    results: list[dict[str, Any]] = []
    limit = opts.max_steps or SUITES[opts.suite]
    bar = tqdm(total=len(jobs), unit='episode', desc=opts.suite, disable=not progress, file=sys.stderr)
    try:
        while pending or any(s['episode'] for s in slots):
            for slot in slots:  # fill free simulators
                if slot['episode'] is None and pending:
                    task, trial = pending.pop(0)
                    if slot['env'] is None or slot['env'].task != task:
                        if slot['env'] is not None:
                            slot['env'].close()
                        slot['env'] = LiberoEnv(opts.suite, task, resolution)
                    ep = new_episode(slot['env'], task, trial, opts, chunks.chunk_size, chunks.history)
                    try:
                        slot['frame'] = slot['env'].reset(trial)
                        slot['episode'] = ep
                    except RuntimeError as exc:
                        results.append(_finish(ep, False, out, f'reset: {exc}'))
                        bar.update(1)
            live = [s for s in slots if s['episode'] is not None]
            asking = []
            for s in live:  # the node's order: the frame, then a request if the controller wants one
                ep = s['episode']
                ep.ctrl.on_frame(s['frame'].image, ep.stamp, ep.stamp * 1e-9)
                if len(ep.strip) < 400:
                    ep.strip.append(model_view(s['frame'].image)[::4, ::4])
                request = ep.ctrl.next_request(ep.stamp, ep.stamp * 1e-9)
                if request is not None:
                    asking.append((s, request))
            if asking:
                try:
                    answers = chunks([r for _, r in asking], [s['env'] for s, _ in asking])
                except (ValueError, RuntimeError) as exc:  # a failed inference: counted, the episode goes on
                    answers = [exc] * len(asking)
                for (s, request), answer in zip(asking, answers, strict=True):
                    ep = s['episode']
                    if isinstance(answer, Exception):
                        ep.ctrl.inference_failed(request, str(answer), ep.stamp * 1e-9)
                    elif ep.ctrl.on_chunk(request, answer[0], ep.stamp * 1e-9, answer[1]) is not None:
                        ep.chunks += 1
            stepping = []
            for s in live:
                ep = s['episode']
                command = ep.ctrl.tick(ep.stamp * 1e-9, ep.stamp)
                if command is None:  # nothing commanded yet: the model has not given a chunk
                    ep.silent += 1
                    if ep.silent >= 3:
                        results.append(_finish(ep, False, out, 'no chunk from the model'))
                        s['episode'] = None
                        bar.update(1)
                    continue
                ep.actions.update(command.action)
                ep.holds += command.hold
                s['env'].send_step(command.action)  # every simulator steps at once, in its own process
                stepping.append(s)
            for s in stepping:
                ep = s['episode']
                try:
                    s['frame'] = s['env'].receive()
                except RuntimeError as exc:  # the release: any exception ends the episode as a failure
                    results.append(_finish(ep, False, out, str(exc)))
                    s['episode'] = None
                    s['env'].close()
                    s['env'] = None
                    bar.update(1)
                    continue
                if s['frame'].done or ep.t + 1 >= limit + WAIT_STEPS:
                    ep.t += 1
                    results.append(_finish(ep, s['frame'].done, out))
                    s['episode'] = None
                    bar.update(1)
                else:
                    ep.t += 1
    finally:
        bar.close()
        for s in slots:
            if s['env'] is not None:
                s['env'].close()
    return results


def _finish(ep: Episode, success: bool, out: Path | None, error: str = '') -> dict[str, Any]:
    record = {'task': ep.task, 'trial': ep.trial, 'success': bool(success), 'steps': ep.t - WAIT_STEPS,
              'chunks': ep.chunks, 'holds': ep.holds, 'instruction': ep.instruction,
              'actions_sha': ep.actions.hexdigest(),
              'wall_s': round(time.perf_counter() - ep.started, 2)}
    if error:
        record['error'] = error[:300]
    if out is not None:
        with open(out / 'episodes.jsonl', 'a') as f:
            f.write(json.dumps(record) + '\n')
        if ep.strip:
            import cv2

            picks = np.linspace(0, len(ep.strip) - 1, min(STRIP_FRAMES, len(ep.strip))).round().astype(int)
            strip = np.concatenate([ep.strip[i] for i in picks], axis=1)
            (out / 'episodes').mkdir(exist_ok=True)
            cv2.imwrite(str(out / 'episodes' / f'task{ep.task:02d}_trial{ep.trial:02d}.png'), strip[..., ::-1])
    return record


def summarize(records: list[dict[str, Any]], opts: Options, wall_s: float) -> dict[str, Any]:
    tasks: dict[int, list[dict[str, Any]]] = {}
    for r in records:
        tasks.setdefault(r['task'], []).append(r)
    per_task = []
    for task, rs in sorted(tasks.items()):
        k = sum(r['success'] for r in rs)
        per_task.append({'task': task, 'instruction': rs[0]['instruction'], 'successes': k, 'trials': len(rs),
                         'success_rate': round(k / len(rs), 4), 'wilson95': list(wilson95(k, len(rs))),
                         'mean_steps': round(float(np.mean([r['steps'] for r in rs])), 1),
                         'errors': sum('error' in r for r in rs)})
    k, n = sum(r['success'] for r in records), len(records)
    return {'suite': opts.suite, 'episodes': n, 'successes': k, 'success_rate': round(k / n, 4) if n else None,
            'wilson95': list(wilson95(k, n)), 'per_task': per_task,
            'episodes_per_hour': round(n / wall_s * 3600, 1) if wall_s > 0 and n else None,
            'protocol': {'max_steps': opts.max_steps or SUITES[opts.suite], 'wait_steps': WAIT_STEPS,
                         'replan': opts.replan or 'when the chunk has run out', 'chunk_merge': opts.chunk_merge,
                         'action_mask': opts.action_mask, 'prompt_source': opts.prompt_source}}


def write_report(out: Path, summary: dict[str, Any], label: str) -> None:
    (out / 'report.json').write_text(json.dumps({**summary, 'policy': label}, indent=2))
    lines = [f'# LIBERO {summary["suite"]}: {label}', '',
             f'{summary["successes"]} of {summary["episodes"]} episodes succeeded '
             f'({summary["success_rate"]:.1%}, Wilson 95 % {summary["wilson95"][0]:.1%}–{summary["wilson95"][1]:.1%}).',
             '', '| task | instruction | successes | rate (95 %) | mean steps |', '|---|---|---|---|---|']
    for t in summary['per_task']:
        lo, hi = t['wilson95']
        lines.append(f'| {t["task"]} | {t["instruction"]} | {t["successes"]}/{t["trials"]} | '
                     f'{t["success_rate"]:.0%} ({lo:.0%}–{hi:.0%}) | {t["mean_steps"]} |')
    (out / 'report.md').write_text('\n'.join(lines) + '\n')


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog='worldvla_libero_eval', description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--suite', required=True, help=f'one of {", ".join(SUITES)}')
    p.add_argument('--tasks', default='', help='comma-separated task indices (default: every task of the suite)')
    p.add_argument('--trials', type=int, default=50, help='initial states per task, from 0 (the release: 50)')
    p.add_argument('--policy', choices=('model', 'expert'), default='model',
                   help='expert: the scripted pick-and-place controller (libero_object), the reference')
    p.add_argument('--checkpoint', default='', help='a WorldVLA checkpoint (e.g. model_256/libero_goal)')
    p.add_argument('--device', default='auto')
    p.add_argument('--dtype', default='auto')
    p.add_argument('--envs', type=int, default=1, help='simulator processes side by side (chunks batched)')
    p.add_argument('--out', default='libero_eval', help='report folder; a run there resumes')
    p.add_argument('--replan', type=int, default=0, help='departure: a new chunk every N steps (0: the release)')
    p.add_argument('--chunk-merge', choices=('replace', 'ensemble'), default='replace')
    p.add_argument('--no-action-mask', action='store_true', help='departure: plain causal attention')
    p.add_argument('--prompt-source', choices=('language', 'name'), default='language',
                   help="name: the task's name with spaces (libero_10's training prompts)")
    p.add_argument('--max-steps', type=int, default=0, help="0: the suite's limit (the release's)")
    p.add_argument('--through-ros', action='store_true',
                   help='run the episodes through the real nodes (action node + libero_sim_node)')
    p.add_argument('--domain-id', type=int, default=None, help='--through-ros: the ROS domain (default: random '
                   '120–230, on this machine only)')
    p.add_argument('--no-progress', action='store_true')
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return run(args)
    except LiberoMissing as exc:
        print(f'worldvla_libero_eval: error: {exc}', file=sys.stderr)
        return 2


def run(args: argparse.Namespace) -> int:
    if args.suite not in SUITES:
        raise LiberoMissing(f'unknown LIBERO suite {args.suite!r}; use one of {", ".join(SUITES)}')
    if args.trials < 1 or args.envs < 1 or args.replan < 0 or args.max_steps < 0:
        raise LiberoMissing('--trials and --envs must be ≥ 1, --replan and --max-steps ≥ 0')
    opts = Options(args.suite, args.replan, args.chunk_merge, not args.no_action_mask, args.prompt_source,
                   args.max_steps)
    chunks: Any = None
    if args.policy == 'expert':
        chunks = ExpertChunks()
        label = 'scripted expert'
    elif args.through_ros:
        if not args.checkpoint:
            raise LiberoMissing('--checkpoint is needed with --policy model')
        label = f'checkpoint {args.checkpoint}'
    else:
        if not args.checkpoint:
            raise LiberoMissing('--checkpoint is needed with --policy model')
        from worldvla_ros.model import CheckpointError, load_policy

        try:
            policy = load_policy(args.checkpoint, args.device, args.dtype)
        except CheckpointError as exc:
            raise LiberoMissing(f'cannot load the checkpoint: {exc}') from exc
        chunks = ModelChunks(policy, opts.action_mask)
        label = f'{policy.model_id}' + ('' if opts.action_mask else ' (no action mask)')
    try:
        tasks = [int(t) for t in args.tasks.split(',')] if args.tasks else None
    except ValueError:
        raise LiberoMissing(f'--tasks {args.tasks!r}: comma-separated task indices') from None
    # the first task's env, which also tells the suite's size: in process it runs that task's episodes
    first = LiberoEnv(args.suite, tasks[0] if tasks else 0)
    try:
        return _run(args, opts, chunks, label, tasks, first)
    finally:
        first.close()  # idempotent: run_jobs closes it once done with it


def _run(args: argparse.Namespace, opts: Options, chunks: Any, label: str, tasks: list[int] | None,
         first: LiberoEnv) -> int:
    n_tasks, n_trials = first.task_count, first.trials
    if isinstance(chunks, ExpertChunks) and not first.has_expert:  # a suite has one for all its tasks, or none
        raise LiberoMissing(f'{args.suite} has no scripted expert (libero_object has one)')
    tasks = tasks if tasks is not None else list(range(n_tasks))
    bad = [t for t in tasks if not 0 <= t < n_tasks]
    if bad:
        raise LiberoMissing(f'{args.suite} has tasks 0 … {n_tasks - 1}, not {bad[0]}')
    if args.trials > n_trials:
        raise LiberoMissing(f'{args.suite} has {n_trials} initial states per task; --trials {args.trials}')
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    settings = {**vars(opts), 'policy': args.policy, 'checkpoint': str(args.checkpoint),
                'through_ros': args.through_ros}
    saved = out / 'run.json'
    if saved.is_file() and json.loads(saved.read_text()) != settings:
        raise LiberoMissing(f'{out} holds a run with other settings ({saved}): give another --out')
    saved.write_text(json.dumps(settings, indent=2))
    done = _done(out, opts)
    jobs = [(t, i) for t in tasks for i in range(args.trials) if (t, i) not in done]
    t0 = time.perf_counter()
    if args.through_ros:
        from .libero_ros import run_through_ros

        first.close()  # the sim node opens its own
        run_through_ros(jobs, opts, args, out, progress=not args.no_progress)
    else:
        run_jobs(jobs, opts, chunks, args.envs, out, progress=not args.no_progress, first_env=first)
    records = [r for (t, i), r in _done(out, opts).items() if t in tasks and i < args.trials]
    summary = summarize(records, opts, time.perf_counter() - t0 if jobs else 0.0)
    write_report(out, summary, label + (' through ROS' if args.through_ros else ''))
    print(f'{summary["successes"]} of {summary["episodes"]} episodes succeeded; report: {out / "report.md"}')
    return 0


def _done(out: Path, opts: Options) -> dict[tuple[int, int], dict[str, Any]]:
    """Episodes already in ``episodes.jsonl`` (a line cut short by a kill is ignored)."""
    path = out / 'episodes.jsonl'
    done: dict[tuple[int, int], dict[str, Any]] = {}
    if path.is_file():
        for line in path.read_text().splitlines():
            try:
                r = json.loads(line)
                done[(int(r['task']), int(r['trial']))] = r
            except (ValueError, KeyError, TypeError):
                continue
    return done


if __name__ == '__main__':
    raise SystemExit(main())
