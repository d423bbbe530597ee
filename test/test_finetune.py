"""worldvla_finetune on a tiny checkpoint of the published layout and bags written by the tests, whose
actions span ranges unlike LIBERO's (a few cm per step instead of ±0.94)."""
from __future__ import annotations

import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from worldvla_ros.evaluation.bag_io import BagWriter
from worldvla_ros.evaluation.convert import synthetic_episode
from worldvla_ros.evaluation.episode import write_episode
from worldvla_ros.train.finetune import main as finetune

SCALE = np.array([0.05, 0.05, 0.05, 0.1, 0.1, 0.1, 1.0])  # the robot's actions: metres and radians per step


def _episode_bag(path: Path, seed: int, frames: int = 12) -> Path:
    images, actions, instruction = synthetic_episode(frames=frames, seed=seed, size=64)
    return write_episode(path, images, actions * SCALE, instruction)


@pytest.fixture(scope='module')
def data(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    from worldvla_ros.model import make_tiny_checkpoint

    root = tmp_path_factory.mktemp('finetune')
    for i in range(5):
        _episode_bag(root / 'train' / f'ep{i}', seed=i)
    _episode_bag(root / 'val' / 'held', seed=50)
    return {'ckpt': make_tiny_checkpoint(root / 'ckpt'), 'train': root / 'train', 'val': root / 'val',
            'cache': root / 'cache'}


def _args(data: dict[str, Path], out: Path, *extra: str) -> list[str]:
    return ['--init', str(data['ckpt']), '--data', str(data['train']), '--val-data', str(data['val']), '--out',
            str(out), '--cache-dir', str(data['cache']), '--no-progress', '--batch-size', '4', '--val-imagine', '0',
            *extra]


def _weights(out: Path) -> dict[str, torch.Tensor]:
    return {k: v for f in sorted(out.glob('model-*.safetensors')) for k, v in load_file(f).items()}


def test_full_fine_tuning_lowers_held_out_loss_and_the_checkpoint_uses_the_data_ranges(data, tmp_path: Path,
                                                                                         capsys) -> None:
    from worldvla_ros.model import load_policy

    out = tmp_path / 'full'
    assert finetune(_args(data, out, '--method', 'full', '--steps', '24', '--lr', '3e-3', '--eval-every', '12',
                          '--val-imagine', '1')) == 0
    printed = capsys.readouterr().out
    assert 'action tokenizer ranges (quantile' in printed and 'your data' in printed  # shown before training
    log = json.loads((out / 'train_log.json').read_text())
    evals = log['validation']
    assert [e['step'] for e in evals] == [0, 12, 24]
    assert min(e['loss_action'] for e in evals[1:]) < 0.8 * evals[0]['loss_action'], evals
    assert log['best']['step'] > 0 and log['best']['score'] == min(e['loss_action'] for e in evals)
    assert all(5.0 < e['imagined_psnr_db'] <= 100.0 for e in evals)  # the world model imagined, and was scored

    recorded = np.concatenate([synthetic_episode(12, s, 64)[1] * SCALE for s in range(5)])
    policy = load_policy(out, device='cpu')
    cfg = policy.config
    assert cfg.action_max[0] < 0.06 and cfg.action_min[0] > -0.06  # metres per step, not LIBERO's ±0.94
    assert cfg.action_min[6] == -1.0 and cfg.action_max[6] == 1.0
    lo, hi = np.quantile(recorded[:, :6], 0.01, axis=0), np.quantile(recorded[:, :6], 0.99, axis=0)
    assert cfg.action_min[:6] == pytest.approx(tuple(lo)) and cfg.action_max[:6] == pytest.approx(tuple(hi))
    frame = synthetic_episode(12, 50, 64)[0][0]
    chunk = policy.predict([frame], 'put the red block in the bowl').actions
    assert np.all(np.abs(chunk[:, :3]) <= 0.06)  # decoded into the robot's ranges
    for name in ('README.md', 'loss_curve.png', 'tokenizer/vqgan.ckpt'):
        assert (out / name).is_file(), name
    assert set(_weights(out)) == set(_weights(data['ckpt']))  # the published layout: the source's tensors
    from release_rules import release_layout_problems

    assert release_layout_problems(out) == []  # the release's model class loads it as it is


def test_lora_merged_checkpoint_gives_the_adapter_models_logits(data, tmp_path: Path) -> None:
    from peft import PeftModel

    from worldvla_ros.model import load_policy
    from worldvla_ros.model.checkpoint import find_checkpoint_files, load_backbone, read_config
    from worldvla_ros.model.text_tokenizer import TextTokenizer

    out = tmp_path / 'lora'
    assert finetune(_args(data, out, '--method', 'lora', '--steps', '6', '--lr', '1e-2', '--lora-rank', '4',
                          '--eval-every', '3')) == 0
    merged = load_policy(out, device='cpu', dtype='float32').lm
    files = find_checkpoint_files(data['ckpt'])
    base = load_backbone(files, read_config(files), TextTokenizer(files.text_tokenizer).vocab(), torch.device('cpu'),
                         torch.float32)
    adapter = PeftModel.from_pretrained(base, str(out / 'adapter')).eval()
    ids = torch.randint(4, 8000, (2, 40))
    with torch.no_grad():
        a = adapter(input_ids=ids).logits
        b = merged(input_ids=ids).logits
        with adapter.disable_adapter():
            c = adapter(input_ids=ids).logits
    assert (a - c).abs().max() > 1e-3  # the adapter changed something
    torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)


