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
    paths.update(_plots(out_dir, runs))
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
        f'direction agreement Δx/Δy/Δz: {"/".join(_fmt(v) for v in (a.get("direction_agreement") or {}).values())}',
        '',
    ]
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
    plots = [v for k, v in s.get('files', {}).items() if v.endswith('.png')]
    if plots:
        lines += ['## Plots', ''] + [f'![{p}]({p})' for p in plots] + ['']
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
    lines += ['', '| jerk | ' + ' | '.join(f'{d} ({jerk_units[d] or "–"})' for d in DIMS) + ' |', rule]
    for key, label in (('jerk_at_seams', f'across chunk seams ({phys["seam_windows"]} windows)'),
                       ('jerk_within_chunks', 'within chunks'), ('recorded_jerk_at_seams', 'recorded, at seams')):
        if phys.get(key):
            lines.append(f'| {label} | ' + ' | '.join(_fmt(phys[key][d]) for d in DIMS) + ' |')
    return [*lines, '']


def _plots(out_dir: Path, runs: Sequence[RunRecord]) -> dict[str, Path]:
    import matplotlib

    matplotlib.use('Agg')
    import matplotlib.pyplot as plt

    paths: dict[str, Path] = {}
    run = next((r for r in runs if r.executed), None)
    if run is not None:
        idx = np.array([e.gt_index for e in run.executed])
        pred = np.array([e.action for e in run.executed])
        seams = idx[[e.seam for e in run.executed]]
        fig, axes = plt.subplots(7, 1, figsize=(10, 12), sharex=True)
        for d, ax in enumerate(axes):
            ax.plot(np.arange(len(run.gt)), run.gt[:, d], color='0.3', label='recorded')
            ax.plot(idx, pred[:, d], '.-', color='tab:blue', ms=3, label='policy')
            for s in seams:
                ax.axvline(s, color='tab:orange', lw=0.5, alpha=0.5)
            ax.set_ylabel(DIMS[d])
        axes[0].legend(loc='upper right', fontsize=8)
        axes[0].set_title(f'{run.episode}: actions, policy vs recorded (orange: chunk seams)')
        axes[-1].set_xlabel('frame')
        paths['action_traces'] = _save(fig, out_dir / 'action_traces.png')

    errors = [e.action - r.gt[e.gt_index] for r in runs for e in r.executed if e.gt_index < len(r.gt)]
    if errors:
        err = np.asarray(errors)
        fig, axes = plt.subplots(1, 7, figsize=(16, 2.8))
        for d, ax in enumerate(axes):
            col = err[:, d][~np.isnan(err[:, d])]
            if len(col):
                ax.hist(col, bins=30, color='tab:blue')
            ax.set_title(f'{DIMS[d]} error', fontsize=9)
        paths['error_histograms'] = _save(fig, out_dir / 'error_histograms.png')

    strip = [s for r in runs for s in r.strip]
    if strip:
        fig, axes = plt.subplots(2, len(strip), figsize=(2.2 * len(strip), 4.6), squeeze=False)
        for j, (frame, real, imagined) in enumerate(strip):
            axes[0, j].imshow(real)
            axes[0, j].set_title(f'frame {frame}', fontsize=8)
            axes[1, j].imshow(imagined)
            for ax in axes[:, j]:
                ax.axis('off')
        axes[0, 0].text(-0.1, 0.5, 'recorded', transform=axes[0, 0].transAxes, rotation=90, va='center', ha='right')
        axes[1, 0].text(-0.1, 0.5, 'imagined', transform=axes[1, 0].transAxes, rotation=90, va='center', ha='right')
        paths['world_model_strip'] = _save(fig, out_dir / 'world_model_strip.png')
    return paths


def _save(fig: Any, path: Path) -> Path:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path
