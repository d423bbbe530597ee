"""worldvla_train: train the small WorldVLA of the embedded default on recorded sim episodes.

    worldvla_train --out runs/tabletop                 # records demos if needed; one training run
    worldvla_train --out runs/wm_only --mode world --vqgan-from worldvla_ros/data/tabletop_model

Records ``--episodes`` scripted-expert episodes into ``--data`` (rosbag2) unless bags are there,
trains the VQGAN image tokenizer (or reuses another checkpoint's with ``--vqgan-from``), encodes
every frame, trains the backbone on the paper's mixture of action-model and world-model
sequences under the action attention mask (``--mode joint``; ``action`` or ``world`` for the
ablations), and writes a checkpoint in the published layout (bf16 weights) with
``train_log.json`` and ``loss_curve.png``. The bundled model is a chain of such runs with DAgger
rounds between them: ``scripts/train_dagger_chain.sh``.
"""
from __future__ import annotations

import argparse
import itertools
import json
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from tqdm import tqdm

from worldvla_ros.evaluation.episode import read_episode
from worldvla_ros.model.action_tokenizer import ActionTokenizer
from worldvla_ros.model.checkpoint import find_checkpoint_files, load_backbone, load_vqgan, read_config, resolve_device
from worldvla_ros.model.config import BackboneConfig, VQGANConfig, WorldVLAConfig
from worldvla_ros.model.image_tokenizer import ImageTokenizer, to_model_frame
from worldvla_ros.model.text_tokenizer import TextTokenizer
from worldvla_ros.model.tiny import build_lm, build_text_tokenizer, build_vocab, write_checkpoint
from worldvla_ros.sim.record import SNIPPET_PREFIX

from .code_cache import CodeCache, default_cache_dir
from .finetune_data import DataError, bag_paths, world_only_bag_paths
from .lm_trainer import deepen, emit_ids, init_image_embeddings, train_lm
from .sequences import action_samples, world_model_samples
from .vqgan_trainer import reconstruction_psnr, token_stability, train_vqgan

BACKBONE = BackboneConfig(hidden_size=128, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=4,
                          intermediate_size=512, max_position_embeddings=1024)
VQGAN_CONFIG = VQGANConfig(embed_dim=32, z_channels=64, resolution=64, ch=32, ch_mult=(1, 1, 2, 2),
                           num_res_blocks=1)
SETTINGS = WorldVLAConfig(resolution=64, chunk_size=5, min_actions=5, history_frames=1, rotate_180=False,
                          action_prompt='{instruction}', world_model_prompt='next image:',
                          extra={'objective': 'compact'})  # fine-tuning it later keeps this objective (auto)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog='worldvla_train', description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--out', required=True, help='checkpoint directory to write')
    p.add_argument('--data', default='artifacts/sim_demos', help='directory of episode bags')
    p.add_argument('--episodes', type=int, default=1000, help='recorded if --data has no bags')
    p.add_argument('--mode', choices=('joint', 'action', 'world'), default='joint')
    p.add_argument('--world-only-data', nargs='+', default=[], metavar='BAG',
                   help='bags, or directories of bags, trained on as world-model sequences only (record_demos '
                        '--pauses: the world model sees standing still, the policy never learns to pause)')
    p.add_argument('--steps', type=int, default=9000)
    p.add_argument('--batch-size', type=int, default=24)
    p.add_argument('--lr', type=float, default=2e-3)
    p.add_argument('--bin-sigma', type=float, default=0.0,
                   help='> 0: action-bin targets are a Gaussian over neighbouring bins (σ in bins), not one-hot')
    p.add_argument('--world-fraction', type=float, default=None,
                   help='--mode joint: share of world-model samples in each batch (default: as they come in '
                   'the data, one per transition and one action sample per chunk start)')
    p.add_argument('--vq-steps', type=int, default=800)
    p.add_argument('--vq-batch-size', type=int, default=16)
    p.add_argument('--active-codes', type=int, default=256,
                   help='VQ codes in use (0: all 8192); the rest are retired, the layout stays the release’s')
    p.add_argument('--stability-weight', type=float, default=10.0,
                   help='pull the VQGAN latents of patches unchanged between consecutive frames together (0: off)')
    p.add_argument('--vqgan-from', default='', help='reuse the image tokenizer of this checkpoint')
    p.add_argument('--image-grid', type=int, choices=(8, 16), default=8,
                   help='codes per image side of a new VQGAN (8: 8× downsampling of the 64 px frames, 16: 4×)')
    p.add_argument('--init-from', default='',
                   help='continue training this checkpoint’s backbone (without --vqgan-from a new VQGAN is trained '
                        'and the image tokens’ embeddings start afresh)')
    p.add_argument('--grow-layers', type=int, default=0, metavar='N',
                   help='with --init-from: deepen its backbone to N layers, the new ones starting as identities')
    p.add_argument('--no-codebook-init', action='store_true',
                   help='random image-token embeddings instead of projections of the VQ codebook')
    p.add_argument('--cache-dir', default=str(default_cache_dir()), metavar='DIR',
                   help='keep the VQ codes of the training frames here, named by the tokenizer and the pixels, so '
                        'a run with the same --vqgan-from skips encoding them ("" for none; default: %(default)s)')
    p.add_argument('--checkpoint-every', type=int, default=0, help='also write OUT/step_N every N steps')
    p.add_argument('--fp32', action='store_true', help='no bf16 autocast in the backbone’s forward pass')
    p.add_argument('--diagnostic-frames', type=int, default=256,
                   help='frames (and up to 32 episodes) the VQGAN reconstruction and stability figures use')
    p.add_argument('--seed', type=int, default=0)
    p.add_argument('--threads', type=int, default=0, help='torch CPU threads (0: all cores)')
    p.add_argument('--device', default='auto', help='auto (cuda if available), cpu, cuda, cuda:N')
    size = p.add_argument_group('backbone size (ignored with --init-from: the checkpoint decides)')
    size.add_argument('--hidden-size', type=int, default=BACKBONE.hidden_size)
    size.add_argument('--layers', type=int, default=BACKBONE.num_hidden_layers)
    size.add_argument('--heads', type=int, default=BACKBONE.num_attention_heads)
    size.add_argument('--intermediate-size', type=int, default=0, help='0: 4 × hidden size')
    return p


