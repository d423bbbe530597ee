"""LIBERO as a simulated robot: the release's protocol by hand, the real simulator (MuJoCo rendering on the CPU)
in LIBERO's own interpreter, the sim node in a real ROS graph, and the evaluation in process and through ROS."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import types
from pathlib import Path

import numpy as np
import pytest
from conftest import pick_domain

from worldvla_ros.model.action_tokenizer import ActionTokenizer
from worldvla_ros.model.config import ACTION_PROMPT
from worldvla_ros.sim.libero import LiberoEnv, LiberoMissing, libero_python, model_view
from worldvla_ros.sim.libero_eval import main as libero_eval
from worldvla_ros.sim.libero_eval import prompt_text

try:
    libero_python()
    HAVE_LIBERO = True
except LiberoMissing:
    HAVE_LIBERO = False
needs_libero = pytest.mark.skipif(not HAVE_LIBERO, reason='LIBERO not installed: scripts/install.sh --libero')
RENDER = {'MUJOCO_GL': os.environ.get('MUJOCO_GL', 'egl'), 'PYOPENGL_PLATFORM': os.environ.get('PYOPENGL_PLATFORM',
                                                                                               'egl')}


# -- the release's protocol, by hand ------------------------------------------------------------------------
def test_the_model_sees_the_render_turned_by_180_degrees() -> None:
    raw = np.arange(4 * 5 * 3, dtype=np.uint8).reshape(4, 5, 3)
    view = model_view(raw)
    assert view[0, 0].tolist() == raw[3, 4].tolist() and view[3, 4].tolist() == raw[0, 0].tolist()
    np.testing.assert_array_equal(view, raw[::-1, ::-1])


def test_actions_are_unnormalised_as_the_release_does() -> None:
    """(a + 1) / 2 · (max − min + 1e-8) + min, max = [0.9375]·3 + [0.375]·3 + [1], min its negative but −0.32571429
    for the 4th; values worked out by hand."""
    x = np.array([-1.0, 0.0, 1.0, 0.0, 0.5, -0.5, 1.0])
    expected = [-0.9375, 0.000000005, 0.93750001, 0.02464286, 0.1875000075, -0.1874999975, 1.00000001]
    np.testing.assert_allclose(ActionTokenizer().unnormalize(x), expected, rtol=0, atol=1e-9)


def test_the_prompt_is_the_release_string() -> None:
    env = types.SimpleNamespace(language='put the bowl on the plate',
                                name='LIVING_ROOM_SCENE2_put_the_bowl_on_the_plate')
    assert ACTION_PROMPT.format(instruction=prompt_text(env, 'language')) == \
        'What action should the robot take to put the bowl on the plate?'
    assert prompt_text(env, 'name') == 'LIVING ROOM SCENE2 put the bowl on the plate'  # libero_10's training text


def test_the_sim_nodes_queues_are_bounded_and_drop_the_oldest() -> None:
    """A flood of commands (another publisher on worldvla/ee_command) cannot grow the LIBERO sim node's queue: the
    oldest go first, counted."""
    import queue
    import types

    from worldvla_ros.nodes.common import Stats
    from worldvla_ros.nodes.libero_sim_node import MAX_QUEUED, LiberoSimNode

    node = types.SimpleNamespace(stats=Stats())
    q: queue.Queue = queue.Queue(maxsize=MAX_QUEUED)
    for i in range(MAX_QUEUED + 500):
        LiberoSimNode._put(node, q, i, 'commands_dropped')
    assert q.qsize() == MAX_QUEUED and q.get_nowait() == 500
    assert int(node.stats.snapshot()['commands_dropped']) == 500


def test_bad_input_is_one_line_and_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    assert libero_eval(['--suite', 'libero_nothing', '--policy', 'expert', '--out', str(tmp_path / 'a')]) == 2
    assert 'unknown LIBERO suite' in capsys.readouterr().err
    monkeypatch.setenv('WORLDVLA_LIBERO_PYTHON', str(tmp_path / 'no-python'))
    assert libero_eval(['--suite', 'libero_object', '--policy', 'expert', '--out', str(tmp_path / 'b')]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and 'scripts/install.sh --libero' in err[0]
    assert libero_eval(['--suite', 'libero_object', '--checkpoint', str(tmp_path), '--out', str(tmp_path / 'c')]) == 2
    assert 'cannot load the checkpoint' in capsys.readouterr().err


# -- the real simulator --------------------------------------------------------------------------------------
@needs_libero
@pytest.mark.libero
def test_unknown_tasks_and_suites_without_an_expert_are_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    for k, v in RENDER.items():
        monkeypatch.setenv(k, v)
    assert libero_eval(['--suite', 'libero_object', '--policy', 'expert', '--tasks', '10', '--out',
                        str(tmp_path / 'a'), '--no-progress']) == 2
    assert 'has tasks 0 … 9, not 10' in capsys.readouterr().err
    assert libero_eval(['--suite', 'libero_goal', '--policy', 'expert', '--trials', '1', '--tasks', '0', '--out',
                        str(tmp_path / 'b'), '--no-progress']) == 2
    assert 'no scripted expert' in capsys.readouterr().err


@needs_libero
@pytest.mark.libero
@pytest.mark.ros
@pytest.mark.timeout(900)
def test_the_scripted_expert_solves_a_task_through_the_ros_graph(tmp_path: Path) -> None:
    """The LIBERO sim node, its expert's commands relayed onto worldvla/ee_command by a plain rclpy node: one
    of two initial states of "pick up the cream cheese …" solved, the episode ending at success. The first
    frame on camera/image_raw is the release's view (the render turned by 180°) after the ten wait steps."""
    import rclpy
    from rclpy.executors import SingleThreadedExecutor
    from sensor_msgs.msg import Image
    from std_msgs.msg import String
    from worldvla.msg import EndEffectorCommand

    from worldvla_ros.image_conversion import image_msg_to_rgb
    from worldvla_ros.nodes.common import image_qos, reliable_qos

    domain = pick_domain(120, 230)
    env = {**os.environ, **RENDER, 'ROS_DOMAIN_ID': str(domain), 'ROS_AUTOMATIC_DISCOVERY_RANGE': 'LOCALHOST'}
    sim = subprocess.Popen([sys.executable, '-m', 'worldvla_ros.nodes.libero_sim_node', '--ros-args',
                            '-p', 'suite:=libero_object', '-p', 'task:=1', '-p', 'goal_action:=""',
                            '-p', 'publish_expert:=true', '-p', 'episodes:=2', '-p', 'first_trial:=0'], env=env)
    context = rclpy.Context()
    rclpy.init(context=context, domain_id=domain)
    node = rclpy.create_node('expert_relay', context=context)
    commands = node.create_publisher(EndEffectorCommand, 'worldvla/ee_command', reliable_qos(100))
    results: list[dict] = []
    frames: list[np.ndarray] = []
    node.create_subscription(EndEffectorCommand, 'sim/expert_command', commands.publish, reliable_qos(10))
    node.create_subscription(String, 'sim/episode_result', lambda m: results.append(json.loads(m.data)),
                             reliable_qos(10))
    node.create_subscription(Image, 'camera/image_raw',
                             lambda m: frames.append(np.array(image_msg_to_rgb(m))) if not frames else None,
                             image_qos(5))
    executor = SingleThreadedExecutor(context=context)
    executor.add_node(node)
    deadline = time.monotonic() + 800
    try:
        while not any(r['success'] for r in results) and len(results) < 2 and time.monotonic() < deadline:
            assert sim.poll() is None, 'the sim node exited'
            executor.spin_once(timeout_sec=0.1)
    finally:
        sim.send_signal(2)
        sim.wait(30)
        executor.shutdown()
        node.destroy_node()
        rclpy.shutdown(context=context)
    won = [r for r in results if r['success']]
    assert won, results
    assert won[0]['steps'] < 280 and won[0]['holds'] == 0  # it ended at success, before the suite's limit
    with LiberoEnv('libero_object', 1) as local:
        settled, unsettled = local.reset(0), local.reset(0, wait_steps=0)  # the sim node's first episode
    first = frames[0]
    np.testing.assert_array_equal(first, model_view(settled.image))  # the release's frame, pixel for pixel
    assert not np.array_equal(first, model_view(unsettled.image))  # after the wait steps, not before


