"""Every broken checkpoint gives a CheckpointError naming the file and the reason."""
from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import pytest
import torch

from worldvla_ros.model import CheckpointError, load_policy


@pytest.fixture
def ckpt(tiny_checkpoint: Path, tmp_path: Path) -> Path:
    dst = tmp_path / 'ckpt'
    shutil.copytree(tiny_checkpoint, dst)
    return dst


def _shards(root: Path) -> list[Path]:
    return sorted(root.glob('*.safetensors'))


def test_missing_directory(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match='does not exist'):
        load_policy(tmp_path / 'nope', device='cpu')


def test_missing_config(ckpt: Path) -> None:
    (ckpt / 'config.json').unlink()
    with pytest.raises(CheckpointError, match='no config.json'):
        load_policy(ckpt, device='cpu')


def test_wrong_model_type(ckpt: Path) -> None:
    cfg = json.loads((ckpt / 'config.json').read_text())
    cfg['model_type'] = 'llama'
    (ckpt / 'config.json').write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="expected 'chameleon'"):
        load_policy(ckpt, device='cpu')


def test_missing_shard(ckpt: Path) -> None:
    _shards(ckpt)[1].unlink()
    with pytest.raises(CheckpointError, match='shards named in the index are missing'):
        load_policy(ckpt, device='cpu')


def test_truncated_shard(ckpt: Path) -> None:
    shard = _shards(ckpt)[0]
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=rf'{shard.name}: unreadable or truncated'):
        load_policy(ckpt, device='cpu')


def test_garbage_shard(ckpt: Path) -> None:
    _shards(ckpt)[0].write_bytes(b'\x00' * 64)
    with pytest.raises(CheckpointError, match='unreadable or truncated'):
        load_policy(ckpt, device='cpu')


def test_shape_mismatch(ckpt: Path) -> None:
    cfg = json.loads((ckpt / 'config.json').read_text())
    cfg['intermediate_size'] = 96
    (ckpt / 'config.json').write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=r'mlp.*has shape .*config.json implies'):
        load_policy(ckpt, device='cpu')


def test_missing_tensors(ckpt: Path) -> None:
    cfg = json.loads((ckpt / 'config.json').read_text())
    cfg['num_hidden_layers'] = 3
    (ckpt / 'config.json').write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=r'tensors missing from the weights: model\.layers\.2\.'):
        load_policy(ckpt, device='cpu')


def test_vqgan_ckpt_needing_unpickling_code(ckpt: Path) -> None:
    path = ckpt / 'tokenizer' / 'vqgan.ckpt'
    state = torch.load(path, weights_only=True)
    state['hyper_parameters'] = argparse.Namespace(lr=1.0)  # an arbitrary Python object
    torch.save(state, path)
    with pytest.raises(CheckpointError, match='refusing to unpickle'):
        load_policy(ckpt, device='cpu')


def test_vqgan_ckpt_not_matching_yaml(ckpt: Path) -> None:
    yaml_path = ckpt / 'tokenizer' / 'vqgan.yaml'
    yaml_path.write_text(yaml_path.read_text().replace('num_res_blocks: 1', 'num_res_blocks: 2'))
    with pytest.raises(CheckpointError, match='does not match vqgan.yaml'):
        load_policy(ckpt, device='cpu')


def test_truncated_vqgan_ckpt(ckpt: Path) -> None:
    path = ckpt / 'tokenizer' / 'vqgan.ckpt'
    path.write_bytes(path.read_bytes()[:1000])
    with pytest.raises(CheckpointError, match='vqgan.ckpt'):
        load_policy(ckpt, device='cpu')


def test_missing_tokenizer(ckpt: Path) -> None:
    shutil.rmtree(ckpt / 'tokenizer')
    with pytest.raises(CheckpointError, match='no tokenizer directory'):
        load_policy(ckpt, device='cpu')


def test_text_tokenizer_with_wrong_ids(ckpt: Path) -> None:
    path = ckpt / 'tokenizer' / 'text_tokenizer.json'
    data = json.loads(path.read_text())
    vocab = data['model']['vocab']
    vocab['<racm3:break>'], vocab['<eoss>'] = vocab['<eoss>'], vocab['<racm3:break>']
    data['added_tokens'] = [t for t in data['added_tokens'] if t['content'] not in ('<racm3:break>', '<eoss>')]
    path.write_text(json.dumps(data))
    with pytest.raises(CheckpointError, match='WorldVLA needs'):
        load_policy(ckpt, device='cpu')


@pytest.mark.parametrize('resolution', [100, 0])
def test_wrong_resolution(ckpt: Path, resolution: int) -> None:
    with pytest.raises(CheckpointError, match='resolution'):
        load_policy(ckpt, device='cpu', resolution=resolution)


def test_unknown_device_and_dtype(ckpt: Path) -> None:
    if not torch.cuda.is_available():
        with pytest.raises(CheckpointError, match='CUDA is not available'):
            load_policy(ckpt, device='cuda')
    with pytest.raises(CheckpointError, match='unknown dtype'):
        load_policy(ckpt, device='cpu', dtype='int3')