def test_a_killed_run_resumes_to_the_weights_of_an_uninterrupted_one(data, tmp_path: Path) -> None:
    common = ('--method', 'full', '--steps', '7', '--lr', '1e-3', '--eval-every', '3', '--save-every', '1',
              '--seed', '3')
    whole = tmp_path / 'whole'
    assert finetune(_args(data, whole, *common)) == 0

    killed = tmp_path / 'killed'
    cmd = [sys.executable, '-m', 'worldvla_ros.train.finetune', *_args(data, killed, *common)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    state = killed / 'run' / 'state.pt'
    end = time.monotonic() + 120
    while time.monotonic() < end and proc.poll() is None:
        if state.is_file():
            step = torch.load(state, weights_only=False)['trainer']['step']
            if step >= 3:
                break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (killed / 'train_log.json').is_file(), 'the run finished before it was killed'
    stopped = torch.load(state, weights_only=False)['trainer']['step']
    assert 3 <= stopped < 7

    assert finetune(['--out', str(killed), '--data', str(data['train'])]) == 2  # a run is there: never overwritten
    assert finetune(['--out', str(killed), '--resume', '--no-progress']) == 0
    a, b = _weights(whole), _weights(killed)
    assert set(a) == set(b)
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=0, atol=0, msg=k)
    assert json.loads((killed / 'train_log.json').read_text())['best'] == json.loads(
        (whole / 'train_log.json').read_text())['best']


@pytest.mark.timeout(300)
# LoRA under DDP (the same Trainer split, a stock wrapper) runs with -m slow: CI has 15 minutes
@pytest.mark.parametrize('method', ['full', pytest.param('lora', marks=pytest.mark.slow)])
def test_two_processes_under_torchrun_follow_the_single_process_loss_curve(data, tmp_path: Path, method: str) -> None:
    """2 processes × 2 sequences against 1 process × 4, the same global batches: full fine-tuning sharded with
    FSDP (gloo on this CPU); with method lora the same job under DDP."""
    # the release's objective without its dropout: dropout's masks are drawn per process, the rest is exact
    common = ('--method', method, '--steps', '4', '--lr', '1e-2' if method == 'lora' else '1e-3', '--eval-every',
              '4', '--seed', '1', '--dropout', '0')
    single = tmp_path / 'single'
    assert finetune(_args(data, single, *common)) == 0
    pair = tmp_path / 'pair'
    env = {**os.environ, 'OMP_NUM_THREADS': '1'}
    run = subprocess.run([sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node', '2',
                          '-m', 'worldvla_ros.train.finetune', *_args(data, pair, *common),
                          *(['--fsdp'] if method == 'full' else [])],
                         capture_output=True, text=True, timeout=280, env=env)
    assert run.returncode == 0, run.stderr[-3000:]
    one = json.loads((single / 'train_log.json').read_text())
    two = json.loads((pair / 'train_log.json').read_text())
    assert two['processes'] == 2 and one['processes'] == 1 and two['fsdp'] is (method == 'full')
    # same batches, same normalization: equal up to float32 summation order (tolerance 1e-4 relative)
    np.testing.assert_allclose([e['loss'] for e in two['log']], [e['loss'] for e in one['log']], rtol=1e-4)
    a, b = _weights(single), _weights(pair)
    assert max(float((a[k] - b[k]).abs().max()) for k in a) < 1e-4  # the written checkpoints agree too


