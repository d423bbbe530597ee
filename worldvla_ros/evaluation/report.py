"""The evaluation report: report.json (machine-readable), report.md, and PNG plots."""
from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .scoring import DIMS, RunRecord


def write_report(out_dir: Path, summary: dict[str, Any], runs: Sequence[RunRecord]) -> dict[str, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {'json': out_dir / 'report.json', 'markdown': out_dir / 'report.md'}
    paths.update(_plots(out_dir, runs, summary))
    summary = {**summary, 'files': {k: p.name for k, p in paths.items()}}
    paths['json'].write_text(json.dumps(summary, indent=2, allow_nan=False, default=_plain) + '\n')
    paths['markdown'].write_text(markdown(summary))
    return paths


def _plain(x: Any) -> Any:
    if isinstance(x, np.generic):
        return x.item()
    if isinstance(x, Path):
        return str(x)
    raise TypeError(f'{type(x).__name__} is not JSON serializable')


def _fmt(v: Any, digits: int = 4) -> str:
    if v is None:
        return '–'
    if isinstance(v, float):
        return f'{v:.{digits}g}'
    return str(v)


def markdown(s: dict[str, Any]) -> str:
    a, w, t = s.get('actions', {}), s.get('world_model', {}), s.get('timing', {})
    lines = [
        f'# WorldVLA bag evaluation — {s["mode"]} mode',
        '',
        f'- model: `{s["model_id"]}` on {s["device"]}; K = {s["chunk_size"]}, {s["history_frames"]} history frames',
        f'- bags: {", ".join(f"`{b}`" for b in s["bags"])}; {s["frames"]} frames; '
        f'ground truth from {", ".join(sorted(set(s["action_sources"])))}',
        f'- actions compared: {a.get("actions_compared", 0)}; gripper accuracy: {_fmt(a.get("gripper_accuracy"))}; '
        f'direction agreement Δx/Δy/Δz: {"/".join(_fmt(v) for v in (a.get("direction_agreement") or {}).values())}'
        + (f' (over the clear moves: {a["direction_clear_move"]}; "–" where the bags hold none)'
           if a.get('direction_clear_move') else ''),
    ]
    if s.get('control_rate_hz'):
        lines.append(f'- control period: {1e3 / s["control_rate_hz"]:.1f} ms ({s["control_rate_hz"]:g} Hz), from '
                     f'{s.get("control_rate_source") or "the configuration"}')
    lines += [f'- recorded actions converted: {c}' for c in s.get('action_conversion', [])] + ['']
    phys = a.get('physical')
    if phys:
        lines += _physical_lines(phys)
    if a.get('l1'):
        lines += ['## Actions (units of the action, as the model emits them)', '', '| | ' + ' | '.join(DIMS) + ' |',
                  '|---' * (len(DIMS) + 1) + '|']
        for key, label in (('l1', 'L1'), ('rmse', 'RMSE'), ('step_at_seams', 'mean step at chunk seams'),
                           ('step_within_chunks', 'mean step within chunks'),
                           ('recorded_step_at_seams', 'recorded step at seams')):
            if a.get(key):
                lines.append(f'| {label} | ' + ' | '.join(_fmt(a[key][d]) for d in DIMS) + ' |')
        lines += ['', 'Step = abs(a[n] − a[n−1]) between consecutive commands; at a seam the first action of a '
                  'chunk follows the last executed action of the previous one.', '',
                  '### Error by position in the chunk', '', '| position | n | mean L1 |', '|---|---|---|']
        lines += [f'| {p["position"]} | {p["n"]} | {_fmt(p["l1_mean"])} |' for p in a.get('l1_by_chunk_position', [])]
        lines.append('')
    if w.get('by_horizon_step'):
        lines += ['## World model (imagined vs recorded frames)', '',
                  '| horizon step | n | PSNR dB | SSIM | observed frame repeated: PSNR dB | SSIM |',
                  '|---|---|---|---|---|---|']
        lines += [f'| {r["step"]} | {r["n"]} | {_fmt(r["psnr_db"])} | {_fmt(r["ssim"])} '
                  f'| {_fmt(r.get("copy_baseline_psnr_db"))} | {_fmt(r.get("copy_baseline_ssim"))} |'
                  for r in w['by_horizon_step']]
        lines.append('')
    if t:
        inf, e2e = t.get('inference_ms', {}), t.get('end_to_end_ms') or {}
        lines += ['## Timing', '', '| | p50 | p95 | p99 |', '|---|---|---|---|',
                  f'| inference ms | {_fmt(inf.get("p50"))} | {_fmt(inf.get("p95"))} | {_fmt(inf.get("p99"))} |']
        if e2e:
            lines.append(f'| frame → chunk ms | {_fmt(e2e.get("p50"))} | {_fmt(e2e.get("p95"))} '
                         f'| {_fmt(e2e.get("p99"))} |')
        lines += ['', f'Deadline ({t.get("deadline")}): {t.get("deadline_misses", 0)} of {t.get("chunks", 0)} '
                  'chunks missed it.', '']
        counts = {k: v for k, v in t.items() if isinstance(v, int) and k not in ('chunks', 'deadline_misses')}
        if counts:
            lines += ['| count | value |', '|---|---|'] + [f'| {k} | {v} |' for k, v in sorted(counts.items())] + ['']
    lines += _merge_lines(s.get('chunk_merge'))
    plots = [v for k, v in s.get('files', {}).items() if v.endswith('.png')]
    if plots:
        lines += ['## Plots', '']
        if len(s.get('bags', [])) > MAX_TRACE_PLOTS:
            lines += [f'Action traces of the first {MAX_TRACE_PLOTS} bags.', '']
        lines += [f'![{p}]({p})' for p in plots] + ['']
    return '\n'.join(lines)


def _physical_lines(phys: dict[str, Any]) -> list[str]:
    units, jerk_units = phys['units'], phys['jerk_units']
    scale = ', '.join(f'{d} {v:g} {units[d]}'.rstrip() for d, v in zip(DIMS, phys['action_scale'], strict=True))
    rule = '|---' * (len(DIMS) + 1) + '|'
    lines = ['## Actions in physical units', '',
             f'Per action unit: {scale}. Errors per control step; jerk from the second difference of '
             'consecutive commands at the control rate.', '',
             '| | ' + ' | '.join(f'{d} ({units[d] or "–"})' for d in DIMS) + ' |', rule]
    for key, label in (('l1', 'L1'), ('rmse', 'RMSE')):
        lines.append(f'| {label} | ' + ' | '.join(_fmt(phys[key][d]) for d in DIMS) + ' |')
    jerk = [(key, label) for key, label in (
        ('jerk_at_seams', f'across chunk seams ({phys["seam_windows"]} windows)'),
        ('jerk_within_chunks', 'within chunks'), ('recorded_jerk_at_seams', 'recorded, at seams')) if phys.get(key)]
    if jerk:  # none when no three consecutive frames were executed
        lines += ['', '| jerk | ' + ' | '.join(f'{d} ({jerk_units[d] or "–"})' for d in DIMS) + ' |', rule]
        lines += [f'| {label} | ' + ' | '.join(_fmt(phys[key][d]) for d in DIMS) + ' |' for key, label in jerk]
    return [*lines, '']


def _merge_lines(merge: dict[str, Any] | None) -> list[str]:
    """Jerk (translation and rotation, mean over axes) for every chunk merge, on the same chunks."""
    if not merge or not any((v or {}).get('jerk_at_seams') for v in merge['by_choice'].values()):
        return []
    lines = ['## Chunk merge', '', f"Used: **{merge['used']}** (ensemble decay {merge['ensemble_decay']:g}). The "
             'same chunks executed with each choice; mean |jerk| over x, y, z (m/s³) and roll, pitch, yaw (rad/s³).',
             '', '| merge | at seams, xyz | at seams, rpy | within chunks, xyz | within chunks, rpy | seam windows |',
             '|---|---|---|---|---|---|']

    def mean(per_dim: dict[str, float | None] | None, dims: tuple[str, ...]) -> str:
        values = [per_dim[d] for d in dims if per_dim and per_dim.get(d) is not None]
        return _fmt(float(np.mean(values))) if values else '–'

    for name, v in merge['by_choice'].items():
        lines.append(f"| {name} | {mean(v['jerk_at_seams'], DIMS[:3])} | {mean(v['jerk_at_seams'], DIMS[3:6])} | "
                     f"{mean(v['jerk_within_chunks'], DIMS[:3])} | {mean(v['jerk_within_chunks'], DIMS[3:6])} | "
                     f"{v.get('seam_windows') or 0} |")
    return [*lines, '']


MAX_TRACE_PLOTS = 12
GRIPPER_LABEL = 'gripper\n(-1 open, +1 closed)'


def _units(summary: dict[str, Any]) -> tuple[np.ndarray, list[str]]:
    """Per-dimension factor and unit label of the plots: metres and radians when the scale is known."""
    phys = (summary.get('actions') or {}).get('physical')
    if not phys:
        return np.ones(len(DIMS)), ['action units'] * (len(DIMS) - 1) + ['']
    return np.asarray(phys['action_scale'], dtype=np.float64), [phys['units'][d] for d in DIMS]


def _plots(out_dir: Path, runs: Sequence[RunRecord], summary: dict[str, Any]) -> dict[str, Path]:
    import matplotlib

    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    paths: dict[str, Path] = {}
    scale, units = _units(summary)
    rate = float(summary.get('control_rate_hz') or 10.0)
    traced = [r for r in runs if r.executed]
    for run in traced[:MAX_TRACE_PLOTS]:
        t = run.times_s if run.times_s is not None and len(run.times_s) == len(run.gt) else (
            np.arange(len(run.gt)) / rate)
        idx = np.array([e.gt_index for e in run.executed])
        keep = idx < len(t)
        pred = np.array([e.action for e in run.executed])[keep] * scale
        idx = idx[keep]
        seams = idx[[e.seam for e, k in zip(run.executed, keep, strict=True) if k]]
        fig, axes = plt.subplots(7, 1, figsize=(10, 12), sharex=True)
        for d, ax in enumerate(axes):
            ax.plot(t, run.gt[:, d] * scale[d], color='0.3', label='recorded')
            ax.plot(t[idx], pred[:, d], '.-', color='tab:blue', ms=3, label='policy')
            for s_ in t[seams]:
                ax.axvline(s_, color='tab:orange', lw=0.5, alpha=0.5)
            ax.set_ylabel(GRIPPER_LABEL if d == len(DIMS) - 1 else f'{DIMS[d]}\n({units[d]} per step)', fontsize=8)
        axes[0].legend(loc='upper right', fontsize=8)
        axes[0].set_title(f'{run.episode}: commanded actions, policy vs recorded (orange: chunk seams)')
        axes[-1].set_xlabel('time since the first frame (s)')
        key = 'action_traces' if len(traced) == 1 else f'action_traces_{_safe(run.episode)}'
        paths[key] = _save(fig, out_dir / f'{key}.png')

    errors = [(e.action - r.gt[e.gt_index]) for r in runs for e in r.executed if e.gt_index < len(r.gt)]
    if errors:
        err = np.asarray(errors) * scale
        fig, axes = plt.subplots(1, 7, figsize=(18, 3.4))
        for d, ax in enumerate(axes):
            col = err[:, d][~np.isnan(err[:, d])]
            if len(col):
                ax.hist(col, bins=30, color='tab:blue')
            ax.set_title(DIMS[d], fontsize=9)
            ax.set_xlabel(f'policy − recorded ({units[d] or "-1 … +1"})', fontsize=8)
            ax.xaxis.set_major_locator(MaxNLocator(nbins=3))
            ax.tick_params(labelsize=7)
        axes[0].set_ylabel('commands')
        fig.suptitle('Error per dimension: policy − recorded (positive: the policy commanded more)', fontsize=10)
        paths['error_histograms'] = _save(fig, out_dir / 'error_histograms.png')

    strip = [(r, s) for r in runs for s in r.strip]
    if strip:
        turn = bool(summary.get('rotate_180'))  # LIBERO renders upside down; show what the model sees, upright
        fig, axes = plt.subplots(2, len(strip), figsize=(2.2 * len(strip), 4.8), squeeze=False)
        for j, (run, (frame, real, imagined)) in enumerate(strip):
            when = run.times_s[frame] if run.times_s is not None and frame < len(run.times_s) else frame / rate
            axes[0, j].imshow(real[::-1, ::-1] if turn else real)
            axes[0, j].set_title(f'{run.episode[:18]}\nt = {when:.2f} s', fontsize=7)
            axes[1, j].imshow(imagined[::-1, ::-1] if turn else imagined)
            for ax in axes[:, j]:
                ax.axis('off')
        axes[0, 0].text(-0.1, 0.5, 'recorded', transform=axes[0, 0].transAxes, rotation=90, va='center', ha='right')
        axes[1, 0].text(-0.1, 0.5, 'imagined', transform=axes[1, 0].transAxes, rotation=90, va='center', ha='right')
        if turn:
            fig.suptitle('turned 180°, as the model sees the frames', fontsize=8)
        paths['world_model_strip'] = _save(fig, out_dir / 'world_model_strip.png')
    return paths


def _safe(name: str) -> str:
    return ''.join(c if c.isalnum() or c in '-_.' else '_' for c in name)[:80]


def _save(fig: Any, path: Path) -> Path:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path
