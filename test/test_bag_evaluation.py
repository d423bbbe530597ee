"""Bag replay evaluation: real rosbag2 files (mcap and sqlite3), real tiny checkpoints, real nodes."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
import types
from pathlib import Path

import cv2
import numpy as np
import pytest
from conftest import pick_domain

from worldvla_ros.evaluation.bag_io import (
    ACTION_CHUNK,
    FLOAT_ARRAY,
    IMAGE,
    STRING,
    TWIST,
    BagError,
    BagWriter,
    ee_command_msg,
    header,
    image_msg,
    string_msg,
    to_stamp,
    typestore,
)
from worldvla_ros.evaluation.cli import main as evaluate_bag
from worldvla_ros.evaluation.convert import main as convert_to_bag
from worldvla_ros.evaluation.convert import synthetic_episode
from worldvla_ros.evaluation.episode import TopicMap, align_actions, read_episode, write_episode
from worldvla_ros.evaluation.scoring import (
    ChunkRecord,
    RunRecord,
    action_scores,
    executed_from_chunks,
    timing_scores,
)
from worldvla_ros.metrics import psnr, ssim
from worldvla_ros.model.image_tokenizer import to_model_frame

REPO = Path(__file__).resolve().parent.parent
K = 3  # chunk size of the evaluation checkpoint: fixed-length chunks so seams and positions exist


@pytest.fixture(scope='module')
def eval_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from worldvla_ros.model import make_tiny_checkpoint
    from worldvla_ros.model.config import WorldVLAConfig

    return make_tiny_checkpoint(tmp_path_factory.mktemp('ckpt') / 'eval',
                                settings=WorldVLAConfig(resolution=256, chunk_size=K, min_actions=K))


@pytest.fixture(scope='module')
def eval_policy(eval_checkpoint: Path):
    from worldvla_ros.model import load_policy

    return load_policy(eval_checkpoint, device='cpu')


# -- scoring, by hand --------------------------------------------------------------------------
def test_scores_equal_hand_computed_values() -> None:
    gt = np.zeros((5, 7))
    gt[:, 6] = [-1, -1, 1, 1, 1]
    c0 = np.zeros((3, 7))
    c0[:, 0] = [0.1, 0.2, 0.3]  # frames 0, 1, 2
    c0[:, 6] = [-1, 1, 1]  # one gripper mistake (frame 1)
    c1 = np.zeros((3, 7))
    c1[:, 0] = [0.6, 0.4, 0.2]  # frames 3, 4 executed; position 2 would be frame 5 (no recording)
    c1[:, 6] = [1, 1, -1]
    chunks = [ChunkRecord(0, c0, c0, 0.05), ChunkRecord(3, c1, c1, 0.5)]
    run = RunRecord('hand', 'lockstep', gt, chunks, executed_from_chunks(chunks, 5))
    assert [e.gt_index for e in run.executed] == [0, 1, 2, 3, 4]
    assert [e.seam for e in run.executed] == [False, False, False, True, False]
    s = action_scores([run])
    assert s['actions_compared'] == 5
    assert s['l1']['dx'] == pytest.approx((0.1 + 0.2 + 0.3 + 0.6 + 0.4) / 5)
    assert s['rmse']['dx'] == pytest.approx(np.sqrt((0.01 + 0.04 + 0.09 + 0.36 + 0.16) / 5))
    assert s['l1']['dy'] == 0.0
    assert s['gripper_accuracy'] == pytest.approx(4 / 5)
    pos = {p['position']: p for p in s['l1_by_chunk_position']}
    assert pos[0]['n'] == 2 and pos[2]['n'] == 1  # c1's last action has no recorded frame
    assert pos[0]['l1']['dx'] == pytest.approx((0.1 + 0.6) / 2)
    assert pos[1]['l1']['gripper'] == pytest.approx((2 + 0) / 2)
    assert s['seams'] == 1
    assert s['step_at_seams']['dx'] == pytest.approx(0.3)  # 0.6 after 0.3
    assert s['step_within_chunks']['dx'] == pytest.approx((0.1 + 0.1 + 0.2) / 3)
    assert s['recorded_step_at_seams']['gripper'] == 0.0
    # physical units: LIBERO scale (0.05 m, 0.5 rad per unit) at 10 Hz
    phys = action_scores([run], action_scale=(0.05, 0.05, 0.05, 0.5, 0.5, 0.5, 1.0), control_rate_hz=10.0)['physical']
    assert phys['l1']['dx'] == pytest.approx(0.05 * (0.1 + 0.2 + 0.3 + 0.6 + 0.4) / 5)
    assert phys['rmse']['dx'] == pytest.approx(0.05 * s['rmse']['dx'])
    assert phys['units']['dx'] == 'm' and phys['units']['dyaw'] == 'rad' and phys['jerk_units']['dx'] == 'm/s³'
    # jerk = |a[n] − 2 a[n−1] + a[n−2]| · scale · rate³; windows 1-2-3 (0.2) and 2-3-4 (0.5) straddle the seam
    assert phys['seam_windows'] == 2
    assert phys['jerk_at_seams']['dx'] == pytest.approx((0.2 + 0.5) / 2 * 0.05 * 1000)
    assert phys['jerk_within_chunks']['dx'] == pytest.approx(0.0, abs=1e-9)  # 0.1, 0.2, 0.3: constant acceleration
    assert phys['recorded_jerk_at_seams']['dx'] == 0.0 and phys['jerk_at_seams']['gripper'] is None
    assert 'physical' not in s  # only with a scale
    t = timing_scores([run], control_rate_hz=10.0)
    assert t['deadline_misses'] == 1  # 0.5 s > 3 actions at 10 Hz; 0.05 s is in time
    assert t['inference_ms']['p50'] == pytest.approx(275.0)


@pytest.mark.parametrize('rate', [5.0, 10.0, 20.0])
def test_direction_agreement_counts_the_same_motion_at_any_rate(rate: float) -> None:
    """0.1 m/s along x recorded at 5, 10 and 20 Hz (0.4, 0.2, 0.1 units of 0.05 m): a clear move at every rate
    (before: only at 5 Hz, the threshold being 0.25 action units); a hover is never counted."""
    n = 12
    gt = np.zeros((n, 7))
    gt[:, 0] = 0.1 / rate / 0.05
    gt[::3, 1] = 0.001  # a hover in y
    chunks = [ChunkRecord(0, gt.copy(), gt.copy(), 0.0)]
    run = RunRecord('moving', 'lockstep', gt, chunks, executed_from_chunks(chunks, n))
    s = action_scores([run], action_scale=(0.05, 0.05, 0.05, 0.5, 0.5, 0.5, 1.0), control_rate_hz=rate)
    assert s['direction_agreement'] == {'x': 1.0, 'y': None, 'z': None}
    assert s['direction_moves'] == {'x': n, 'y': 0, 'z': 0} and '0.05 m/s' in s['direction_clear_move']


def test_ground_truth_alignment_by_stamp() -> None:
    frames = np.array([100, 200, 300, 400]) * 1_000_000
    a = [np.full(7, v) for v in (1.0, 2.0, 3.0, 4.0, 5.0)]
    stamps = [(50_000_000, 0),  # before the first frame: unused
              (200_000_000, 0), (250_000_000, 0),  # two for frame 1: the first answers it
              (300_000_000, 0), (300_000_000, 1)]  # a recorded chunk: offset 1 → frame 3
    gt = align_actions(frames, stamps, a)
    assert np.isnan(gt[0]).all()
    assert gt[1, 0] == 2.0 and gt[2, 0] == 4.0 and gt[3, 0] == 5.0


# -- bags in, reports out ------------------------------------------------------------------------
def _run_cli(*args: str) -> int:
    return evaluate_bag([*args, '--no-progress'])


@pytest.mark.parametrize('storage', ['sqlite3', 'mcap'])
def test_lockstep_metrics_equal_a_direct_computation(tmp_path: Path, eval_checkpoint: Path, eval_policy,
                                                     storage: str) -> None:
    """The CLI on a bag gives the numbers of the policy run directly on the arrays the bag was made from."""
    frames, actions, instruction = synthetic_episode(frames=9, seed=3)
    # mcap: the camera as lossless CompressedImage (PNG), so the same numbers must come out
    bag = write_episode(tmp_path / 'bag', frames, actions, instruction, storage=storage,
                        compressed='png' if storage == 'mcap' else '')
    wm = storage == 'sqlite3'  # the world model is slow on CPU: once is enough
    out = tmp_path / 'report'
    # sqlite3: the parameter files layered as ROS does (the sim's action_scale over the default's)
    configs = [a for name in ('worldvla.yaml', 'tabletop_sim.yaml') for a in ('--config', str(REPO / 'config' / name))]
    rc = _run_cli(str(bag), '--checkpoint', str(eval_checkpoint), '--device', 'cpu', '--out', str(out),
                  '--replan-every', '0', *(['--wm-horizon', '2', *configs] if wm else ['--no-world-model']))
    assert rc == 0
    report = json.loads((out / 'report.json').read_text())
    assert (out / 'report.md').read_text().startswith('# WorldVLA bag evaluation')
    for png in ('action_traces.png', 'error_histograms.png') + (('world_model_strip.png',) if wm else ()):
        assert cv2.imread(str(out / png)) is not None, png

    # independent: chunks at frames 0, 3, 6 from the newest two frames, un-filtered (limits are wide)
    pred = np.concatenate([eval_policy.predict(frames[max(0, f - 1) : f + 1], instruction).actions
                           for f in (0, 3, 6)])
    err = pred - actions
    a = report['actions']
    assert a['actions_compared'] == 9 and a['seams'] == 2
    assert report['frames'] == 9 and report['timing']['chunks'] == 3
    np.testing.assert_allclose([a['l1'][d] for d in a['l1']], np.abs(err).mean(0), atol=1e-5)
    np.testing.assert_allclose([a['rmse'][d] for d in a['rmse']], np.sqrt((err**2).mean(0)), atol=1e-5)
    assert a['gripper_accuracy'] == pytest.approx(np.mean((pred[:, 6] > 0) == (actions[:, 6] > 0)), abs=1e-6)
    scale = np.array([0.02, 0.02, 0.02, 0.1, 0.1, 0.1, 1.0] if wm else [0.05, 0.05, 0.05, 0.5, 0.5, 0.5, 1.0])
    phys = a['physical']
    np.testing.assert_allclose(phys['action_scale'], scale)
    np.testing.assert_allclose([phys['l1'][d] for d in phys['l1']], np.abs(err).mean(0) * scale, atol=1e-6)
    assert '## Actions in physical units' in (out / 'report.md').read_text()
    seam_step = np.abs(pred[[3, 6]] - pred[[2, 5]]).mean(0)
    np.testing.assert_allclose([a['step_at_seams'][d] for d in a['step_at_seams']], seam_step, atol=1e-5)
    if wm:
        steps = {r['step']: r for r in report['world_model']['by_horizon_step']}
        assert set(steps) == {1, 2} and steps[1]['n'] == 3
        p1, s1 = [], []
        for f in (0, 3, 6):
            imagined = eval_policy.imagine(frames[f], actions[f])
            real = to_model_frame(frames[f + 1], 256, rotate_180=False)
            p1.append(psnr(real, imagined))
            s1.append(ssim(real, imagined))
        assert steps[1]['psnr_db'] == pytest.approx(np.mean(p1), abs=1e-3)
        assert steps[1]['ssim'] == pytest.approx(np.mean(s1), abs=1e-5)


def test_libero_hdf5_converts_with_the_release_rotation_and_evaluates(tmp_path: Path, eval_checkpoint: Path) -> None:
    h5py = pytest.importorskip('h5py')
    rng = np.random.default_rng(0)
    path = tmp_path / 'KITCHEN_SCENE3_turn_on_the_stove_demo.hdf5'
    demos = {}
    with h5py.File(path, 'w') as f:
        data = f.create_group('data')
        # the BDDL text differs from the task name in the file name, as for 34 of LIBERO's 130 tasks
        data.attrs['problem_info'] = json.dumps({'language_instruction': 'switch the stove on'})
        for d, n in (('demo_0', 6), ('demo_1', 5)):
            rgb = rng.integers(0, 256, (n, 128, 128, 3), dtype=np.uint8)
            act = rng.uniform(-0.5, 0.5, (n, 7))
            data.create_dataset(f'{d}/obs/agentview_rgb', data=rgb)
            data.create_dataset(f'{d}/actions', data=act)
            demos[d] = (rgb, act)
    out = tmp_path / 'bags'
    assert convert_to_bag(['libero', str(path), str(out), '--storage', 'sqlite3']) == 0
    bags = sorted(out.iterdir())
    assert [b.name for b in bags] == [f'KITCHEN_SCENE3_turn_on_the_stove_demo_{i}' for i in (0, 1)]
    ep = read_episode(bags[0])
    rgb, act = demos['demo_0']
    assert ep.instruction == 'turn on the stove'  # the release's instruction: the file name's task name
    assert convert_to_bag(['libero', str(path), str(tmp_path / 'bddl'), '--instruction-source', 'bddl']) == 0
    assert read_episode(sorted((tmp_path / 'bddl').iterdir())[0]).instruction == 'switch the stove on'
    # LIBERO-10's training text in the release: the whole task name, the scene prefix kept
    assert convert_to_bag(['libero', str(path), str(tmp_path / 'name'), '--instruction-source', 'name']) == 0
    assert read_episode(sorted((tmp_path / 'name').iterdir())[0]).instruction == 'KITCHEN SCENE3 turn on the stove'
    np.testing.assert_array_equal(np.stack(ep.frames), rgb)
    np.testing.assert_allclose(ep.actions, act)
    # what the model sees is the simulator frame turned by 180°, as in the release's LIBERO evaluation
    seen = to_model_frame(ep.frames[0], 256, rotate_180=True)
    expected = cv2.resize(np.ascontiguousarray(rgb[0][::-1, ::-1]), (256, 256), interpolation=cv2.INTER_LINEAR)
    np.testing.assert_array_equal(seen, expected)
    rc = _run_cli(*map(str, bags), '--checkpoint', str(eval_checkpoint), '--device', 'cpu',
                  '--out', str(tmp_path / 'r'), '--no-world-model')
    assert rc == 0
    report = json.loads((tmp_path / 'r' / 'report.json').read_text())
    assert report['frames'] == 11 and report['actions']['actions_compared'] == 11
    assert [e['frames'] for e in report['episodes']] == [6, 5]
    # scored at the bag's 20 Hz (LIBERO's control rate), not the YAML's 10 Hz: jerk and deadlines follow it
    assert report['control_rate_hz'] == 20.0 and report['control_rate_source'] == "the bags' camera stamps"
    assert report['timing']['deadline'] == 'chunk length / control_rate_hz'
    assert 'control period: 50.0 ms (20 Hz)' in (tmp_path / 'r' / 'report.md').read_text()
    # one trace plot per bag
    assert {p.name for p in (tmp_path / 'r').glob('action_traces_*.png')} == {f'action_traces_{b.name}.png'
                                                                              for b in bags}


def test_folder_of_frames_converts(tmp_path: Path) -> None:
    folder = tmp_path / 'episode'
    (folder / 'frames').mkdir(parents=True)
    rng = np.random.default_rng(1)
    frames = [rng.integers(0, 256, (48, 64, 3), dtype=np.uint8) for _ in range(4)]
    for i, f in enumerate(frames):
        cv2.imwrite(str(folder / 'frames' / f'{i:04d}.png'), cv2.cvtColor(f, cv2.COLOR_RGB2BGR))
    actions = rng.uniform(-1, 1, (4, 7))
    np.savetxt(folder / 'actions.csv', actions, delimiter=',')
    (folder / 'instruction.txt').write_text('open the drawer\n')
    assert convert_to_bag(['folder', str(folder), str(tmp_path / 'bag')]) == 0
    ep = read_episode(tmp_path / 'bag')
    assert ep.instruction == 'open the drawer'
    np.testing.assert_array_equal(np.stack(ep.frames), np.stack(frames))
    np.testing.assert_allclose(ep.actions, actions)
    # the same episode as CompressedImage (PNG, lossless) on /camera/image_raw/compressed
    assert convert_to_bag(['folder', str(folder), str(tmp_path / 'png'), '--compressed', 'png']) == 0
    ep = read_episode(tmp_path / 'png')
    np.testing.assert_array_equal(np.stack(ep.frames), np.stack(frames))


def test_twist_gripper_float_array_and_chunk_ground_truth(tmp_path: Path) -> None:
    ts = typestore()
    T = ts.types  # noqa: N806
    frame = np.zeros((8, 8, 3), np.uint8)
    t0, dt = 10**18, 100_000_000
    with BagWriter(tmp_path / 'bag', 'mcap') as bag:
        bag.write('/task', STRING, t0, string_msg('stack the cups'))
        bag.write('/gripper', 'std_msgs/msg/Bool', t0, T['std_msgs/msg/Bool'](data=False))
        for i in range(3):
            t = t0 + i * dt
            bag.write('/cam', IMAGE, t, image_msg(frame, t))
            twist = T[TWIST](header=header(t + 5), twist=T['geometry_msgs/msg/Twist'](
                linear=T['geometry_msgs/msg/Vector3'](x=i, y=0.0, z=0.0),
                angular=T['geometry_msgs/msg/Vector3'](x=0.0, y=0.0, z=-i)))
            bag.write('/cmd_twist', TWIST, t + 10, twist)
            arr = T[FLOAT_ARRAY](layout=T['std_msgs/msg/MultiArrayLayout'](dim=[], data_offset=0),
                                 data=np.arange(7, dtype=np.float64) + 10 * i)
            bag.write('/cmd_array', FLOAT_ARRAY, t + 20, arr)
            if i == 0:
                chunk = T[ACTION_CHUNK](header=header(t), observation_stamps=[to_stamp(t)], instruction='x',
                                        commands=[ee_command_msg(np.full(7, k), t, k) for k in range(3)],
                                        raw_actions=np.zeros(21), inference_latency=0.1, model_id='m', sequence=0)
                bag.write('/old_policy/chunk', ACTION_CHUNK, t + 30, chunk)
        bag.write('/gripper', 'std_msgs/msg/Bool', t0 + dt + 50, T['std_msgs/msg/Bool'](data=True))
        for i, width in enumerate((0.08, 0.04, 0.0)):  # a parallel gripper's opening in metres
            bag.write('/gripper_width', 'std_msgs/msg/Float64', t0 + i * dt + 1, T['std_msgs/msg/Float64'](data=width))
    libero = (0.05, 0.05, 0.05, 0.5, 0.5, 0.5, 1.0)
    with pytest.raises(BagError, match='needs the action scale'):
        read_episode(tmp_path / 'bag', TopicMap(actions='/cmd_twist'))
    twist = read_episode(tmp_path / 'bag', TopicMap(actions='/cmd_twist', gripper='/gripper'), action_scale=libero)
    assert twist.instruction == 'stack the cups'
    # a = v · T / scale: T = 0.1 s (the camera's period), 0.05 m and 0.5 rad per action unit
    np.testing.assert_allclose(twist.actions[:, 0], np.array([0, 1, 2]) * 0.1 / 0.05)
    np.testing.assert_allclose(twist.actions[:, 5], np.array([0, -1, -2]) * 0.1 / 0.5)
    np.testing.assert_allclose(twist.actions[:, 6], [-1, 1, 1])  # Bool: true = closed, during step 1
    assert 'TwistStamped (m/s, rad/s) × 100.0 ms' in twist.conversion
    assert 'np.' not in twist.conversion and '[0.05, 0.05, 0.05' in twist.conversion  # plain numbers, no reprs
    slower = read_episode(tmp_path / 'bag', TopicMap(actions='/cmd_twist'), action_scale=libero, period_s=0.2)
    np.testing.assert_allclose(slower.actions[:, 0], np.array([0, 1, 2]) * 0.2 / 0.05)
    with pytest.raises(BagError, match='--gripper-open and --gripper-closed'):
        read_episode(tmp_path / 'bag', TopicMap(actions='/cmd_twist', gripper='/gripper_width'), action_scale=libero)
    width = read_episode(tmp_path / 'bag', TopicMap(actions='/cmd_twist', gripper='/gripper_width',
                                                    gripper_open=0.08, gripper_closed=0.0), action_scale=libero)
    np.testing.assert_allclose(width.actions[:, 6], [-1, 0, 1])  # 0.08 m open → -1, 0.04 → 0, 0 closed → +1
    arr = read_episode(tmp_path / 'bag', TopicMap(actions='/cmd_array', time_source='bag'))
    np.testing.assert_allclose(arr.actions[2], np.arange(7) + 20)
    chunk = read_episode(tmp_path / 'bag', TopicMap(actions='/old_policy/chunk'))
    np.testing.assert_allclose(chunk.actions[:, 0], [0, 1, 2])
    with pytest.raises(BagError, match='several ground-truth action topics'):
        read_episode(tmp_path / 'bag')


# -- bad bags: a clear message and a non-zero exit, never a traceback ---------------------------
def _cli(*args: str) -> subprocess.CompletedProcess:
    exe = Path(sys.prefix) / 'bin' / 'evaluate_bag'
    return subprocess.run([str(exe), *args, '--no-progress'], capture_output=True, text=True, timeout=120)


def _cli_here(capsys: pytest.CaptureFixture, *args: str) -> types.SimpleNamespace:
    """evaluate_bag's main() in this process: exit code and stderr, as the executable gives them."""
    capsys.readouterr()
    try:
        code = evaluate_bag([*args, '--no-progress'])
    except SystemExit as exc:  # argparse's own errors
        code = exc.code
    return types.SimpleNamespace(returncode=code, stderr=capsys.readouterr().err)