def test_bad_data_and_an_occupied_out_directory_are_clear_errors(data, tmp_path: Path, capsys) -> None:
    from worldvla_ros.evaluation.bag_io import FLOAT_ARRAY, IMAGE, STRING, image_msg, string_msg, typestore

    images, actions, instruction = synthetic_episode(frames=12, seed=7, size=64)

    def one_bag(name: str, acts: np.ndarray, frames: list | None = None) -> Path:
        return write_episode(tmp_path / 'bad' / name / 'bag', frames or images, acts, instruction)

    nan = actions.copy()
    nan[5, 2] = np.nan
    huge, extreme = actions.copy(), actions.copy()
    huge[4, 0], extreme[6, 1] = 1e300, -1.7e308
    no_actions = tmp_path / 'bad' / 'none' / 'bag'
    no_actions.parent.mkdir(parents=True)
    with BagWriter(no_actions, 'mcap') as bag:
        bag.write('/camera/image_raw', IMAGE, 1, image_msg(images[0], 1))
        bag.write('/instruction', STRING, 1, string_msg('x'))
    three = tmp_path / 'bad' / 'three' / 'bag'
    three.parent.mkdir(parents=True)
    T = typestore().types  # noqa: N806
    with BagWriter(three, 'mcap') as bag:
        for i in range(4):
            bag.write('/camera/image_raw', IMAGE, i * 10**8, image_msg(images[i], i * 10**8))
            bag.write('/arm/command', FLOAT_ARRAY, i * 10**8, T[FLOAT_ARRAY](
                layout=T['std_msgs/msg/MultiArrayLayout'](dim=[], data_offset=0), data=np.zeros(3)))
        bag.write('/instruction', STRING, 0, string_msg('x'))
    cases = {
        no_actions.parent: 'no ground-truth action topic',
        one_bag('nan', nan).parent: 'NaN or infinite actions at frames [5]',
        one_bag('huge', huge).parent: 'bag (/teleop/ee_command [worldvla/msg/EndEffectorCommand]): actions beyond '
                                      '±100 action units at frames [4]',
        one_bag('extreme', extreme).parent: 'actions beyond ±100 action units at frames [6]',
        one_bag('short', actions[:2], images[:2]).parent: 'needs at least 3',
        three.parent: 'a Float64MultiArray action has 3 values',
        write_episode(tmp_path / 'bad' / 'wordy' / 'bag', images, actions, 'go ' * 300).parent:
            'the model refuses its instruction',
        tmp_path / 'nowhere': 'no such bag or directory',
    }
    for bags, says in cases.items():
        out = tmp_path / f'out_{bags.name}'
        capsys.readouterr()
        code = finetune(['--init', str(data['ckpt']), '--data', str(bags), '--out', str(out), '--no-progress',
                         '--cache-dir', ''])
        err = capsys.readouterr().err
        assert code == 2 and says in err, (bags, err)
        assert not (out / 'config.json').exists()

    full = tmp_path / 'occupied'
    full.mkdir()
    (full / 'notes.txt').write_text('mine')
    assert finetune(_args(data, full, '--steps', '1')) == 2
    assert 'is not empty' in capsys.readouterr().err and (full / 'notes.txt').read_text() == 'mine'
    assert finetune(['--out', str(tmp_path / 'never'), '--resume']) == 2
    assert 'holds no run to resume' in capsys.readouterr().err
    zero = tmp_path / 'zero' / 'run'
    zero.mkdir(parents=True)
    (zero / 'args.json').symlink_to('/dev/zero')  # read whole, it would fill memory
    assert finetune(['--out', str(zero.parent), '--resume']) == 2
    assert 'not a regular file' in capsys.readouterr().err
    assert finetune(_args(data, tmp_path / 'x', '--world-fraction', '1.5')) == 2
    assert finetune(['--init', str(tmp_path / 'no_ckpt'), '--data', str(data['train']), '--out',
                     str(tmp_path / 'y'), '--no-progress']) == 1


