"""The world-model monitor without ROS: likelihood bits against a hand computation, signals, calibration
(the false-alarm rate it promises on held-out data), the calibration file and the alert streaks."""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from worldvla_ros.model import load_policy
from worldvla_ros.model import tokens as T
from worldvla_ros.model.likelihood import code_positions, next_block_likelihood, still_action
from worldvla_ros.model.prompts import world_model_prompt
from worldvla_ros.monitor import (
    AlertState,
    Calibration,
    CalibrationError,
    auroc,
    calibrate,
    detection_rate,
    excess_map,
    frame_change,
    likelihood_signals,
)
from worldvla_ros.sim.anomalies import KINDS, anomalous_transition, normal_transition
from worldvla_ros.sim.bundled import bundled_checkpoint


@pytest.fixture(scope='module')
def bundled_policy():
    policy = load_policy(bundled_checkpoint(), device='cpu')
    policy.use_cpu_threads(1)
    return policy


def test_bits_per_token_are_the_cross_entropies_of_a_full_forward_pass(tiny_policy, frames) -> None:
    p = tiny_policy
    action = np.array([0.3, -0.2, 0.1, 0.0, 0.0, 0.05, 1.0])
    lik = p.transition_likelihood(frames[0], action, frames[1])
    grid = p.images.grid
    assert lik.bits.shape == (2, grid, grid)
    # by hand: the plain (causal) forward of transformers over prompt + real next block, full vocabulary logits,
    # then a float64 softmax over the 8192 image tokens at each code position
    block, following = (p.images.encode([f])[0] for f in frames)  # each frame on its own, as the policy does
    for row, a in enumerate([action, still_action(action)]):
        prompt = world_model_prompt(p.text, block, p.actions.encode(a[None]), p.config.world_model_prompt)
        ids = torch.tensor([[*prompt, *following]])
        with torch.no_grad():
            hidden = p.lm.model(input_ids=ids).last_hidden_state
            logits = p.lm.lm_head(hidden)[0].double().numpy()
        image_ids = np.asarray(p.images.image_token_ids)
        for n, at in enumerate(code_positions(grid)):
            z = logits[len(prompt) + at - 1, image_ids]
            logz = z.max() + math.log(np.exp(z - z.max()).sum())
            prob = np.exp(z - logz)
            target = following[at]
            bits = -(z[np.searchsorted(image_ids, target)] - logz) / math.log(2)
            entropy = -(prob * (z - logz)).sum() / math.log(2)
            r, c = divmod(n, grid)
            assert lik.bits[row, r, c] == pytest.approx(bits, abs=1e-3)
            assert lik.expected_bits[row, r, c] == pytest.approx(entropy, abs=1e-3)
    assert np.all(lik.variance >= 0)
    # the still hypothesis is its own row: the same as asking for it alone
    alone = p.transition_likelihood(frames[0], still_action(action), frames[1], still=False)
    np.testing.assert_allclose(alone.bits[0], lik.bits[1], atol=1e-4)


def test_counterfactual_rows_equal_each_action_scored_alone(tiny_policy, frames) -> None:
    """The counterfactual actions of a transition, one batch row each, give each row the bits the action gets when
    it is scored alone; the world-model evidence compares the whole frame's bits of the command and the best."""
    from worldvla_ros.monitor import transition_signals, world_model_evidence
    from worldvla_ros.motion_check import counterfactual_actions

    p = tiny_policy
    action = np.array([0.6, -0.3, 0.2, 0.0, 0.0, 0.1, -1.0])
    hyp = counterfactual_actions(action, [np.full(7, 0.1), np.full(7, -0.2)])
    assert len(hyp) == 10
    batch = p.transition_likelihood(frames[0], None, frames[1], rows=list(hyp.values()))
    assert batch.bits.shape[0] == len(hyp)
    for row, a in enumerate(hyp.values()):
        alone = p.transition_likelihood(frames[0], a, frames[1], still=False)
        np.testing.assert_allclose(batch.bits[row], alone.bits[0], atol=1e-4)
        np.testing.assert_allclose(batch.expected_bits[row], alone.expected_bits[0], atol=1e-4)
    totals = {k: float(batch.bits[i].sum()) for i, k in enumerate(hyp)}
    margin, best = world_model_evidence(batch, list(hyp))
    assert best == min((k for k in hyp if k != 'command'), key=totals.get)
    assert margin == pytest.approx(totals['command'] - totals[best])
    signals = transition_signals(batch, p.model_frame(frames[0]), p.model_frame(frames[1]), list(hyp))
    assert signals['wm_evidence'] == pytest.approx(margin)
    with pytest.raises(ValueError, match='at least one'):
        p.transition_likelihood(frames[0], None, frames[1], rows=[])


