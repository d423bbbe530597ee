"""The bundled tabletop model: closed-loop success and what it has learned above chance, and the sim
as a ROS robot.

Margins come from the measurements in docs/embedded-default.md: open loop on 10 held-out episodes (seeds 100000…),
tested on 6 others (seeds 100500…); closed loop on 750 held-out layouts, tested on 100 of them (100500–100599).
"""
from __future__ import annotations

import json

import pytest
from harness import SpinningSafeActionClient, wait_until
from std_msgs.msg import Bool, String

from worldvla_ros.bringup import default_config, sim_config, start_nodes, stop_nodes
from worldvla_ros.nodes.common import reliable_qos, watch_diagnostics
from worldvla_ros.sim.baselines import majority_gripper_accuracy, other_layout_baseline
from worldvla_ros.sim.bundled import bundled_checkpoint
from worldvla_ros.sim.closed_loop import HELD_OUT_SEED, evaluate, evaluate_parallel
from worldvla_ros.sim.record import record_demos

HELDOUT_EPISODES = 6
SEEDS = HELD_OUT_SEED + 500  # layouts neither in the training data nor in the evaluation of docs/embedded-default.md
# Closed loop: the measurement in docs/embedded-default.md (the relit model taught standing still, 2026-12-07, the
# sim's lamp at 60°) solved 196 of 750 held-out layouts (26 %; eight ranges of 50-100 layouts, these 100 among
# them: 20); random commands 0 of 1000 (95 % upper bound 0.4 %). MIN_SOLVED is the largest count a 26 % policy
# reaches in 100 episodes with probability ≥ 0.95 (binomial: 19, p = 0.963); a policy at half that rate (13 %)
# reaches it with probability 0.059 (the model before the relighting solved 8-12 % of such layouts).
CLOSED_LOOP_EPISODES = 100
MIN_SOLVED = 19
# Direction agreement (Δx, Δy of clear moves) with the expert: chance 0.5; measured 0.90 / 0.86 (the
# first bundled model, which solved nothing: 0.64 / 0.57).
MIN_DIRECTION = 0.55
# Gripper open/closed: measured 0.89 vs 0.50 for always answering the majority state (the majority
# share depends on the episodes, so the margin is a gain over it; first bundled model 0.85).
MIN_GRIPPER_GAIN = 0.10
# World model, one step: measured 23.95 dB against the recorded frame vs 17.8 dB for a frame of
# another layout (first bundled model 19.6). Repeating the observed frame scores 28.8 dB: the
# bundled world model does not beat that, and no test claims it does.
MIN_WM_GAIN_DB = 1.0


def test_bundled_model_is_small_and_in_the_published_layout() -> None:
    root = bundled_checkpoint()
    size = sum(f.stat().st_size for f in root.rglob('*') if f.is_file())
    assert size <= 50 * 2**20, size
    for name in ('config.json', 'model.safetensors.index.json', 'tokenizer/text_tokenizer.json',
                 'tokenizer/vqgan.yaml', 'tokenizer/vqgan.ckpt'):
        assert (root / name).is_file(), name


@pytest.fixture(scope='module')
def heldout_report(tmp_path_factory) -> dict:
    from worldvla_ros.evaluation.cli import main as evaluate_bag

    root = tmp_path_factory.mktemp('heldout')
    bags = record_demos(root / 'bags', HELDOUT_EPISODES, seed=SEEDS, progress=False)
    assert len(bags) == HELDOUT_EPISODES  # the expert solves each, so seeds and bags line up
    rc = evaluate_bag([*map(str, bags), '--checkpoint', str(bundled_checkpoint()), '--device', 'cpu',
                       '--out', str(root / 'report'), '--action-scale', 'tabletop', '--no-progress'])
    assert rc == 0
    return json.loads((root / 'report' / 'report.json').read_text())


def test_bundled_model_moves_the_expert_way_more_often_than_chance(heldout_report) -> None:
    agree = heldout_report['actions']['direction_agreement']
    assert (agree['x'] + agree['y']) / 2 >= MIN_DIRECTION, agree


