"""One LIBERO environment in a process of its own, run by LIBERO's interpreter (``.venv-libero``): MuJoCo,
robosuite and their OpenCV stay out of the ROS/torch process, a crash ends one episode, and closing the
process returns all of the memory an env takes. Imports numpy, LIBERO and the standard library only.

    <libero python> libero_server.py FD      (FD: a socket the parent passed, multiprocessing's Connection)

Requests are dicts with ``op``: ``open`` (suite, task, resolution, wrist), ``reset`` (trial, wait_steps),
``step`` (action), ``expert`` (the scripted policy's next action, where the suite has one), ``close``.
Every answer is a dict; a failure is ``{'error': 'one line'}``.
"""
from __future__ import annotations

import os
import sys
import traceback
from multiprocessing.connection import Connection
from typing import Any

import numpy as np

DUMMY_ACTION = [0.0, 0.0, 0.0, 0.0, 0.0, 0.0, -1.0]  # the release's wait steps: no motion, gripper open


class Server:
    def __init__(self) -> None:
        self.env: Any = None
        self.task: Any = None
        self.init_states: Any = None
        self.obs: dict[str, Any] = {}
        self.wrist = False
        self.expert: Any = None

    def open(self, suite: str, task: int, resolution: int = 256, wrist: bool = False) -> dict[str, Any]:
        from libero.libero import benchmark, get_libero_path
        from libero.libero.envs import OffScreenRenderEnv

        suites = benchmark.get_benchmark_dict()
        if suite not in suites:
            return {'error': f'unknown LIBERO suite {suite!r}; known: {", ".join(sorted(suites))}'}
        s = suites[suite]()
        if not 0 <= task < s.n_tasks:
            return {'error': f'{suite} has tasks 0 … {s.n_tasks - 1}, not {task}'}
        self.task = s.get_task(task)
        bddl = os.path.join(get_libero_path('bddl_files'), self.task.problem_folder, self.task.bddl_file)
        if not os.path.isfile(bddl):
            return {'error': f'{suite} task {task}: its BDDL file {bddl} is not installed'}
        try:
            self.init_states = s.get_task_init_states(task)
        except (OSError, FileNotFoundError) as exc:
            return {'error': f'{suite} task {task}: its initial states are not installed ({exc})'}
        # the wrist camera only when asked for: rendering it doubles a step's cost, and the agentview frame, the
        # physics and success are the same without it
        cameras = ['agentview', 'robot0_eye_in_hand'] if wrist else ['agentview']
        self.env = OffScreenRenderEnv(bddl_file_name=bddl, camera_heights=resolution, camera_widths=resolution,
                                      camera_names=cameras)
        self.env.seed(0)  # the release: the seed moves objects even from a fixed initial state
        self.wrist = wrist
        self.expert = PickPlaceExpert.for_task(self.env, suite)
        return {'language': self.task.language, 'name': self.task.name, 'trials': len(self.init_states),
                'tasks': s.n_tasks,
                'expert': self.expert is not None}

    def reset(self, trial: int, wait_steps: int = 10) -> dict[str, Any]:
        self.env.reset()
        self.obs = self.env.set_init_state(self.init_states[trial % len(self.init_states)])
        done = False
        for _ in range(wait_steps):  # objects settle; the model is not asked (the release's protocol)
            self.obs, _, done, _ = self.env.step(DUMMY_ACTION)
        if self.expert is not None:
            self.expert.reset()
        return self._answer(done)

    def step(self, action: list[float]) -> dict[str, Any]:
        self.obs, _, done, _ = self.env.step([float(a) for a in action])
        return self._answer(bool(done))

    def expert_action(self) -> dict[str, Any]:
        if self.expert is None:
            return {'error': 'no scripted expert for this suite (libero_object has one)'}
        return {'action': self.expert.act(self.obs)}

    def _answer(self, done: bool) -> dict[str, Any]:
        out = {'image': np.ascontiguousarray(self.obs['agentview_image']), 'done': bool(done),
               'eef_pos': np.asarray(self.obs['robot0_eef_pos'], dtype=np.float64)}
        if self.wrist:
            out['wrist'] = np.ascontiguousarray(self.obs['robot0_eye_in_hand_image'])
        return out

    def close(self) -> None:
        if self.env is not None:
            self.env.close()
            self.env = None