def test_a_next_block_that_is_not_an_image_is_refused(tiny_policy, frames) -> None:
    p = tiny_policy
    block = p.images.encode([frames[0]])[0]
    prompt = world_model_prompt(p.text, block, p.actions.encode(np.zeros((1, 7))), p.config.world_model_prompt)
    bad = list(block)
    bad[3] = T.ACTION_START
    with pytest.raises(ValueError, match='not image codes'):
        next_block_likelihood(p.lm, [prompt], bad, p.images.grid, p._image_ids)
    with pytest.raises(ValueError, match='one length'):
        next_block_likelihood(p.lm, [prompt, prompt[:-1]], block, p.images.grid, p._image_ids)
    with pytest.raises(ValueError, match='one action'):
        p.transition_likelihood(frames[0], np.zeros((2, 7)), frames[1])


def test_signals_by_hand() -> None:
    bits = np.array([[1.0, 2.0], [3.0, 10.0]])
    expected = np.array([[1.0, 1.0], [1.0, 1.0]])
    variance = np.full((2, 2), 0.25)
    s = likelihood_signals(bits, expected, variance, bits_still=bits - 0.5)
    assert s['bits_per_token'] == 4.0
    assert s['excess_bits'] == pytest.approx((0 + 1 + 2 + 9) / 4)
    assert s['surprise_z'] == pytest.approx(12 / math.sqrt(1.0 + 1e-6))
    assert s['peak_excess_bits'] == 9.0  # the worst 1/16 of 4 codes: one
    assert s['action_consistency'] == pytest.approx(0.5)
    assert frame_change(np.zeros((4, 4, 3), np.uint8), np.full((4, 4, 3), 2, np.uint8)) == 4.0
    heat = excess_map(bits, expected, 8)
    assert heat.shape == (8, 8, 3) and heat.dtype == np.uint8
    assert heat[0, 0].sum() < heat[7, 7].sum()  # the code 9 bits over is the brightest


def test_calibration_holds_its_false_alarm_rate_on_held_out_data() -> None:
    rng = np.random.default_rng(0)

    def normal(n: int) -> list[dict[str, float]]:  # two correlated, skewed signals
        a = rng.gamma(2.0, 1.0, n)
        return [{'peak_excess_bits': x, 'action_consistency': 0.5 * x + y}
                for x, y in zip(a, rng.normal(0, 1, n), strict=True)]

    for rate in (0.01, 0.05, 0.2):
        cal = calibrate(normal(4000), rate)
        assert cal.measured_rate <= rate
        held_out = normal(40000)
        observed = np.mean([bool(cal.alarm(n)) for n in held_out])
        assert observed == pytest.approx(rate, abs=0.25 * rate)  # tolerance: a quarter of the rate
    with pytest.raises(CalibrationError, match='too few'):
        calibrate(normal(30), 0.05)
    with pytest.raises(CalibrationError, match=r'\(0, 1\)'):
        calibrate(normal(100), 0.0)
    with pytest.raises(CalibrationError, match='missing'):
        calibrate([{'peak_excess_bits': 1.0}] * 100, 0.05)