@needs_libero
@pytest.mark.libero
@pytest.mark.ros
@pytest.mark.timeout(900)
def test_the_evaluation_in_process_and_through_ros_execute_the_same_actions(tmp_path: Path) -> None:
    """The tiny checkpoint, greedy, by the release's protocol, to a step limit: the in-process run and the run
    through the real action node and LIBERO sim node execute the same actions (digest to 1e-5); reports written."""
    import torch

    from worldvla_ros.model import make_tiny_checkpoint

    ckpt = make_tiny_checkpoint(tmp_path / 'tiny')
    os.environ.update(RENDER)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the node (cpu_threads 1): the same reductions in both runs
    common = ['--suite', 'libero_object', '--checkpoint', str(ckpt), '--device', 'cpu', '--tasks', '0',
              '--trials', '1', '--max-steps', '12', '--no-progress']
    try:
        assert libero_eval([*common, '--out', str(tmp_path / 'local')]) == 0
    finally:
        torch.set_num_threads(threads)
    assert libero_eval([*common, '--out', str(tmp_path / 'ros'), '--through-ros',
                        '--domain-id', str(pick_domain(120, 230))]) == 0
    local = [json.loads(x) for x in (tmp_path / 'local' / 'episodes.jsonl').read_text().splitlines()]
    ros = [json.loads(x) for x in (tmp_path / 'ros' / 'episodes.jsonl').read_text().splitlines()]
    assert len(local) == len(ros) == 1
    assert local[0]['steps'] == ros[0]['steps'] == 12 and ros[0]['holds'] == 0
    assert local[0]['actions_sha'] == ros[0]['actions_sha']
    report = json.loads((tmp_path / 'local' / 'report.json').read_text())
    assert report['episodes'] == 1 and report['per_task'][0]['trials'] == 1
    assert (tmp_path / 'local' / 'episodes' / 'task00_trial00.png').is_file()
    # resumable: a second run of the same settings runs nothing and reports the same
    assert libero_eval([*common, '--out', str(tmp_path / 'local')]) == 0
    assert len((tmp_path / 'local' / 'episodes.jsonl').read_text().splitlines()) == 1