def test_the_token_cache_is_reused_and_follows_the_bags(data, tmp_path: Path) -> None:
    from worldvla_ros.evaluation.episode import TopicMap
    from worldvla_ros.model import load_policy
    from worldvla_ros.train.finetune_data import bag_paths, load_episodes, tokenizer_key

    policy = load_policy(data['ckpt'], device='cpu')
    calls: list[int] = []

    def encode(frames: list) -> list:
        calls.append(len(frames))
        return policy.images.encode(frames)

    root = tmp_path / 'bags'
    _episode_bag(root / 'a', seed=1)
    _episode_bag(root / 'b', seed=2)
    key = tokenizer_key(data['ckpt'] / 'tokenizer' / 'vqgan.ckpt', 256, True, policy.text.vocab())
    cache = tmp_path / 'cache'
    first = load_episodes(bag_paths([root]), TopicMap(), None, encode, key, cache, 3)
    assert sum(calls) == 24 and len(list(cache.iterdir())) == 2
    again = load_episodes(bag_paths([root]), TopicMap(), None, encode, key, cache, 3)
    assert sum(calls) == 24  # nothing decoded or encoded again
    for x, y in zip(first, again, strict=True):
        assert np.array_equal(x.blocks, y.blocks) and np.array_equal(x.actions, y.actions)
    shutil.rmtree(root / 'b')
    _episode_bag(root / 'b', seed=3)  # the bag changed
    load_episodes(bag_paths([root]), TopicMap(), None, encode, key, cache, 3)
    assert sum(calls) == 36
    load_episodes(bag_paths([root]), TopicMap(), None, encode, key + 'x', cache, 3)  # another tokenizer
    assert sum(calls) == 60


def test_world_only_bags_train_the_world_model_and_never_the_policy(data, tmp_path: Path, capsys) -> None:
    world = tmp_path / 'pause_bags'
    for i in range(2):
        _episode_bag(world / f'pauses{i}', seed=70 + i)
    out = tmp_path / 'run'
    assert finetune(_args(data, out, '--method', 'full', '--steps', '1', '--eval-every', '1', '--world-only-data',
                          str(world))) == 0
    log = json.loads((out / 'train_log.json').read_text())
    # 5 training bags of 12 frames: 12 action-model and 11 world-model sequences each; the 2 world-only bags:
    # 11 world-model sequences each and no action-model sequence
    assert log['train_sequences'] == 5 * (12 + 11) + 2 * 11
    assert log['world_only_bags'] == [str(world / 'pauses0'), str(world / 'pauses1')]
    assert finetune(_args(data, tmp_path / 'a', '--mode', 'action', '--world-only-data', str(world))) == 2
    assert '--mode joint or world' in capsys.readouterr().err
    assert finetune(_args(data, tmp_path / 'b', '--world-only-data', str(data['train'] / 'ep0'))) == 2
    assert 'both as --world-only-data and as --data' in capsys.readouterr().err