def test_the_calibration_file_round_trips_and_hostile_ones_are_refused(tmp_path: Path) -> None:
    cal = Calibration({'peak_excess_bits': 3.5, 'action_consistency': 0.1}, 0.05, 400, 'tabletop@x', 0.0475)
    path = tmp_path / 'monitor.json'
    cal.save(path)
    back = Calibration.load(path)
    assert back.thresholds == cal.thresholds and back.model_id == 'tabletop@x' and back.transitions == 400
    assert back.alarm({'peak_excess_bits': 3.6, 'action_consistency': 0.0}) == ['peak_excess_bits']
    assert back.alarm({'peak_excess_bits': 3.5}) == []  # at the threshold is normal; a missing signal never alarms
    assert back.fits('tabletop@x') and back.fits('x') and not back.fits('tabletop@y')  # the digest decides
    assert Calibration({'peak_excess_bits': 1.0}, 0.05, 100).fits('anything@z')
    bound = Calibration(cal.thresholds, 0.05, 400, 'tabletop@x', 0.0475, weights='0123456789ab')
    bound.save(path)
    back = Calibration.load(path)
    assert back.weights == '0123456789ab' and back.fits('tabletop@x', '0123456789ab')
    assert not back.fits('tabletop@x', 'ba9876543210')  # same config.json, other weights: refused
    assert back.fits('tabletop@x')  # a caller that cannot tell the weights: the config decides
    good = json.loads(path.read_text())
    cases = {
        'not json': '{', 'a list': '[]', 'wrong format': json.dumps({**good, 'format': 'x'}),
        'no thresholds': json.dumps({**good, 'thresholds': {}}),
        'nan': json.dumps({**good, 'thresholds': {'peak_excess_bits': float('nan')}}),
        'a string': json.dumps({**good, 'thresholds': {'peak_excess_bits': '3'}}),
        'unknown signal': json.dumps({**good, 'thresholds': {'rm -rf': 1.0}}),
        'rate a string': json.dumps({**good, 'false_alarm_rate': 'abc'}),
        'rate nan': json.dumps({**good, 'false_alarm_rate': float('nan')}),
        'rate 1': json.dumps({**good, 'false_alarm_rate': 1.0}),
        'transitions a float': json.dumps({**good, 'transitions': 1e400}),
        'transitions a bool': json.dumps({**good, 'transitions': True}),
        'measured a dict': json.dumps({**good, 'measured_rate': {'a': 1}}),
        'model id a list': json.dumps({**good, 'model_id': [1]}),
        'weights a number': json.dumps({**good, 'weights': 5}),
        'source a string': json.dumps({**good, 'source': 'bag'}),
        'deep nesting': '[' * 200_000 + ']' * 200_000,
        'over a megabyte': json.dumps({**good, 'source': ['x' * 1000] * 1100}),
    }
    for what, text in cases.items():
        path.write_text(text)
        with pytest.raises(CalibrationError) as refused:
            Calibration.load(path)
            pytest.fail(f'{what} was accepted')
        assert str(path) in str(refused.value), (what, refused.value)  # the file is named, whatever is wrong
    with pytest.raises(CalibrationError, match='No such file'):
        Calibration.load(tmp_path / 'missing.json')


@pytest.mark.parametrize('special', ['/dev/zero', 'fifo', 'directory'])
def test_a_calibration_that_is_not_a_regular_file_is_refused_at_once(tmp_path: Path, special: str) -> None:
    """/dev/zero made the world-model node grow to 3.3 GB; a FIFO would block it forever."""
    import os
    import time

    path = Path(special) if special.startswith('/') else tmp_path / special
    if special == 'fifo':
        os.mkfifo(path)
    elif special == 'directory':
        path.mkdir()
    t0 = time.monotonic()
    with pytest.raises(CalibrationError, match='not a regular file'):
        Calibration.load(path)
    assert time.monotonic() - t0 < 1.0