class PickPlaceExpert:
    """Scripted pick-and-place for libero_object ("pick up the X and place it in the basket"), from the
    simulator's state: above the object, gripper across its narrow side, down to its centre (at most 4.5 cm
    below its top), close, lift, over the basket, lower, open; a miss (gripper closed on nothing) grasps again.
    Actions in OSC_POSE units (0.05 m per unit of position)."""

    CLEAR = 0.25  # m above the table top to carry at

    def __init__(self, env: Any, obj: str, target: str) -> None:
        self.env, self.obj, self.target = env, obj, target
        self.reset()

    @classmethod
    def for_task(cls, env: Any, suite: str) -> PickPlaceExpert | None:
        if suite != 'libero_object':
            return None
        inner = env.env
        names = list(getattr(inner, 'obj_of_interest', []))
        if len(names) < 2:
            return None
        return cls(env, names[0], names[1])

    def reset(self) -> None:
        self.phase = 'above'
        self.count = 0
        self.yaw: float | None = None

    def _pos(self, obs: dict[str, Any], name: str) -> np.ndarray:
        key = f'{name}_pos'
        if key in obs:
            return np.asarray(obs[key], dtype=np.float64)
        inner = self.env.env
        return np.asarray(inner.sim.data.body_xpos[inner.obj_body_id[name]], dtype=np.float64)

    def _extent(self, name: str) -> tuple[float, float, float]:
        """(top above the body origin, narrow-side yaw, half-height) from the object's collision geoms."""
        inner = self.env.env
        model, data = inner.sim.model, inner.sim.data
        body = inner.obj_body_id[name]
        tops, pts = [], []
        for g in range(model.ngeom):
            b = model.geom_bodyid[g]
            while b != 0 and b != body:
                b = model.body_parentid[b]
            if b != body or (model.geom_contype[g] == 0 and model.geom_conaffinity[g] == 0):
                continue
            centre = data.geom_xpos[g]
            r = model.geom_rbound[g]
            tops.append(centre[2] + min(r, 0.06))
            pts.append(centre[:2])
        origin = data.body_xpos[body]
        top = (max(tops) - origin[2]) if tops else 0.04
        xmat = data.body_xmat[body].reshape(3, 3)
        yaw = float(np.arctan2(xmat[1, 0], xmat[0, 0]))
        return top, yaw, top

    def act(self, obs: dict[str, Any]) -> list[float]:
        eef = np.asarray(obs['robot0_eef_pos'], dtype=np.float64)
        obj = self._pos(obs, self.obj)
        goal = self._pos(obs, self.target)
        grip_width = float(np.sum(np.abs(obs['robot0_gripper_qpos'])))
        top, _, _ = self._extent(self.obj)
        grasp_z = obj[2] + max(top - 0.045, 0.0)
        self.count += 1
        gripper = -1.0
        if self.phase == 'above':
            target = np.array([obj[0], obj[1], max(grasp_z + 0.10, eef[2])])
            if np.linalg.norm((target - eef)[:2]) < 0.01:
                self.phase, self.count = 'down', 0
        elif self.phase == 'down':
            target = np.array([obj[0], obj[1], grasp_z])
            if abs(eef[2] - grasp_z) < 0.01 or self.count > 40:
                self.phase, self.count = 'close', 0
        elif self.phase == 'close':
            target, gripper = eef.copy(), 1.0
            if self.count > 12:
                self.phase, self.count = 'lift', 0
        elif self.phase == 'lift':
            target, gripper = np.array([eef[0], eef[1], goal[2] + self.CLEAR]), 1.0
            if grip_width < 0.002:  # closed on nothing: try again
                self.phase, self.count = 'above', 0
            elif eef[2] > goal[2] + self.CLEAR - 0.02:
                self.phase, self.count = 'carry', 0
        elif self.phase == 'carry':
            target, gripper = np.array([goal[0], goal[1], goal[2] + self.CLEAR]), 1.0
            if np.linalg.norm((target - eef)[:2]) < 0.015:
                self.phase, self.count = 'lower', 0
        elif self.phase == 'lower':
            target, gripper = np.array([goal[0], goal[1], goal[2] + 0.12]), 1.0
            if eef[2] < goal[2] + 0.13 or self.count > 30:
                self.phase, self.count = 'open', 0
        else:  # open, then wait; lift away if the episode goes on
            target = eef.copy() if self.count < 15 else np.array([eef[0], eef[1], goal[2] + self.CLEAR])
            if self.count > 40:
                self.phase, self.count = 'above', 0
        # proportional, in OSC units, within the release's action ranges (what its tokenizer can say)
        delta = np.clip((target - eef) / 0.05 * 2.0, -0.9375, 0.9375)
        return [float(delta[0]), float(delta[1]), float(delta[2]), 0.0, 0.0, 0.0, gripper]


def serve(conn: Connection) -> None:
    server = Server()
    ops = {'open': server.open, 'reset': server.reset, 'step': server.step}
    while True:
        try:
            request = conn.recv()
        except EOFError:
            break
        op = request.pop('op', '')
        if op == 'close':
            server.close()
            conn.send({})
            break
        try:
            answer = server.expert_action() if op == 'expert' else ops[op](**request)
        except Exception as exc:  # any simulator failure ends the episode, not the server
            traceback.print_exc(file=sys.stderr)
            answer = {'error': f'{type(exc).__name__}: {exc}'.splitlines()[0][:300]}
        conn.send(answer)


if __name__ == '__main__':
    sys.path.pop(0)  # this file's folder: its libero.py is not LIBERO
    serve(Connection(int(sys.argv[1])))