def test_resume_reads_the_same_files_from_any_directory_and_refuses_changed_inputs(data, tmp_path: Path,
                                                                                   monkeypatch, capsys) -> None:
    """A run started with relative paths stores them absolute, with digests of its checkpoint and bags: a resume
    from elsewhere continues on the same files, and one whose bags changed is refused (not trained on)."""
    work = tmp_path / 'work'
    shutil.copytree(data['train'], work / 'bags')
    shutil.copytree(data['val'], work / 'held')
    monkeypatch.chdir(work)
    common = ['--method', 'full', '--steps', '2', '--save-every', '1', '--eval-every', '2', '--batch-size', '4',
              '--no-progress', '--val-imagine', '0', '--cache-dir', str(data['cache'])]
    assert finetune(['--init', str(data['ckpt']), '--data', 'bags', '--val-data', 'held', '--out', 'run_a',
                     *common]) == 0
    stored = json.loads((work / 'run_a' / 'run' / 'args.json').read_text())
    assert stored['data'] == [str(work / 'bags')] and stored['val_data'] == [str(work / 'held')]
    assert set(stored['inputs']) == {'initial checkpoint', 'data'}
    elsewhere = tmp_path / 'elsewhere'
    (elsewhere / 'bags').mkdir(parents=True)  # other data at the same relative path must not be picked up
    monkeypatch.chdir(elsewhere)
    assert finetune(['--out', str(work / 'run_a'), '--resume', '--no-progress']) == 0
    bag = next((work / 'bags').iterdir())
    victim = next(p for p in bag.rglob('*') if p.is_file() and p.suffix == '.mcap')
    os.utime(victim, ns=(victim.stat().st_atime_ns, victim.stat().st_mtime_ns + 10**9))
    capsys.readouterr()
    assert finetune(['--out', str(work / 'run_a'), '--resume', '--no-progress']) == 2
    assert 'data changed since it started' in capsys.readouterr().err


def test_a_full_disk_is_said_as_such_and_leaves_no_temporaries(data, tmp_path: Path) -> None:
    """The run directory on a 2 MB filesystem (a tmpfs in a mount namespace of its own: a real full disk): the
    first save fails for want of space. One clear line naming the file, exit 3, no traceback, and no *.tmp left,
    also after a retry with --resume (before: raw tracebacks, exit 1, a .tmp per retry)."""
    if shutil.which('unshare') is None:
        pytest.skip('needs unshare (util-linux) for a mount namespace with a small tmpfs')
    out = tmp_path / 'small'
    out.mkdir()
    first = ' '.join(map(shlex.quote, [sys.executable, '-m', 'worldvla_ros.train.finetune',
                                       *_args(data, out, '--method', 'full', '--steps', '2')]))
    again = ' '.join(map(shlex.quote, [sys.executable, '-m', 'worldvla_ros.train.finetune', '--out', str(out),
                                       '--resume', '--no-progress']))
    script = (f'mount -t tmpfs -o size=2m tmpfs {shlex.quote(str(out))} || exit 99; '
              f'{first}; echo "rc=$?"; find {shlex.quote(str(out))} -name "*.tmp"; echo ---; '
              f'{again}; echo "rc=$?"; find {shlex.quote(str(out))} -name "*.tmp"')
    proc = subprocess.run(['unshare', '-rm', 'sh', '-c', script], capture_output=True, text=True, timeout=300)
    if proc.returncode == 99:
        pytest.skip(f'cannot mount a tmpfs here: {proc.stderr.strip()[:200]}')
    seen = [line for line in proc.stdout.splitlines() if line.startswith(('rc=', '---')) or line.endswith('.tmp')]
    assert seen == ['rc=3', '---', 'rc=3'], proc.stdout[-2000:] + proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if 'worldvla_finetune: error' in line]
    assert len(errors) == 2 and all('disk full' in e and str(out / 'run') in e for e in errors), proc.stderr[-3000:]
    assert 'Traceback' not in proc.stderr