def vqgan_config(grid: int) -> VQGANConfig:
    downsamples = {8: 3, 16: 2}[grid]
    return replace(VQGAN_CONFIG, ch_mult=VQGAN_CONFIG.ch_mult[-downsamples - 1:])


def backbone_config(args: argparse.Namespace, init_config: dict[str, Any] | None = None) -> BackboneConfig:
    """``init_config``: the config.json of ``--init-from``, which decides the size."""
    if init_config is not None:
        backbone = BackboneConfig.from_hf_dict(init_config)
        if args.grow_layers and args.grow_layers < backbone.num_hidden_layers:
            raise ValueError(f'--grow-layers {args.grow_layers} is fewer layers than {args.init_from} has '
                             f'({backbone.num_hidden_layers})')
        return replace(backbone, num_hidden_layers=args.grow_layers or backbone.num_hidden_layers)
    return BackboneConfig(hidden_size=args.hidden_size, num_hidden_layers=args.layers,
                          num_attention_heads=args.heads, num_key_value_heads=args.heads,
                          intermediate_size=args.intermediate_size or 4 * args.hidden_size,
                          max_position_embeddings=BACKBONE.max_position_embeddings)


class Episode(NamedTuple):
    frames: list[np.ndarray]
    actions: np.ndarray
    instruction: str
    finished: bool  # the task was done at its end (not a snippet)
    for_actions: bool  # also an action-model sample (False: --world-only-data)


def next_frame_index(lengths: list[int]) -> np.ndarray:
    """For frames of episodes laid end to end: the index of the same episode's next frame, −1 after its last."""
    out = np.arange(1, sum(lengths) + 1)
    out[np.cumsum(lengths) - 1] = -1
    return out


def load_frames_and_actions(bags: list[Path], for_actions: bool = True) -> list[Episode]:
    """One ``Episode`` per bag; ``snippet_*`` bags end mid-task."""
    episodes = []
    for bag in tqdm(bags, desc='reading bags', unit='bag', file=sys.stderr):
        ep = read_episode(bag)
        episodes.append(Episode(ep.frames, np.nan_to_num(ep.actions), ep.instruction,
                                not bag.name.startswith(SNIPPET_PREFIX), for_actions))
    return episodes