def test_alerts_need_surprise_in_a_row() -> None:
    alerts = AlertState(warn_after=2, error_after=4)
    levels = [alerts.update(a) for a in [True, False, True, True, True, True, True, False, True]]
    assert levels == [0, 0, 0, 1, 1, 2, 2, 0, 0]


def test_auroc_and_detection_rate() -> None:
    assert auroc([0, 1, 2], [3, 4]) == 1.0 and auroc([3, 4], [0, 1]) == 0.0 and auroc([1, 1], [1]) == 0.5
    normal = list(range(100))
    assert detection_rate(normal, [98.5, 99.5, 200], 0.05) == 1.0  # threshold: the 95th value, 94
    assert detection_rate(normal, [50, 94], 0.05) == 0.0


def test_every_anomaly_changes_the_next_frame_and_the_bundled_monitor_sees_a_teleport(bundled_policy) -> None:
    for kind in KINDS:
        t = anomalous_transition(kind, 777)
        normal = normal_transition(777)
        assert t.kind == kind and t.next_frame.shape == normal.next_frame.shape
        if kind == 'stuck':
            # the sim stepped with the arm held still: only the fingers may have moved (the sim has no sensor noise)
            assert (t.next_frame != t.frame).any(axis=-1).mean() < 0.01 and np.linalg.norm(t.action[:3]) >= 0.5
    with pytest.raises(ValueError, match='unknown anomaly'):
        anomalous_transition('meteor', 1)

    def peak(t) -> float:
        lik = bundled_policy.transition_likelihood(t.frame, t.action, t.next_frame)
        return likelihood_signals(lik.bits[0], lik.expected_bits[0], lik.variance[0], lik.bits[1])['peak_excess_bits']

    normal = [peak(normal_transition(190_000 + i)) for i in range(12)]  # held-out layouts
    teleported = [peak(anomalous_transition('teleported', 195_000 + i)) for i in range(12)]
    assert auroc(normal, teleported) >= 0.8  # the benchmark measures 0.99 on 100 + 100


def test_the_weights_fingerprint_tells_checkpoints_with_one_config_apart(tmp_path: Path) -> None:
    """A fine-tune that kept the action statistics has the config.json of its base: the config digest in the
    model id cannot tell them apart, the weights' fingerprint does (and reads a few blocks, not gigabytes)."""
    import shutil

    import torch
    from safetensors.torch import load_file, save_file

    from worldvla_ros.model import make_tiny_checkpoint
    from worldvla_ros.model.checkpoint import find_checkpoint_files, model_id_of, weights_fingerprint

    a = find_checkpoint_files(make_tiny_checkpoint(tmp_path / 'a'))
    shutil.copytree(tmp_path / 'a', tmp_path / 'b')
    for shard in (tmp_path / 'b').glob('*.safetensors'):  # "fine-tuned": every tensor moved a little
        tensors = load_file(shard)
        save_file({k: v + 1e-3 * torch.randn_like(v) if v.is_floating_point() else v for k, v in tensors.items()},
                  shard, metadata={'format': 'pt'})
    b = find_checkpoint_files(tmp_path / 'b')
    assert model_id_of(a).split('@')[1] == model_id_of(b).split('@')[1]
    assert weights_fingerprint(a) != weights_fingerprint(b)
    assert weights_fingerprint(a) == weights_fingerprint(find_checkpoint_files(tmp_path / 'a'))
    assert Calibration({'peak_excess_bits': 1.0}, 0.05, 100, model_id_of(a), weights=weights_fingerprint(a)).fits(
        model_id_of(b), weights_fingerprint(b)) is False


def test_the_bundled_calibration_is_bound_to_the_bundled_weights() -> None:
    from worldvla_ros.model.checkpoint import find_checkpoint_files, model_id_of, weights_fingerprint

    files = find_checkpoint_files(bundled_checkpoint())
    cal = Calibration.load(bundled_checkpoint() / 'monitor_calibration.json')
    assert cal.weights == weights_fingerprint(files) and cal.fits(model_id_of(files), weights_fingerprint(files))