def test_the_release_objective_equals_its_formula_on_one_batch(data) -> None:
    """One batch of action and world-model sequences (answers labelled whole, as the release does): the trainer's
    loss equals a hand computation of the release's: CrossEntropyLoss(weight=w) over all 65536 logits, w = 1 but
    0.04 on ids 3 … 8194, plus 1e-5 × mean(logsumexp(logits)²) over the labelled positions."""
    from dataclasses import replace

    import torch.nn.functional as F

    from worldvla_ros.model import tokens as T
    from worldvla_ros.model.action_tokenizer import ActionTokenizer
    from worldvla_ros.model.checkpoint import find_checkpoint_files, load_backbone, read_config, worldvla_settings
    from worldvla_ros.model.text_tokenizer import TextTokenizer
    from worldvla_ros.train.sequences import action_samples, collate, world_model_samples
    from worldvla_ros.train.trainer import RELEASE_OBJECTIVE, EmitHead, Trainer, TrainSettings

    files = find_checkpoint_files(data['ckpt'])
    cfg = worldvla_settings(read_config(files), files.root)
    text = TextTokenizer(files.text_tokenizer)
    lm = load_backbone(files, read_config(files), text.vocab(), torch.device('cpu'), torch.float32)
    tok = ActionTokenizer(cfg.action_min, cfg.action_max)
    rng = np.random.default_rng(0)
    per_image = cfg.resolution // 16
    blocks = [[T.IMAGE_START, T.grid_token(cfg.resolution), T.grid_token(cfg.resolution),
               *[x for _ in range(per_image) for x in (*rng.integers(4, 8196, per_image).tolist(), T.IMAGE_NEWLINE)],
               T.IMAGE_END] for _ in range(3)]
    actions = rng.uniform(-0.5, 0.5, (3, 7))
    world = world_model_samples(blocks, actions, text, tok, cfg, label_structure=True)
    batch = action_samples(blocks, actions, 'pick it up', text, tok, cfg)[:2] + world
    assert world[0].target[-len(blocks[1]) - 1:].all() and world[0].ids[-1] == T.END_OF_TURN  # whole answer
    objective = replace(RELEASE_OBJECTIVE, dropout=0.0)  # the formula's terms; dropout is checked below
    trainer = Trainer(EmitHead(lm, None), lm, batch, torch.arange(10), TrainSettings(
        steps=1, batch_size=4, bf16=False, zero_other_rows=False, objective=objective))
    got = trainer.objective_loss(batch)

    ids, mask, positions, target = collate(batch)
    with torch.no_grad():  # the release's forward: no image-logit mask (its mask_image_logits is off)
        logits = lm.lm_head(lm.model(input_ids=ids, attention_mask=mask, position_ids=positions).last_hidden_state)
    labels = torch.where(target, ids, torch.full_like(ids, -100))
    shift_logits, shift_labels = logits[:, :-1].float(), labels[:, 1:]
    weights = torch.ones(T.VOCAB_SIZE)
    weights[3:8195] = 0.04
    ce = F.cross_entropy(shift_logits.reshape(-1, T.VOCAB_SIZE), shift_labels.reshape(-1), weight=weights)
    z = torch.logsumexp(shift_logits, -1).pow(2)[shift_labels >= 0].mean()
    torch.testing.assert_close(got, ce + 1e-5 * z, rtol=1e-5, atol=1e-6)

    # residual dropout 0.05 on every layer's attention and MLP output: random in training, off in evaluation
    dropping = Trainer(EmitHead(lm, None), lm, batch, torch.arange(10), TrainSettings(
        steps=1, batch_size=4, bf16=False, zero_other_rows=False, objective=RELEASE_OBJECTIVE))
    assert len(dropping.dropout_hooks) == 2 * lm.config.num_hidden_layers
    lm.train()
    with torch.no_grad():
        a, b = dropping.objective_loss(batch), dropping.objective_loss(batch)
    assert not torch.equal(a, b)
    lm.eval()
    with torch.no_grad():
        torch.testing.assert_close(dropping.objective_loss(batch), got)
    for h in dropping.dropout_hooks:
        h.remove()


def test_the_objective_follows_the_checkpoint_unless_told(data) -> None:
    from argparse import Namespace

    from worldvla_ros.model.config import WorldVLAConfig
    from worldvla_ros.train.finetune import UsageError, choose_objective
    from worldvla_ros.train.trainer import COMPACT_OBJECTIVE, RELEASE_OBJECTIVE

    none = dict(image_loss_weight=None, z_loss=None, dropout=None, softmax=None)
    assert choose_objective(Namespace(objective='auto', **none), WorldVLAConfig()) == ('release', RELEASE_OBJECTIVE)
    bundled_like = WorldVLAConfig(extra={'objective': 'compact'})
    assert choose_objective(Namespace(objective='auto', **none), bundled_like) == ('compact', COMPACT_OBJECTIVE)
    name, obj = choose_objective(Namespace(objective='release', **{**none, 'z_loss': 0.0}), bundled_like)
    assert name == 'release with z_loss 0.0' and obj.z_loss == 0.0 and obj.image_weight == 0.04
    with pytest.raises(UsageError):
        choose_objective(Namespace(objective='release', **{**none, 'dropout': 1.5}), bundled_like)