def test_bad_bags_give_a_clear_error_and_exit_2(tmp_path: Path, eval_checkpoint: Path,
                                               capsys: pytest.CaptureFixture) -> None:
    """Through the installed executable once, then in-process (the same main(), without 17 interpreter starts)."""
    frames, actions, instruction = synthetic_episode(frames=30, seed=0, size=64)
    good = {s: write_episode(tmp_path / f'good_{s}', frames, actions, instruction, storage=s)
            for s in ('mcap', 'sqlite3')}

    no_actions = tmp_path / 'no_actions'
    with BagWriter(no_actions, 'mcap') as bag:
        bag.write('/camera/image_raw', IMAGE, 1, image_msg(frames[0], 1))
        bag.write('/instruction', STRING, 1, string_msg('x'))

    truncated = tmp_path / 'truncated'
    shutil.copytree(good['mcap'], truncated)
    data = next(truncated.glob('*.mcap'))
    data.write_bytes(data.read_bytes()[: data.stat().st_size // 2])

    corrupt = tmp_path / 'corrupt'
    shutil.copytree(good['sqlite3'], corrupt)
    db = next(corrupt.glob('*.db3'))
    raw = bytearray(db.read_bytes())
    raw[100:] = bytes(len(raw) - 100)
    db.write_bytes(bytes(raw))

    killed = tmp_path / 'killed'  # a recorder stopped before it wrote metadata.yaml
    shutil.copytree(good['mcap'], killed)
    (killed / 'metadata.yaml').unlink()
    not_a_bag = tmp_path / 'not_a_bag'
    not_a_bag.mkdir()
    (not_a_bag / 'notes.txt').write_text('hello')
    json_bag = tmp_path / 'json_bag'
    shutil.copytree(good['mcap'], json_bag)
    meta = json_bag / 'metadata.yaml'
    meta.write_text(meta.read_text().replace('serialization_format: cdr', 'serialization_format: json'))
    short_array = tmp_path / 'short_array'
    depth = tmp_path / 'depth'
    T = typestore().types  # noqa: N806
    with BagWriter(short_array, 'mcap') as bag, BagWriter(depth, 'mcap') as depth_bag:
        for i in range(3):
            bag.write('/camera/image_raw', IMAGE, i, image_msg(frames[i], i))
            arr = T[FLOAT_ARRAY](layout=T['std_msgs/msg/MultiArrayLayout'](dim=[], data_offset=0),
                                 data=np.zeros(3))
            bag.write('/arm/command', FLOAT_ARRAY, i, arr)
            msg = image_msg(frames[i], i)
            msg.encoding = '16UC1'
            depth_bag.write('/camera/depth', IMAGE, i, msg)
            depth_bag.write('/arm/command', FLOAT_ARRAY, i, T[FLOAT_ARRAY](
                layout=T['std_msgs/msg/MultiArrayLayout'](dim=[], data_offset=0), data=np.zeros(7)))
        bag.write('/instruction', STRING, 0, string_msg('x'))
        depth_bag.write('/instruction', STRING, 0, string_msg('x'))

    long_instruction = write_episode(tmp_path / 'long_instruction', frames, actions, 'put it there ' * 60)
    rows_deleted = tmp_path / 'rows_deleted'  # the image rows deleted from the sqlite storage, metadata kept
    shutil.copytree(good['sqlite3'], rows_deleted)
    import sqlite3

    with sqlite3.connect(next(rows_deleted.glob('*.db3'))) as db:
        db.execute("DELETE FROM messages WHERE topic_id = (SELECT id FROM topics WHERE name = '/camera/image_raw')")

    cases = {
        long_instruction: 'long_instruction: the model refuses its instruction: instruction has 779 characters',
        rows_deleted: 'topic /camera/image_raw holds no readable messages (its metadata declares 30)',
        no_actions: 'no ground-truth action topic',
        truncated: 'truncated or corrupt',
        corrupt: 'corrupt',
        tmp_path / 'missing': 'no such bag',
        killed: 'ros2 bag reindex',
        not_a_bag: 'not a rosbag2 bag (no metadata.yaml)',
        killed / 'metadata.yaml.gone': 'no such bag',
        next(good['sqlite3'].glob('*.db3')): 'is a file; a rosbag2 bag is a directory',
        json_bag: 'only CDR',
        short_array: f'{short_array}: topic /arm/command: a Float64MultiArray action has 3 values',
        depth: "unsupported encoding '16UC1'",
    }
    r = _cli(str(no_actions), '--checkpoint', str(eval_checkpoint), '--out', str(tmp_path / 'r'))
    assert r.returncode == 2 and cases[no_actions] in r.stderr and 'Traceback' not in r.stderr, r.stderr
    for bag, message in cases.items():
        r = _cli_here(capsys, str(bag), '--checkpoint', str(eval_checkpoint), '--out', str(tmp_path / 'r'))
        assert r.returncode == 2, (bag, r.stderr)
        assert message in r.stderr, (bag, r.stderr)
        assert 'Traceback' not in r.stderr, r.stderr
    r = _cli_here(capsys, str(good['mcap']), '--checkpoint', str(eval_checkpoint), '--image-topic', '/wrist/image')
    assert r.returncode == 2 and "no topic '/wrist/image'" in r.stderr and '/camera/image_raw' in r.stderr
    r = _cli_here(capsys, str(good['mcap']), '--checkpoint', str(eval_checkpoint), '--action-scale', '0.05,0.05')
    assert r.returncode == 2 and 'neither a preset' in r.stderr and 'Traceback' not in r.stderr
    r = _cli_here(capsys, str(good['mcap']), '--checkpoint', str(eval_checkpoint), '--config',
                  str(tmp_path / 'none.yaml'))
    assert r.returncode == 2 and 'no parameter file' in r.stderr and 'Traceback' not in r.stderr
    r = _cli_here(capsys, str(good['mcap']), '--checkpoint', str(tmp_path / 'nope'), '--out', str(tmp_path / 'r1'))
    assert r.returncode == 1 and 'cannot load checkpoint' in r.stderr and 'Traceback' not in r.stderr
    # a single .mcap file is a bag too (ros2 bag record -s mcap writes one)
    assert len(read_episode(next(good['mcap'].glob('*.mcap'))).frames) == 30

    # the output is checked before any work: unwritable, or holding another run's report
    blocker = tmp_path / 'a_file'
    blocker.write_text('')
    r = _cli_here(capsys, str(good['mcap']), '--checkpoint', str(eval_checkpoint), '--out', str(blocker / 'report'))
    assert r.returncode == 2 and 'cannot write the report' in r.stderr and 'Traceback' not in r.stderr
    old = tmp_path / 'old_report'
    old.mkdir()
    (old / 'report.json').write_text('{}')
    (old / 'action_traces_another_bag.png').write_bytes(b'')
    r = _cli_here(capsys, str(good['mcap']), '--checkpoint', str(eval_checkpoint), '--out', str(old), '--device', 'cpu',
             '--no-world-model')
    assert r.returncode == 2 and 'already holds a report' in r.stderr and '--overwrite' in r.stderr
    r = _cli_here(capsys, str(good['mcap']), '--checkpoint', str(eval_checkpoint), '--out', str(old), '--device', 'cpu',
             '--no-world-model', '--overwrite')
    assert r.returncode == 0, r.stderr
    assert not (old / 'action_traces_another_bag.png').exists()  # no stale plot of another bag beside it
    assert json.loads((old / 'report.json').read_text())['bags'] == [str(good['mcap'])]


# -- live: the real nodes answer a replayed bag ---------------------------------------------------
@pytest.mark.ros
@pytest.mark.timeout(240)
@pytest.mark.parametrize(('storage', 'compressed'), [('sqlite3', ''), ('mcap', 'jpeg')])
def test_live_mode_records_node_outputs_and_scores_them(tmp_path: Path, eval_checkpoint: Path, storage: str,
                                                        compressed: str) -> None:
    frames, actions, instruction = synthetic_episode(frames=20, seed=5)
    bag = write_episode(tmp_path / 'bag', frames, actions, instruction, rate_hz=10.0, storage=storage,
                        compressed=compressed)
    out = tmp_path / 'live'
    rc = _run_cli(str(bag), '--checkpoint', str(eval_checkpoint), '--device', 'cpu', '--mode', 'live',
                  '--out', str(out), '--domain-id', str(pick_domain(120, 230)))
    assert rc == 0
    recording = out / 'outputs_bag'
    from worldvla_ros.evaluation.bag_io import BagReader

    with BagReader(recording) as r:
        assert set(r.topics) == {'/worldvla/action_chunk', '/worldvla/ee_command', '/worldvla/imagined_image',
                                 '/worldvla/surprise', '/diagnostics'}  # full names, as rosbag2 records them
        assert r.counts.get('/worldvla/action_chunk', 0) >= 1
        assert r.counts.get('/worldvla/ee_command', 0) >= K
        assert r.counts.get('/worldvla/imagined_image', 0) >= 1  # the world-model node answered too
        diag = [(m.time_ns, s.hardware_id, {kv.key: kv.value for kv in s.values})  # each node's own status
                for m in r.messages(['/diagnostics']) for s in m.msg.status if 'monitor' not in s.name]
    # the replay ran until both nodes had nothing left to do, and stopped then (not on a timer)
    idle_at = {}
    for t, node, values in sorted(diag):
        if values.get('idle') == 'true':
            idle_at.setdefault(node, t)
        else:
            idle_at.pop(node, None)
    assert set(idle_at) == {'worldvla_action', 'worldvla_world_model'}, diag[-4:]
    after = [node for t, node, _ in diag if t > max(idle_at.values())]
    assert len(after) <= 4  # stopped within about one report of both being idle (no timer running on)
    report = json.loads((out / 'report.json').read_text())
    t, a = report['timing'], report['actions']
    assert report['mode'] == 'live' and report['chunk_size'] == K
    assert t['chunks'] >= 1 and t['frames'] == 20
    assert t['end_to_end_ms']['p50'] >= t['inference_ms']['p50'] > 0
    # sensor-data QoS is best effort: a loaded machine may lose a frame, but every frame a chunk was
    # planned from was received, and the count is the node's final one (read after the last frame)
    assert 20 >= t['frames_received_by_node'] >= 20 - t['frames_never_used'] > 0
    assert t['frames_never_used'] == 20 - t['chunks'] - t.get('outputs_without_frame', 0)
    assert a['actions_compared'] >= K


@pytest.mark.ros
def test_await_chunks_clock_holds_and_reads_the_nodes_loop_from_its_outputs() -> None:
    """--await-chunks' two parts without a node: the clock stands still while held (and loses no time once
    released), and whether the node asks a chunk from the next frame follows its replan rule as read from
    real serialized commands and chunks."""
    import time as _time

    from rclpy.serialization import serialize_message
    from worldvla.msg import ActionChunk, EndEffectorCommand

    from worldvla_ros.evaluation.bag_io import ACTION_CHUNK, EE_COMMAND
    from worldvla_ros.evaluation.live import ChunkWatch, ReplayClock

    clock = ReplayClock(1_000, rate=0.5)
    clock.hold()
    held = clock.now()
    _time.sleep(0.05)
    assert clock.now() == held
    clock.release()
    _time.sleep(0.02)
    assert held < clock.now() < held + 0.5 * 0.06e9  # resumes where it stood, at half speed

    def command(index: int, size: int, hold: bool = False) -> bytes:
        return serialize_message(EndEffectorCommand(index=index, chunk_size=size, hold=hold, action=[0.0] * 7))

    watch = ChunkWatch(replan_threshold=1)
    assert watch.expects_chunk() and watch.commanding() is None  # nothing out yet: the first frame asks
    chunk = ActionChunk()
    chunk.header.stamp.sec = 5
    watch.on_output(ACTION_CHUNK, serialize_message(chunk))
    assert watch.commanding() == 0 and watch.await_chunk(5_000_000_000, 0.01)
    assert not watch.await_chunk(5_000_000_001, 0.01) and not watch.await_command(0, 0.01)
    for index, asks in ((0, False), (1, False), (2, True), (3, True)):  # 4 commands: asks once ≤ 1 is left
        watch.on_output(EE_COMMAND, command(index, 4))
        assert watch.expects_chunk() is asks, index
    watch.on_output(EE_COMMAND, command(0, 0, hold=True))
    assert watch.expects_chunk() and watch.await_command(4, 0.01) and watch.commanding() == 5
    watch.on_output('/diagnostics', b'ignored')  # other outputs are not read
    assert ChunkWatch(replan_threshold=-1).expects_chunk()


@pytest.mark.ros
@pytest.mark.timeout(300)
def test_lockstep_sends_the_commands_the_node_sends(tmp_path: Path, eval_checkpoint: Path) -> None:
    """One bag through lockstep evaluation and through the real action node (live, the clock waiting for every
    chunk the node asks for, and slowed so that each command reaches the player long before the next frame:
    2 s of wall time for half a period), greedy: the same commands one by one, holds included, however slowly
    this machine infers. Frames are stamped half a period after the node's ticks (the player starts its clock
    half a period early) so each arrives well before the tick that uses it. Tolerances: float32 rounding (1e-6), and
    the node may send more after the last frame (it ticks on until its queue is empty and then holds) where
    lockstep stops with the bag."""
    from worldvla_ros.evaluation.bag_io import BagReader
    from worldvla_ros.evaluation.cli import build_parser
    from worldvla_ros.evaluation.cli import run as run_evaluation

    frames, actions, instruction = synthetic_episode(frames=10, seed=7)
    bag = write_episode(tmp_path / 'bag', frames, actions, instruction, rate_hz=10.0,
                        start_ns=1_700_000_000_050_000_000)
    # replanning with one command left, ensembled, clamped and step-limited: every decision of the loop is used
    overlay = tmp_path / 'loop.yaml'
    overlay.write_text('worldvla_action:\n  ros__parameters:\n    replan_threshold: 1\n    chunk_merge: ensemble\n'
                       '    action_max: [0.3, 0.9375, 0.9375, 0.375, 0.375, 0.375, 1.0]\n'
                       '    max_step: [0.2, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0]\n')
    configs = ['--config', str(REPO / 'config' / 'worldvla.yaml'), '--config', str(overlay)]
    common = [str(bag), '--checkpoint', str(eval_checkpoint), '--device', 'cpu', '--no-world-model',
              '--no-progress', *configs]
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the node (cpu_threads 1): the same reductions, so no near-tie of this random
    try:  # model's greedy decoding can go the other way
        _, (lock,) = run_evaluation(build_parser().parse_args([*common, '--out', str(tmp_path / 'lockstep')]))
    finally:
        torch.set_num_threads(threads)
    live = tmp_path / 'live'
    assert _run_cli(*common, '--mode', 'live', '--rate', '1', '--await-chunks', '--out', str(live),
                    '--domain-id', str(pick_domain(120, 230))) == 0
    with BagReader(live / 'outputs_bag') as r:
        sent = [m.msg for m in r.messages(['/worldvla/ee_command'])]
    assert len(lock.commands) == 10 and len(sent) >= 10
    for i, (a, b) in enumerate(zip(lock.commands, sent, strict=False)):
        assert (a.hold, a.index, a.chunk_sequence) == (b.hold, b.index, b.chunk_sequence), (i, a, b)
        np.testing.assert_allclose(np.asarray(b.action), a.action, atol=1e-6, err_msg=f'command {i}')
    assert any(not c.hold and c.index > 0 for c in lock.commands)  # chunks ran on: merging and limits were used
    assert all(c.hold for c in sent[10:][3:])  # after the bag: the queued rest (≤ K), then holds


def test_control_rate_from_the_bag_unless_given_and_jerk_follows_it(tmp_path: Path, eval_checkpoint: Path) -> None:
    frames, actions, instruction = synthetic_episode(frames=12, seed=2, size=64)
    bag = write_episode(tmp_path / 'bag20', frames, actions, instruction, rate_hz=20.0)
    reports = {}
    for name, extra in (('bag', []), ('given', ['--control-rate', '10'])):
        out = tmp_path / name
        assert _run_cli(str(bag), '--checkpoint', str(eval_checkpoint), '--device', 'cpu', '--out', str(out),
                        '--no-world-model', '--replan-every', '0', *extra) == 0
        reports[name] = json.loads((out / 'report.json').read_text())
    assert reports['bag']['control_rate_hz'] == 20.0 and reports['given']['control_rate_hz'] == 10.0
    jerk = {k: reports[k]['actions']['physical']['jerk_within_chunks']['dx'] for k in reports}
    assert jerk['bag'] == pytest.approx(8 * jerk['given'], rel=1e-6)  # jerk ∝ rate³
    other = write_episode(tmp_path / 'bag10', frames, actions, instruction, rate_hz=10.0)
    r = _cli(str(bag), str(other), '--checkpoint', str(eval_checkpoint), '--out', str(tmp_path / 'mixed'))
    assert r.returncode == 2 and 'different rates' in r.stderr and '--control-rate' in r.stderr


def test_report_plots_have_units_seconds_and_upright_libero_frames(tmp_path: Path, eval_checkpoint: Path) -> None:
    """Plots are read by people: axes in m / rad and seconds, labelled histograms, LIBERO frames upright."""
    from worldvla_ros.evaluation.report import write_report
    from worldvla_ros.evaluation.scoring import ExecutedAction

    gt = np.zeros((4, 7))
    run = RunRecord('ep', 'lockstep', gt, times_s=np.array([0.0, 0.05, 0.1, 0.15]))
    run.executed = [ExecutedAction(i, np.full(7, 0.5), i == 2) for i in range(4)]
    real = np.zeros((32, 32, 3), np.uint8)
    real[:8] = 255  # a white band at the top of the stored (rendered) frame
    run.strip = [(1, real, real.copy())]
    summary = {'mode': 'lockstep', 'model_id': 'm', 'device': 'cpu', 'chunk_size': 2, 'history_frames': 1,
               'bags': ['ep'], 'frames': 4, 'action_sources': ['x'], 'control_rate_hz': 20.0, 'rotate_180': True,
               'actions': action_scores([run], action_scale=(0.05,) * 3 + (0.5,) * 3 + (1.0,), control_rate_hz=20.0)}
    import matplotlib

    matplotlib.use('Agg')
    import matplotlib.pyplot as plt

    figures = []
    original = plt.Figure.savefig

    def keep(fig, *args, **kwargs):
        figures.append(fig)
        return original(fig, *args, **kwargs)

    plt.Figure.savefig = keep
    try:
        paths = write_report(tmp_path, summary, [run])
    finally:
        plt.Figure.savefig = original
    traces, hists, strip = figures
    assert traces.axes[0].get_ylabel() == 'dx\n(m per step)' and traces.axes[3].get_ylabel() == 'droll\n(rad per step)'
    assert traces.axes[-1].get_xlabel() == 'time since the first frame (s)'
    assert traces.axes[0].lines[1].get_xdata()[-1] == pytest.approx(0.15)  # seconds, not frame numbers
    assert traces.axes[0].lines[1].get_ydata()[0] == pytest.approx(0.5 * 0.05)  # metres
    assert hists.axes[0].get_xlabel() == 'policy − recorded (m)' and hists.axes[0].get_ylabel() == 'commands'
    assert 'positive: the policy commanded more' in hists._suptitle.get_text()
    shown = strip.axes[0].images[0].get_array()
    assert shown[-1].mean() == 255 and shown[0].mean() == 0  # turned 180°: the band is at the bottom
    assert paths['markdown'].read_text().count('| jerk |') == 1

    from worldvla_ros.evaluation.report import markdown

    run.executed = run.executed[::2]  # no three consecutive commands: no jerk, and no empty table for it
    summary['actions'] = action_scores([run], action_scale=(0.05,) * 6 + (1.0,), control_rate_hz=20.0)
    text = markdown(summary)
    assert '## Actions in physical units' in text and '| jerk |' not in text


def test_chunk_merge_is_applied_and_every_choice_is_reported(tmp_path: Path, eval_checkpoint: Path) -> None:
    """Overlapping chunks (a new one every 2 frames): the report gives seam jerk for replace and ensemble,
    computed on the same chunks; the choice used drives the main scores. Checked against the recorded chunks
    themselves, so it holds whatever actions the tiny model happens to produce on this machine."""
    from worldvla_ros.evaluation.cli import build_parser, run
    from worldvla_ros.evaluation.report import write_report

    frames, actions, instruction = synthetic_episode(frames=14, seed=4, size=64)
    bag = write_episode(tmp_path / 'bag', frames, actions, instruction)
    out = tmp_path / 'report'
    args = build_parser().parse_args([str(bag), '--checkpoint', str(eval_checkpoint), '--device', 'cpu', '--out',
                                      str(out), '--no-world-model', '--replan-every', '2', '--chunk-merge',
                                      'ensemble', '--ensemble-decay', '0', '--no-progress'])
    r, runs = run(args)
    write_report(out, r, runs)
    assert '## Chunk merge' in (out / 'report.md').read_text()
    merge = json.loads((out / 'report.json').read_text())['chunk_merge']
    assert merge['used'] == 'ensemble' and merge['ensemble_decay'] == 0.0
    assert merge['by_choice']['ensemble']['jerk_at_seams'] == r['actions']['physical']['jerk_at_seams']
    assert merge['by_choice']['ensemble']['l1'] == r['actions']['physical']['l1']
    chunks = runs[0].chunks
    assert [c.frame for c in chunks] == list(range(0, 14, 2)) and all(len(c.actions) == K for c in chunks)
    covering = {t: [c.actions[t - c.frame] for c in chunks if c.frame <= t < c.frame + K] for t in range(14)}
    executed = {e.gt_index: e.action for e in runs[0].executed}
    assert sorted(executed) == list(range(14))
    for t, preds in covering.items():  # decay 0: the plain mean of every chunk covering the step
        assert np.allclose(executed[t], np.mean(preds, axis=0))
    if any(not np.allclose(p, preds[0]) for preds in covering.values() for p in preds):
        assert merge['by_choice']['replace']['l1'] != merge['by_choice']['ensemble']['l1']
    bad = _cli(str(bag), '--checkpoint', str(eval_checkpoint), '--out', str(tmp_path / 'bad'), '--chunk-merge',
               'ensemble', '--ensemble-decay', '-1')
    assert bad.returncode == 2 and 'ensemble decay' in bad.stderr