def test_evaluate_bag_calibrates_the_monitor_on_recorded_bags(tmp_path: Path, capsys) -> None:
    from worldvla_ros.evaluation.cli import main
    from worldvla_ros.evaluation.episode import write_episode
    from worldvla_ros.sim.record import expert_episode

    bags = []
    for seed in range(190_100, 190_104):  # held-out layouts, 25 frames of the expert each: 24 transitions
        frames, actions, instruction, _ = expert_episode(seed, max_steps=25)
        bags.append(str(write_episode(tmp_path / f'episode_{seed}', frames, actions, instruction, 10.0, 'mcap')))
    out = tmp_path / 'monitor.json'
    common = [*bags, '--checkpoint', str(bundled_checkpoint()), '--device', 'cpu', '--no-progress']
    assert main([*common, '--calibrate-monitor', str(out), '--false-alarm-rate', '0.05']) == 0
    cal = Calibration.load(out)
    assert cal.transitions == 96 and cal.measured_rate <= 0.05
    assert set(cal.thresholds) == {'peak_excess_bits', 'action_consistency', 'motion_cusum'}
    assert cal.model_id.startswith('tabletop') and cal.motion is not None  # the robot's motion, from the bags
    assert cal.weights and cal.weights == Calibration.load(bundled_checkpoint() / 'monitor_calibration.json').weights
    assert cal.source == [Path(b).name for b in bags]
    assert 'monitor calibrated on' in capsys.readouterr().err
    assert not (tmp_path / 'eval_report').exists()  # calibration writes its file only
    plain = tmp_path / 'plain.json'
    assert main([*common, '--calibrate-monitor', str(plain), '--false-alarm-rate', '0.05', '--no-motion-check']) == 0
    cal = Calibration.load(plain)
    assert set(cal.thresholds) == {'peak_excess_bits', 'action_consistency'} and cal.motion is None
    capsys.readouterr()
    # the motion model needs two transitions per feature: on half the bags it says so and what to do
    assert main([*bags[:2], *common[4:], '--calibrate-monitor', str(tmp_path / 'x.json'), '--false-alarm-rate',
                 '0.05']) == 2
    assert 'too few to fit the motion model' in capsys.readouterr().err
    # what fails without the model fails before it loads: a rate these transitions cannot support, a file that
    # cannot be written, an unknown signal (usage errors, exit 2)
    for extra, says in ((['--false-alarm-rate', '0.001'], 'too few'), (['--false-alarm-rate', '1.5'], '(0, 1)'),
                        (['--monitor-signals', 'bits_per_token', 'typo'], "unknown monitor signals ['typo']")):
        assert main([*common, '--calibrate-monitor', str(tmp_path / 'x.json'), *extra]) == 2
        assert says in capsys.readouterr().err
    for unwritable in (tmp_path / 'no' / 'dir.json', tmp_path):
        assert main([*common, '--calibrate-monitor', str(unwritable)]) == 2
        assert 'cannot write' in capsys.readouterr().err


def test_calibration_transitions_are_chained_a_control_period_apart() -> None:
    """The sequential evidence runs along chains: a gap (a frame without a command) ends one, a camera twice as
    fast as the control rate gives two interleaved chains per bag, and two bags never share one."""
    from worldvla_ros.evaluation.cli import transition_chains

    a, b = object(), object()
    pairs = [(a, i, 1) for i in (0, 1, 2, 4, 5)] + [(b, i, 2) for i in range(6)]
    chains = [[(id(ep), i) for ep, i, _ in c] for c in transition_chains(pairs)]
    assert chains == [[(id(a), 0), (id(a), 1), (id(a), 2)], [(id(a), 4), (id(a), 5)],
                      [(id(b), 0), (id(b), 2), (id(b), 4)], [(id(b), 1), (id(b), 3), (id(b), 5)]]