def loss_curve(path: Path, log: list[dict[str, float]], vq_losses: list[float]) -> None:
    import matplotlib

    matplotlib.use('Agg')
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 3.5))
    smooth = lambda x: np.convolve(x, np.ones(25) / 25, mode='valid') if len(x) > 25 else np.asarray(x)  # noqa: E731
    for key, label in (('loss', 'all'), ('loss_action', 'action tokens'), ('loss_world', 'image tokens')):
        values = [e[key] for e in log if key in e]
        if values:
            axes[0].plot(smooth(values), label=label)
    axes[0].set_yscale('log')
    axes[0].set_title('backbone cross-entropy')
    axes[0].set_xlabel('step')
    axes[0].legend()
    if vq_losses:
        axes[1].plot(smooth(vq_losses))
        axes[1].set_yscale('log')
    axes[1].set_title('VQGAN loss (reconstruction + VQ)')
    axes[1].set_xlabel('step')
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.world_fraction is not None and args.mode != 'joint':
        parser.error('--world-fraction mixes the two kinds of sequences: it needs --mode joint')
    if args.world_fraction is not None and not 0.0 <= args.world_fraction <= 1.0:
        parser.error(f'--world-fraction must lie in [0, 1], got {args.world_fraction}')
    if args.grow_layers and not args.init_from:
        parser.error('--grow-layers deepens the checkpoint of --init-from: give one')
    if args.world_only_data and args.mode == 'action':
        parser.error('--world-only-data trains the world model: use it with --mode joint or world')
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    init = find_checkpoint_files(args.init_from) if args.init_from else None
    init_config = read_config(init) if init else None
    try:
        backbone = backbone_config(args, init_config)
    except ValueError as exc:
        parser.error(str(exc))
    t_start = time.perf_counter()
    data, out = Path(args.data), Path(args.out)
    if not data.is_dir() or not any(data.glob('*/metadata.yaml')):
        from worldvla_ros.sim.record import record_demos

        record_demos(data, args.episodes, seed=0)
    try:
        bags = bag_paths([data])
        world_bags = world_only_bag_paths(args.world_only_data, bags, '--data')
    except DataError as exc:
        parser.error(str(exc))
    episodes = load_frames_and_actions(bags) + load_frames_and_actions(world_bags, for_actions=False)
    cfg = SETTINGS
    # continuing keeps the checkpoint's vocabulary: its embeddings are rows of it (text bytes and image codes)
    vocab = TextTokenizer(init.text_tokenizer).vocab() if init else build_vocab(args.seed)
    with tempfile.TemporaryDirectory() as tmp:
        build_text_tokenizer(vocab).save(f'{tmp}/text_tokenizer.json')
        text = TextTokenizer(f'{tmp}/text_tokenizer.json')
    timings: dict[str, float] = {}

    t0 = time.perf_counter()
    model_frames = np.stack([to_model_frame(f, cfg.resolution, cfg.rotate_180) for fr, *_ in episodes for f in fr])
    vq_losses: list[float] = []
    if args.vqgan_from:
        vqgan = load_vqgan(find_checkpoint_files(args.vqgan_from), device)
    else:
        with tqdm(total=args.vq_steps, desc='VQGAN', file=sys.stderr) as bar:
            vqgan, vq_losses = train_vqgan(
                model_frames, vqgan_config(args.image_grid), args.vq_steps, args.vq_batch_size, seed=args.seed,
                on_step=lambda s, loss: (bar.update(1), bar.set_postfix(loss=f'{loss:.4f}')), device=device,
                active_codes=args.active_codes, next_frame=next_frame_index([len(fr) for fr, *_ in episodes]),
                stability_weight=args.stability_weight)
    timings['vqgan_s'] = time.perf_counter() - t0
    images = ImageTokenizer(vqgan, vocab, cfg.resolution, cfg.rotate_180)
    n_diag = max(1, args.diagnostic_frames)
    recon_psnr = reconstruction_psnr(vqgan, model_frames[:: -(-len(model_frames) // n_diag)])
    starts = np.cumsum([0] + [len(fr) for fr, *_ in episodes])
    per_episode = [model_frames[a:b] for a, b in itertools.pairwise(starts)]
    n_episodes = min(32, max(1, n_diag // 8))
    stability = token_stability(vqgan, per_episode[:: -(-len(episodes) // n_episodes)])

    t0 = time.perf_counter()
    tok = ActionTokenizer(cfg.action_min, cfg.action_max)
    cache = CodeCache(images, Path(args.cache_dir).expanduser() if args.cache_dir else None)
    samples = []
    for frames, actions, instruction, finished, for_actions in tqdm(episodes, desc='tokenizing', unit='episode',
                                                                     file=sys.stderr):
        blocks = [images.codes_to_block(c) for c in cache.codes(frames)]
        if args.mode in ('joint', 'action') and for_actions:
            samples += action_samples(blocks, actions, instruction, text, tok, cfg, finished)
        if args.mode in ('joint', 'world'):
            samples += world_model_samples(blocks, actions, text, tok, cfg)
    timings['tokenize_s'] = time.perf_counter() - t0

    t0 = time.perf_counter()
    torch.manual_seed(args.seed)
    if init:
        lm = load_backbone(init, init_config, vocab, device, torch.float32)
        if args.grow_layers:
            lm = deepen(lm, args.grow_layers, args.seed)
        if not args.vqgan_from:  # a new image tokenizer: the checkpoint's image-token rows meant other codes
            init_image_embeddings(lm, vqgan.quantize.embedding.weight.cpu(), images.img2bpe, args.seed,
                                  random=args.no_codebook_init)
        lm.requires_grad_(True)
    else:
        lm = build_lm(backbone, vqgan.cfg, vocab)
        if not args.no_codebook_init:
            init_image_embeddings(lm, vqgan.quantize.embedding.weight.cpu(), images.img2bpe, args.seed)
        lm = lm.to(device)
    emit = emit_ids(images.image_token_ids, images.codes_to_block(np.zeros((images.grid, images.grid), int))[1])
    with tqdm(total=args.steps, desc=f'backbone ({args.mode})', file=sys.stderr) as bar:
        def on_step(step: int, entry: dict[str, float]) -> None:
            bar.update(1)
            if args.checkpoint_every and (step + 1) % args.checkpoint_every == 0 and step + 1 < args.steps:
                write_checkpoint(out / f'step_{step + 1}', lm, backbone, vqgan, vocab, cfg, dtype=torch.bfloat16,
                                 shards=1)
            if step % 10 == 0:
                bar.set_postfix({k: f'{v:.3f}' for k, v in entry.items() if k.startswith('loss')})

        log = train_lm(lm, samples, emit, args.steps, args.batch_size, args.lr, args.seed, on_step,
                       bf16=not args.fp32, bin_sigma=args.bin_sigma,
                       world_fraction=args.world_fraction)
    timings['backbone_s'] = time.perf_counter() - t0
    lm.eval()
    write_checkpoint(out, lm, backbone, vqgan, vocab, cfg, dtype=torch.bfloat16, shards=1)
    timings['total_s'] = time.perf_counter() - t_start
    size = sum(f.stat().st_size for f in out.rglob('*')
               if f.is_file() and not f.relative_to(out).parts[0].startswith('step_'))
    summary = {
        'mode': args.mode, 'episodes': len(episodes), 'world_only_episodes': len(world_bags),
        'frames': len(model_frames), 'samples': len(samples),
        'steps': args.steps, 'init_from': args.init_from, 'grow_layers': args.grow_layers,
        'codebook_init': not args.no_codebook_init,
        'batch_size': args.batch_size, 'lr': args.lr, 'bin_sigma': args.bin_sigma,
        'world_fraction': args.world_fraction, 'vq_steps': 0 if args.vqgan_from else
        args.vq_steps, 'vqgan_from': args.vqgan_from, 'vqgan_reconstruction_psnr_db': round(recon_psnr, 2),
        'vqgan_active_codes': args.active_codes or vqgan.cfg.n_embed, 'vqgan_stability_weight': args.stability_weight,
        'vqgan_token_stability': {k: round(v, 3) for k, v in stability.items()},
        'final_loss': {k: float(np.mean([e[k] for e in log[-50:] if k in e]))
                       for k in ('loss', 'loss_action', 'loss_world') if any(k in e for e in log[-50:])},
        'timings_s': {k: round(v, 1) for k, v in timings.items()}, 'checkpoint_mb': round(size / 2**20, 1),
        'code_cache': {'dir': str(cache.dir) if cache.dir else None, 'episodes_read': cache.hits,
                       'episodes_encoded': cache.misses, 'write_errors': cache.write_errors},
        'threads': torch.get_num_threads(), 'device': str(device),
        'backbone': {'hidden_size': backbone.hidden_size, 'layers': backbone.num_hidden_layers,
                     'heads': backbone.num_attention_heads, 'intermediate_size': backbone.intermediate_size},
    }
    (out / 'train_log.json').write_text(json.dumps({**summary, 'log': log[::10], 'vq_loss': vq_losses[::10]}))
    loss_curve(out / 'loss_curve.png', log, vq_losses)
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == '__main__':
    raise SystemExit(main())