def test_bundled_model_knows_when_to_close_the_gripper(heldout_report) -> None:
    majority = majority_gripper_accuracy(list(range(SEEDS, SEEDS + HELDOUT_EPISODES)))
    assert heldout_report['actions']['gripper_accuracy'] >= majority + MIN_GRIPPER_GAIN, majority


def test_bundled_world_model_imagines_this_scene_not_just_a_table(heldout_report) -> None:
    step1 = heldout_report['world_model']['by_horizon_step'][0]
    other = other_layout_baseline(list(range(SEEDS, SEEDS + HELDOUT_EPISODES)), 64)
    assert step1['psnr_db'] >= other['psnr_db'] + MIN_WM_GAIN_DB, (step1, other)


@pytest.mark.timeout(600)
def test_closed_loop_success_is_clearly_above_chance() -> None:
    chance = evaluate(None, CLOSED_LOOP_EPISODES, SEEDS, progress=False)
    assert chance['success_rate'] == 0.0
    # two processes, stopping once MIN_SOLVED are solved: the verdict of all 100 in about half the time
    results = evaluate_parallel(str(bundled_checkpoint()), CLOSED_LOOP_EPISODES, SEEDS, workers=2,
                                stop_after_successes=MIN_SOLVED, progress=False)['results']
    solved = sum(r['success'] for r in results)
    assert solved >= MIN_SOLVED, f'{solved} of {len(results)} layouts solved'


@pytest.mark.ros
@pytest.mark.timeout(240)
def test_a_goal_runs_to_success_in_the_sim_and_episodes_are_reported(isolated_graph) -> None:
    """The bundled model on the sim as a ROS robot. Episodes start with the named block in the gripper 3 cm
    from its target (from there it releases over the target in 17 of 20 held-out layouts), so a
    RunInstruction goal ends SUCCEEDED on the sim's own success signal; every episode is reported."""
    from action_msgs.msg import GoalStatus
    from worldvla.action import RunInstruction

    from worldvla_ros.sim.tabletop import TASKS

    node = isolated_graph
    procs = start_nodes(str(bundled_checkpoint()), [default_config(), sim_config()], 'cpu', use_world_model=False,
                        use_sim=True, sim_params={'task': '0', 'max_steps': '15', 'start_holding_near': '0.03'})
    results: list[dict] = []
    node.create_subscription(String, 'sim/episode_result', lambda m: results.append(json.loads(m.data)),
                             reliable_qos(50))
    successes: list[bool] = []  # the success signal of RunInstruction goals
    node.create_subscription(Bool, 'sim/success', lambda m: successes.append(m.data), reliable_qos(50))
    sim_diag = watch_diagnostics(node, 'worldvla_sim')
    goals = SpinningSafeActionClient(node, RunInstruction, 'worldvla/run_instruction')
    try:
        assert goals.wait_for_server(timeout_sec=30)
        sent = goals.send_goal_async(RunInstruction.Goal(instruction=TASKS[0][0], max_steps=200))
        assert wait_until(sent.done, 20) and sent.result().accepted
        done = sent.result().get_result_async()
        assert wait_until(done.done, 120), (results, sim_diag)
        result, status = done.result().result, done.result().status
        assert status == GoalStatus.STATUS_SUCCEEDED and result.outcome == RunInstruction.Result.SUCCEEDED, result
        assert 0 < result.steps <= 200 and result.duration > 0
        assert wait_until(lambda: len(results) >= 2 and any(r['success'] for r in results), 60), results
        seen = list(results)  # episodes keep ending meanwhile
        episodes = [r['episode'] for r in seen]
        assert episodes == list(range(episodes[0], episodes[0] + len(episodes)))  # none lost once listening
        assert all(isinstance(r['success'], bool) and r['steps'] > 0 for r in seen)
        # the success signal goes out with every result (both subscriptions may have missed different early ones)
        assert wait_until(lambda: len(successes) >= len(seen) - 1, 10) and any(successes)
        # one diagnostics report counts the episodes and the commands that ended them together
        assert wait_until(lambda: int(sim_diag.get('episodes_done', 0)) >= episodes[-1] + 1, 15), sim_diag
        assert int(sim_diag.get('commands_executed', 0)) >= sum(r['steps'] for r in seen)
        assert all(p.poll() is None for p in procs)
    finally:
        goals.destroy()
        stop_nodes(procs)