@needs_libero
@pytest.mark.libero
@pytest.mark.timeout(600)
def test_expert_demonstrations_are_bags_the_evaluation_and_fine_tuning_read(tmp_path: Path,
                                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    from worldvla_ros.evaluation.episode import TopicMap, read_episode
    from worldvla_ros.model.action_tokenizer import LIBERO_ACTION_MAX, LIBERO_ACTION_MIN
    from worldvla_ros.sim.record import main as record_demos

    for k, v in RENDER.items():
        monkeypatch.setenv(k, v)
    assert record_demos([str(tmp_path), '--env', 'libero', '--suite', 'libero_object', '--tasks', '2',
                         '--trials', '1', '--no-progress']) == 0
    (bag,) = tmp_path.iterdir()
    assert bag.name == 'libero_object_task02_trial00'
    episode = read_episode(bag, TopicMap(), frame_size=256)
    assert episode.instruction == 'pick up the salad dressing and place it in the basket'
    assert 50 < len(episode.frames) == len(episode.actions) < 280  # a successful episode, one action per frame
    assert np.all(episode.actions >= np.array(LIBERO_ACTION_MIN) - 1e-9)
    assert np.all(episode.actions <= np.array(LIBERO_ACTION_MAX) + 1e-9)
    assert np.isclose(np.median(np.diff(episode.times_s)), 0.05)  # LIBERO's 20 Hz
    with LiberoEnv('libero_object', 2) as env:
        np.testing.assert_array_equal(episode.frames[0], env.reset(0).image)  # the render as LIBERO draws it