def test_release_layout_and_settings(tiny_checkpoint: Path, tmp_path: Path) -> None:
    """model_256/libero_10 + chameleon/tokenizer, config.json without our `worldvla` key."""
    root = tmp_path / 'WorldVLA'
    model_dir = root / 'model_256' / 'libero_10'
    shutil.copytree(tiny_checkpoint, model_dir)
    shutil.move(str(model_dir / 'tokenizer'), str(root / 'chameleon' / 'tokenizer'))
    cfg = json.loads((model_dir / 'config.json').read_text())
    del cfg['worldvla']
    (model_dir / 'config.json').write_text(json.dumps(cfg))
    policy = load_policy(model_dir, device='cpu')
    assert policy.chunk_size == 10 and policy.resolution == 256 and policy.config.rotate_180
    assert policy.model_id.startswith('libero_10@')
    assert load_policy(model_dir, device='cpu', chunk_size=3).chunk_size == 3


def test_bfloat16_loading(tiny_checkpoint: Path, frames) -> None:
    policy = load_policy(tiny_checkpoint, device='cpu', dtype='bfloat16')
    assert policy.lm.lm_head.weight.dtype == torch.bfloat16
    assert policy.predict_actions(frames, 'stack the blocks').shape[1] == 7


def test_every_checkpoint_the_package_writes_loads_in_the_releases_model_class(tmp_path: Path) -> None:
    """The bundled model and the tiny checkpoints follow the release's q/k-norm rule (fine-tuning and training
    outputs are checked where those tests write them). Before: the bundled model stored a row per head with
    no model_parallel_size, and the release's class refused it."""
    from release_rules import release_layout_problems

    from worldvla_ros.model import make_tiny_checkpoint
    from worldvla_ros.sim.bundled import bundled_checkpoint

    assert release_layout_problems(bundled_checkpoint()) == []
    assert release_layout_problems(make_tiny_checkpoint(tmp_path / 'tiny')) == []


def test_per_head_norms_are_written_exactly_and_load_back_to_the_same_logits(tmp_path: Path) -> None:
    """A model whose q/k-norm rows differ per head (any trained one): written with model_parallel_size = heads,
    loaded back to the same logits (the training writer used to keep only the first row)."""
    import torch
    from release_rules import release_layout_problems

    from worldvla_ros.model.checkpoint import find_checkpoint_files, load_backbone, read_config
    from worldvla_ros.model.config import TINY_BACKBONE, TINY_VQGAN, WorldVLAConfig
    from worldvla_ros.model.text_tokenizer import TextTokenizer
    from worldvla_ros.model.tiny import build_lm, build_vocab, write_checkpoint
    from worldvla_ros.model.vqgan import VQGAN

    vocab = build_vocab()
    lm = build_lm(TINY_BACKBONE, TINY_VQGAN, vocab)
    torch.manual_seed(0)
    with torch.no_grad():
        for name, p in lm.named_parameters():
            if '_norm.' in name and ('q_norm' in name or 'k_norm' in name):
                p.add_(torch.randn_like(p) * 0.3)
    out = write_checkpoint(tmp_path / 'per_head', lm, TINY_BACKBONE, VQGAN(TINY_VQGAN), vocab,
                           WorldVLAConfig(resolution=TINY_VQGAN.resolution))
    assert json.loads((out / 'config.json').read_text())['model_parallel_size'] == TINY_BACKBONE.num_attention_heads
    assert release_layout_problems(out) == []
    files = find_checkpoint_files(out)
    back = load_backbone(files, read_config(files), TextTokenizer(files.text_tokenizer).vocab(), torch.device('cpu'),
                         torch.float32)
    ids = torch.randint(4, 8000, (1, 30))
    with torch.no_grad():
        torch.testing.assert_close(back(input_ids=ids).logits, lm.eval()(input_ids=ids).logits, rtol=0, atol=1e-5)


def test_norm_rows_the_releases_layout_cannot_hold_are_refused() -> None:
    import torch

    from worldvla_ros.model.checkpoint import release_norm_layout

    shared = {'l.q_norm.weight': torch.ones(4, 8), 'l.k_norm.weight': torch.ones(2, 8)}
    assert release_norm_layout(shared, 4, 2)[1] == 1
    grouped = {'l.q_norm.weight': torch.arange(4.0)[:, None].repeat(1, 8) // 2, 'l.k_norm.weight': torch.eye(2, 8)}
    state, mp = release_norm_layout(grouped, 4, 2)  # q rows shared within each key group: 2 rows
    assert mp == 2 and state['l.q_norm.weight'].shape == (2, 8)
    with pytest.raises(ValueError, match="release's layout"):
        release_norm_layout({'l.q_norm.weight': torch.randn(4, 8), 'l.k_norm.weight': torch.ones(2, 8)}, 4, 2)
