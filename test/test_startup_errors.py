"""A node that cannot start says why in one FATAL line and exits 1: never a traceback.

Broken checkpoints (as a user's download or a failed save leaves them) and out-of-range start-up
parameters, each through a real action-node process.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.ros


def _edit_config(change: Callable[[dict], object]) -> Callable[[Path], None]:
    def apply(root: Path) -> None:
        cfg = json.loads((root / 'config.json').read_text())
        out = change(cfg)
        (root / 'config.json').write_text(json.dumps(cfg if out is None else out))

    return apply


def _vqgan_with_a_non_tensor(root: Path) -> None:
    path = root / 'tokenizer' / 'vqgan.ckpt'
    ckpt = torch.load(path, weights_only=True)
    state = ckpt.get('state_dict', ckpt)
    state[next(iter(state))] = 3.5
    torch.save(ckpt, path)


BROKEN: dict[str, tuple[Callable[[Path], None], list[str], str]] = {
    # name: (how the checkpoint is broken, extra parameters, what the FATAL line must say)
    'config is a JSON list': (lambda r: (r / 'config.json').write_text('[1, 2, 3]'), [], 'expected an object'),
    'config is not UTF-8': (lambda r: (r / 'config.json').write_bytes(b'{"model_type": "\xff\xfe"}'), [],
                            'not UTF-8'),
    'worldvla value out of range': (_edit_config(lambda c: c['worldvla'].update(chunk_size=500)), [],
                                    'chunk_size must be in 1'),
    'max_instruction_chars beyond the cap': (_edit_config(lambda c: c['worldvla'].update(
        max_instruction_chars=10**6)), [], 'max_instruction_chars must be in 1'),
    'config a 100 MB file': (lambda r: os.truncate(r / 'config.json', 100 * 2**20), [], 'larger than'),
    'index names a file outside': (lambda r: (r / 'model.safetensors.index.json').write_text(json.dumps(
        {'weight_map': {'lm_head.weight': '../../etc/passwd'}})), [], 'shard names must be file names'),
    'worldvla is not an object': (_edit_config(lambda c: c.update(worldvla=[1])), [], 'expected an object'),
    'heads do not divide hidden': (_edit_config(lambda c: c.update(num_attention_heads=3, num_key_value_heads=3)),
                                   [], 'divisible'),
    'non-tensor in vqgan.ckpt': (_vqgan_with_a_non_tensor, [], 'not tensors'),
    'device gpu9': (lambda r: None, ['device:=gpu9'], 'not a torch device'),
    'device cuda:7 without CUDA': (lambda r: None, ['device:=cuda:7'], 'CUDA'),
    'control rate -1 (an integer)': (lambda r: None, ['control_rate_hz:=-1'], 'control_rate_hz'),
    'control rate -1.0': (lambda r: None, ['control_rate_hz:=-1.0'], 'control_rate_hz'),
    'chunk size 99': (lambda r: None, ['chunk_size:=99'], 'chunk_size'),
    'action scale 1e300': (lambda r: None, ['action_scale:=[1.0e300, 0.05, 0.05, 0.5, 0.5, 0.5, 1.0]'],
                           'action_scale'),
    'empty command frame': (lambda r: None, ['command_frame_id:=""'], 'command_frame_id'),
}


def _start(root: Path, extra: list[str]) -> subprocess.CompletedProcess:
    cmd = [sys.executable, '-m', 'worldvla_ros.nodes.action_node', '--ros-args', '-p', f'checkpoint:={root}',
           '-p', 'device:=cpu']
    for p in extra:
        cmd += ['-p', p]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=180)


# Through a real process: one broken checkpoint and each kind of bad parameter (the FATAL line is written
# by one code path for every start-up error); every broken checkpoint through the loader the node calls.
THROUGH_A_PROCESS = ('config is a JSON list', 'device gpu9', 'control rate -1 (an integer)', 'chunk size 99',
                     'action scale 1e300', 'empty command frame')


def test_every_broken_start_is_one_fatal_line(tiny_checkpoint: Path, tmp_path: Path) -> None:
    cases = {}
    for i, name in enumerate(THROUGH_A_PROCESS):
        breaker, extra, _ = BROKEN[name]
        root = tmp_path / f'case{i}'
        shutil.copytree(tiny_checkpoint, root)
        breaker(root)
        cases[name] = (root, extra)
    with ThreadPoolExecutor(max_workers=2) as pool:  # each start imports torch: two at a time on 2 cores
        results = dict(zip(cases, pool.map(lambda c: _start(*c), cases.values()), strict=True))
    problems = []
    for name, proc in results.items():
        out = proc.stdout + proc.stderr
        fatal = [line for line in out.splitlines() if 'FATAL' in line]
        if proc.returncode != 1 or 'Traceback' in out or len(fatal) != 1 or BROKEN[name][2] not in fatal[0]:
            problems.append(f'{name}: exit {proc.returncode}\n{out[-1500:]}')
    assert not problems, '\n\n'.join(problems)


@pytest.mark.parametrize('name', [n for n, (_, extra, _) in BROKEN.items() if not extra])
def test_every_broken_checkpoint_is_a_checkpoint_error(name: str, tiny_checkpoint: Path, tmp_path: Path) -> None:
    """What the node turns into its FATAL line: a CheckpointError saying what is wrong, never another exception."""
    from worldvla_ros.model import load_policy
    from worldvla_ros.model.errors import CheckpointError

    breaker, _, says = BROKEN[name]
    root = tmp_path / 'ckpt'
    shutil.copytree(tiny_checkpoint, root)
    breaker(root)
    with pytest.raises(CheckpointError, match=re.escape(says)):
        load_policy(root, device='cpu')


@pytest.mark.skipif(torch.cuda.is_available(), reason='needs a machine without CUDA')
def test_a_cuda_device_without_cuda_is_a_checkpoint_error(tiny_checkpoint: Path) -> None:
    from worldvla_ros.model import load_policy
    from worldvla_ros.model.errors import CheckpointError

    with pytest.raises(CheckpointError, match='CUDA is not available'):
        load_policy(tiny_checkpoint, device='cuda:7')
