"""worldvla_finetune: fine-tune a WorldVLA checkpoint (released or ours) on your robot's bags.

    worldvla_finetune --init CHECKPOINT --data BAGS... --out DIR            # LoRA, one process
    worldvla_finetune --init CKPT --data bags/ --out DIR --method full       # every weight
    torchrun --nproc_per_node 8 -m worldvla_ros.train.finetune --init CKPT --data bags/ --out DIR \\
        --method full --fsdp                                                  # 7B across 8 GPUs
    worldvla_finetune --out DIR --resume                                      # after a kill

Bags are read as ``evaluate_bag`` reads them (same topic discovery and options). The checkpoint's
own settings are kept (resolution, history frames, chunk size, prompts, rotation); its VQGAN is
frozen and encodes every frame once into a token cache. The action tokenizer's ranges come from
your data (printed before training) and go into the new checkpoint's config.json. The objective is
the paper's: action-model sequences under the action attention mask and world-model sequences.
Held-out bags are scored every ``--eval-every`` steps; DIR ends up holding the best of them as a
checkpoint ``load_policy`` loads (LoRA merged into it; the adapter alone in DIR/adapter), with
train_log.json, loss_curve.png and a model card (README.md). DIR/run/ holds what resuming needs.
Exit status: 0 done, 1 checkpoint problem, 2 data or usage problem, 3 the output could not be written (disk full).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from worldvla_ros.evaluation.episode import TopicMap
from worldvla_ros.evaluation.node_config import parse_action_scale
from worldvla_ros.files import MB, FileRefused, read_text
from worldvla_ros.model.action_tokenizer import ActionTokenizer
from worldvla_ros.model.checkpoint import (
    find_checkpoint_files,
    load_backbone,
    load_vqgan,
    read_config,
    resolve_device,
    worldvla_settings,
)
from worldvla_ros.model.errors import CheckpointError
from worldvla_ros.model.image_tokenizer import ImageTokenizer
from worldvla_ros.model.text_tokenizer import TextTokenizer

from .export import write_finetuned
from .finetune_data import (
    DataError,
    TokenizedEpisode,
    action_ranges,
    bag_paths,
    block_length_ok,
    inputs_digest,
    load_episodes,
    ranges_table,
    tokenizer_key,
    world_only_bag_paths,
)
from .lm_trainer import emit_ids
from .sequences import Sample, action_samples, world_model_samples
from .trainer import OBJECTIVES, EmitHead, Objective, Trainer, TrainSettings

LORA_TARGETS = ('q_proj', 'k_proj', 'v_proj', 'o_proj', 'gate_proj', 'up_proj', 'down_proj')
RESUME_KEYS = ('init', 'data', 'world_only_data', 'val_data', 'val_fraction', 'method', 'steps', 'batch_size',
               'accumulation', 'lr', 'seed', 'mode', 'world_fraction', 'lora_rank', 'lora_alpha', 'action_stats',
               'precision', 'fsdp', 'objective', 'image_loss_weight', 'z_loss', 'dropout', 'softmax')


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog='worldvla_finetune', description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--init', default='', help='checkpoint to start from (a released one or ours)')
    p.add_argument('--tokenizer-dir', default='', help="the checkpoint's tokenizer/ when it is elsewhere")
    p.add_argument('--data', nargs='+', default=[], help='training bags, or directories of bags')
    p.add_argument('--val-data', nargs='+', default=[], help='held-out bags (default: --val-fraction of --data)')
    p.add_argument('--val-fraction', type=float, default=0.1, help='bags held out when --val-data is not given')
    p.add_argument('--out', required=True, help='run directory: the fine-tuned checkpoint and its run state')
    p.add_argument('--resume', action='store_true', help='continue the run in --out (its own arguments)')
    t = p.add_argument_group('topics (as evaluate_bag)')
    t.add_argument('--image-topic', default='')
    t.add_argument('--instruction-topic', default='')
    t.add_argument('--instruction', default='', help='instruction text (instead of a topic)')
    t.add_argument('--action-topic', default='')
    t.add_argument('--gripper-topic', default='')
    t.add_argument('--gripper-open', type=float, default=None)
    t.add_argument('--gripper-closed', type=float, default=None)
    t.add_argument('--time-source', choices=('header', 'bag'), default='header')
    t.add_argument('--action-scale', default='', metavar='PRESET|7 VALUES',
                   help='TwistStamped actions only: m and rad per action unit (libero, tabletop or 7 values)')
    o = p.add_argument_group('objective')
    o.add_argument('--mode', choices=('joint', 'action', 'world'), default='joint')
    o.add_argument('--world-only-data', nargs='+', default=[], metavar='BAG',
                   help='bags (or directories) whose transitions train the world model only, never the policy: '
                        'e.g. recordings where the robot pauses, is pushed or fails, which it must not imitate')
    o.add_argument('--world-fraction', type=float, default=None,
                   help='joint: share of world-model sequences per batch (default: as the data holds them)')
    o.add_argument('--objective', choices=('auto', 'release', 'compact'), default='auto',
                   help="release: the WorldVLA release's fine-tuning loss (full-vocabulary cross-entropy, image codes "
                        'weighted 0.04, z-loss 1e-5, residual dropout 0.05, world-model answers labelled whole); '
                        'compact: the embedded default\'s (softmax over the emittable tokens, unweighted, codes only); '
                        "auto (default): the one the checkpoint records having been trained with, else release")
    o.add_argument('--image-loss-weight', type=float, default=None, help='override: weight of image-code labels')
    o.add_argument('--z-loss', type=float, default=None, help='override: weight of the z-loss')
    o.add_argument('--dropout', type=float, default=None, help='override: residual dropout')
    o.add_argument('--softmax', choices=('full', 'emittable'), default=None, help='override: the softmax\'s tokens')
    o.add_argument('--action-stats', choices=('quantile', 'minmax', 'keep'), default='quantile',
                   help="action tokenizer ranges: 1st/99th percentiles of your data (the release's way), "
                        "its extremes, or keep the checkpoint's")
    r = p.add_argument_group('optimization')
    r.add_argument('--method', choices=('lora', 'full'), default='lora')
    r.add_argument('--lora-rank', type=int, default=16)
    r.add_argument('--lora-alpha', type=float, default=32.0)
    r.add_argument('--steps', type=int, default=2000)
    r.add_argument('--batch-size', type=int, default=16, help='global batch: over --accumulation and processes')
    r.add_argument('--accumulation', type=int, default=1, help='micro-batches per step (gradient accumulation)')
    r.add_argument('--lr', type=float, default=None, help='peak learning rate (default: lora 2e-4, full 2e-5)')
    r.add_argument('--warmup', type=float, default=0.05, help='share of the steps warming up (then cosine)')
    r.add_argument('--precision', choices=('auto', 'bf16', 'fp32'), default='auto',
                   help='bf16: autocast forward (auto: bf16 on a GPU, fp32 on a CPU)')
    r.add_argument('--gradient-checkpointing', action='store_true')
    r.add_argument('--fsdp', action='store_true', help='under torchrun: shard the model (full fine-tuning of 7B)')
    r.add_argument('--seed', type=int, default=0)
    r.add_argument('--eval-every', type=int, default=100)
    r.add_argument('--val-imagine', type=int, default=4,
                   help='held-out transitions the world model imagines at each validation, scored by PSNR (0: none)')
    r.add_argument('--save-every', type=int, default=100, help='steps between run states (for --resume)')
    p.add_argument('--cache-dir', default=os.path.join(os.environ.get('XDG_CACHE_HOME', '~/.cache'), 'worldvla',
                                                       'tokens'), help='token cache ("" for none)')
    p.add_argument('--device', default='auto')
    p.add_argument('--no-progress', action='store_true')
    return p


class UsageError(ValueError):
    pass


def _log(rank: int, text: str) -> None:
    if rank == 0:
        print(text, flush=True)


def prepare_out(args: argparse.Namespace, explicit: set[str]) -> argparse.Namespace:
    """The run's arguments: as given for a new run (into an empty --out), as stored for --resume."""
    out = Path(args.out)
    state = out / 'run' / 'state.pt'
    saved = out / 'run' / 'args.json'
    if args.resume:
        if not saved.exists():
            raise UsageError(f'{out} holds no run to resume (no run/args.json)')
        try:
            stored = json.loads(read_text(saved, MB, 'run arguments'))
        except (FileRefused, ValueError, RecursionError) as exc:
            raise UsageError(f'{saved}: cannot resume from it: {exc}') from exc
        if not isinstance(stored, dict):
            raise UsageError(f'{saved}: not the arguments of a run')
        given = vars(args)
        differ = [k for k in RESUME_KEYS if k in explicit and given.get(k) != stored.get(k)]
        if differ:
            raise UsageError(f'--resume continues the run as it was started; these differ: {differ}')
        # runs started before --world-only-data existed have none; before --objective, the compact objective ran
        kept = {'world_only_data': [], 'objective': 'compact', 'image_loss_weight': None, 'z_loss': None,
                'dropout': None, 'softmax': None, **stored}
        return argparse.Namespace(**{**kept, 'resume': True, 'out': args.out, 'no_progress': args.no_progress,
                                     'device': args.device})
    if state.is_file() or saved.is_file():
        raise UsageError(f'{out} already holds a run: --resume continues it; choose another --out for a new one')
    if out.exists() and any(out.iterdir()):
        raise UsageError(f'{out} is not empty: choose an empty or new --out (nothing is overwritten)')
    if not args.init or not args.data:
        raise UsageError('--init and --data are needed (or --resume)')
    if not 0.0 <= args.val_fraction < 1.0:
        raise UsageError(f'--val-fraction must lie in [0, 1), got {args.val_fraction}')
    if args.world_only_data and args.mode == 'action':
        raise UsageError('--world-only-data trains the world model: use it with --mode joint or world')
    if args.world_fraction is not None and (args.mode != 'joint' or not 0.0 <= args.world_fraction <= 1.0):
        raise UsageError('--world-fraction takes a value in [0, 1], with --mode joint')
    if args.steps < 1 or args.batch_size < 1 or args.accumulation < 1 or args.lora_rank < 1:
        raise UsageError('--steps, --batch-size, --accumulation and --lora-rank must be positive')
    # stored as absolute paths: a resume from another working directory reads the same files
    absolute = lambda given: [str(Path(g).expanduser().resolve()) for g in given]  # noqa: E731
    args.data, args.val_data, args.world_only_data = (absolute(args.data), absolute(args.val_data),
                                                      absolute(args.world_only_data))
    args.init = str(Path(args.init).expanduser().resolve())
    if args.tokenizer_dir:
        args.tokenizer_dir = str(Path(args.tokenizer_dir).expanduser().resolve())
    if args.cache_dir:
        args.cache_dir = str(Path(args.cache_dir).expanduser().resolve())
    return args


def distributed() -> tuple[int, int, int]:
    """(rank, world size, local rank); under torchrun the process group is set up here."""
    world = int(os.environ.get('WORLD_SIZE', '1'))
    if world == 1:
        return 0, 1, 0
    local = int(os.environ.get('LOCAL_RANK', '0'))
    if torch.cuda.is_available():
        torch.cuda.set_device(local)
    torch.distributed.init_process_group(backend='nccl' if torch.cuda.is_available() else 'gloo')
    return torch.distributed.get_rank(), world, local


def split_bags(args: argparse.Namespace) -> tuple[list[Path], list[Path]]:
    train = bag_paths(args.data)
    if args.val_data:
        val = bag_paths(args.val_data)
        overlap = {p.resolve() for p in train} & {p.resolve() for p in val}
        if overlap:
            raise DataError(f'held-out bags are also training bags: {sorted(map(str, overlap))}')
        return train, val
    n_val = round(len(train) * args.val_fraction) if len(train) > 1 else 0
    if args.val_fraction > 0 and len(train) > 1:
        n_val = max(1, n_val)
    order = np.random.default_rng(args.seed).permutation(len(train))
    val = [train[i] for i in sorted(order[:n_val])]
    return [train[i] for i in sorted(order[n_val:])], val


def build_samples(episodes: list[TokenizedEpisode], mode: str, text: TextTokenizer, tok: ActionTokenizer,
                  cfg: Any, label_structure: bool = False) -> list[Sample]:
    samples: list[Sample] = []
    for ep in episodes:
        blocks = [b.tolist() for b in ep.blocks]
        if mode in ('joint', 'action'):
            samples += action_samples(blocks, ep.actions, ep.instruction, text, tok, cfg, finished=True)
        if mode in ('joint', 'world'):
            samples += world_model_samples(blocks, ep.actions, text, tok, cfg, label_structure=label_structure)
    return samples


def choose_objective(args: argparse.Namespace, settings: Any) -> tuple[str, Objective]:
    """The objective's name and values: the preset (auto: what the checkpoint records, else the release's) with the
    command line's overrides."""
    name = args.objective
    if name == 'auto':
        name = str(settings.extra.get('objective', 'release'))
        name = name if name in OBJECTIVES else 'release'
    base = OBJECTIVES[name]
    changes = {k: v for k, v in (('image_weight', args.image_loss_weight), ('z_loss', args.z_loss),
                                 ('dropout', args.dropout), ('softmax', args.softmax)) if v is not None}
    try:
        chosen = replace(base, **changes)
    except ValueError as exc:
        raise UsageError(str(exc)) from exc
    return (name if not changes else f'{name} with {", ".join(f"{k} {v}" for k, v in changes.items())}'), chosen


def imagined_psnr(lm: torch.nn.Module, images: ImageTokenizer, text: TextTokenizer, tok: ActionTokenizer, cfg: Any,
                  episodes: list[TokenizedEpisode], n: int) -> float | None:
    """Mean PSNR of the world model's greedy next frame against the real next frame, both decoded from their
    tokens (so the tokenizer's own error is left out), over ``n`` held-out transitions spread evenly."""
    from worldvla_ros.metrics import psnr
    from worldvla_ros.model import tokens as T
    from worldvla_ros.model.generate import generate_image_block
    from worldvla_ros.model.prompts import world_model_prompt

    picks = [(e, t) for e in episodes for t in range(len(e.blocks) - 1)]
    if not picks or n <= 0:
        return None
    picks = picks[:: max(1, len(picks) // n)][:n]
    image_ids = torch.as_tensor(images.image_token_ids, device=lm.lm_head.weight.device)
    scores = []
    with torch.no_grad():
        for e, t in picks:
            prompt = world_model_prompt(text, e.blocks[t].tolist(), tok.encode(e.actions[t : t + 1]).tolist(),
                                        cfg.world_model_prompt)
            block = generate_image_block(lm, prompt, images.grid, T.grid_token(cfg.resolution), image_ids)
            scores.append(min(psnr(images.decode(e.blocks[t + 1].tolist()), images.decode(block)), 100.0))
    return float(np.mean(scores))


class DiskFull(OSError):
    """Writing the run's state or checkpoint failed for want of space (or write permission)."""


def _atomic_save(obj: Any, path: Path) -> None:
    """Whole or not at all: a failed write (a full disk) leaves neither a half file nor its temporary."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f'.{os.getpid()}.tmp')
    try:
        torch.save(obj, tmp)
        tmp.replace(path)
    except (OSError, RuntimeError) as exc:  # torch.save reports a full disk as RuntimeError ('unexpected pos')
        tmp.unlink(missing_ok=True)
        raise DiskFull(f'cannot write {path}: {_write_failure(exc)}') from exc


def _write_failure(exc: BaseException) -> str:
    import errno

    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
        return 'disk full'
    if isinstance(exc, OSError):
        return exc.strerror or str(exc)
    text = str(exc)
    return 'disk full' if ('unexpected pos' in text or 'failed writing' in text) else text.splitlines()[0]


def _clean_temporaries(run_dir: Path) -> None:
    """Temporaries of saves a killed or failed process left behind."""
    for tmp in run_dir.glob('*.tmp') if run_dir.is_dir() else ():
        tmp.unlink(missing_ok=True)


def trainable_state(module: torch.nn.Module, lm: torch.nn.Module, lora: bool, fsdp: bool) -> dict[str, torch.Tensor]:
    """What the run changes: the adapter with LoRA, every weight otherwise (under FSDP gathered from every
    process's shards: a collective call; the full state lands on rank 0, the others get an empty dict)."""
    if fsdp:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        full = get_model_state_dict(module, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        return {k.removeprefix('lm.'): v for k, v in full.items()}
    if lora:
        from peft import get_peft_model_state_dict

        return {k: v.detach().cpu().clone() for k, v in get_peft_model_state_dict(lm).items()}
    return {k: v.detach().cpu().clone() for k, v in lm.state_dict().items()}


def load_trainable(module: torch.nn.Module, lm: torch.nn.Module, state: dict[str, torch.Tensor], lora: bool,
                   fsdp: bool) -> None:
    if fsdp:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

        set_model_state_dict(module, {f'lm.{k}': v for k, v in state.items()},
                             options=StateDictOptions(full_state_dict=True))
        return
    if lora:
        from peft import set_peft_model_state_dict

        set_peft_model_state_dict(lm, state)
        return
    lm.load_state_dict(state)


def optimizer_state(module: torch.nn.Module, trainer: Trainer, fsdp: bool) -> Any:
    if not fsdp:
        return trainer.opt.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    return get_optimizer_state_dict(module, trainer.opt, options=StateDictOptions(full_state_dict=True,
                                                                                   cpu_offload=True))


def load_optimizer_state(module: torch.nn.Module, trainer: Trainer, state: Any, fsdp: bool) -> None:
    if not fsdp:
        trainer.opt.load_state_dict(state)
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    set_optimizer_state_dict(module, trainer.opt, optim_state_dict=state,
                             options=StateDictOptions(full_state_dict=True))


def run(args: argparse.Namespace) -> dict[str, Any]:
    rank, world, local = distributed()
    out = Path(args.out)
    device = resolve_device(f'cuda:{local}' if world > 1 and torch.cuda.is_available() else args.device)
    lora = args.method == 'lora'
    if args.fsdp and (lora or world == 1):
        raise UsageError('--fsdp shards full fine-tuning across torchrun processes: use it with --method full')
    files = find_checkpoint_files(args.init, args.tokenizer_dir or None)
    source_cfg = read_config(files)
    cfg = worldvla_settings(source_cfg, files.root)
    text = TextTokenizer(files.text_tokenizer)
    vocab = text.vocab()
    vqgan = load_vqgan(files, device).eval().requires_grad_(False)
    images = ImageTokenizer(vqgan, vocab, cfg.resolution, cfg.rotate_180)

    train_bags, val_bags = split_bags(args)
    world_bags = world_only_bag_paths(args.world_only_data, train_bags + val_bags, '--data/--val-data')
    inputs = inputs_digest(files, train_bags + val_bags + world_bags)
    if args.resume:
        stored = getattr(args, 'inputs', None) or {}
        changed = [k for k in inputs if k in stored and stored[k] != inputs[k]]
        if changed:
            raise UsageError(f'--resume: the run\'s {" and ".join(changed)} changed since it started (files, sizes or '
                             'modification times): it would continue on other inputs; start a new run')
    topics = TopicMap(args.image_topic, args.instruction_topic, args.action_topic, args.gripper_topic,
                      args.instruction, args.time_source, args.gripper_open, args.gripper_closed)
    scale = parse_action_scale(args.action_scale) if args.action_scale else None
    cache = Path(args.cache_dir).expanduser() if args.cache_dir else None
    key = tokenizer_key(files.vqgan_ckpt, cfg.resolution, cfg.rotate_180, vocab)
    bar = tqdm(total=len(train_bags) + len(val_bags) + len(world_bags), desc='reading + encoding bags', unit='bag',
               disable=args.no_progress or rank != 0, file=sys.stderr)

    def load(bags: list[Path]) -> list[TokenizedEpisode]:
        with torch.no_grad():
            return load_episodes(bags, topics, scale, images.encode, key, cache, cfg.history_frames + 1,
                                 lambda _: bar.update(1), frame_size=cfg.resolution,
                                 max_instruction_chars=cfg.max_instruction_chars)

    if world > 1 and rank != 0:
        torch.distributed.barrier()  # rank 0 fills the cache first
    train_eps, val_eps, world_eps = load(train_bags), load(val_bags), load(world_bags)
    if world > 1 and rank == 0:
        torch.distributed.barrier()
    bar.close()
    block_length_ok(train_eps + val_eps + world_eps)

    if args.action_stats == 'keep':
        new_min, new_max = cfg.action_min, cfg.action_max
    else:
        new_min, new_max = action_ranges(train_eps, args.action_stats, (cfg.action_min[6], cfg.action_max[6]))
    _log(rank, f'action tokenizer ranges ({args.action_stats}, from {len(train_eps)} training bags):\n'
               + ranges_table(cfg.action_min, cfg.action_max, new_min, new_max))
    cfg = cfg.replace(action_min=tuple(new_min), action_max=tuple(new_max))
    tok = ActionTokenizer(cfg.action_min, cfg.action_max)
    objective_name, objective = choose_objective(args, cfg)
    _log(rank, f'objective: {objective_name} ({objective})')
    cfg = cfg.replace(extra={**cfg.extra, 'objective': objective_name.split(' ')[0]})
    whole = objective.label_structure
    train_samples = build_samples(train_eps, args.mode, text, tok, cfg, whole) + build_samples(
        world_eps, 'world', text, tok, cfg, whole)
    val_samples = build_samples(val_eps, args.mode, text, tok, cfg, whole)
    if not train_samples:
        raise DataError('the training bags give no training sequences')
    _log(rank, f'{len(train_eps)} training bags ({sum(len(e.actions) for e in train_eps)} frames, '
               f'{len(train_samples)} sequences), {len(val_eps)} held out ({len(val_samples)} sequences); '
               f'{world} process(es) on {device}')

    precision = args.precision if args.precision != 'auto' else ('bf16' if device.type == 'cuda' else 'fp32')
    weights_dtype = torch.bfloat16 if lora and device.type == 'cuda' else torch.float32
    torch.manual_seed(args.seed)
    lm = load_backbone(files, source_cfg, vocab, device, weights_dtype)
    if args.gradient_checkpointing:
        lm.gradient_checkpointing_enable()
    if lora:
        from peft import LoraConfig, get_peft_model

        lm.requires_grad_(False)
        peft_model = get_peft_model(lm, LoraConfig(r=args.lora_rank, lora_alpha=args.lora_alpha, lora_dropout=0.0,
                                                   target_modules=list(LORA_TARGETS), bias='none'))
        for p in peft_model.parameters():
            if p.requires_grad:
                p.data = p.data.float()
        if args.gradient_checkpointing:
            lm.enable_input_require_grads()
    else:
        peft_model = None
        lm.requires_grad_(True)
        lm.get_input_embeddings().requires_grad_(True)
    emit = emit_ids(images.image_token_ids, images.codes_to_block(np.zeros((images.grid, images.grid), int))[1])
    module: torch.nn.Module = EmitHead(lm, None if objective.softmax == 'full' else emit)
    if world > 1:
        if args.fsdp:  # FSDP2: each decoder layer a unit, the rest (embeddings, head) the root's
            from torch.distributed.fsdp import fully_shard

            for layer in lm.model.layers:
                fully_shard(layer)
            fully_shard(module)
        else:
            module = torch.nn.parallel.DistributedDataParallel(
                module, device_ids=[device.index] if device.type == 'cuda' else None)
    settings = TrainSettings(steps=args.steps, batch_size=args.batch_size,
                             lr=args.lr if args.lr is not None else (2e-4 if lora else 2e-5), seed=args.seed,
                             bf16=precision == 'bf16', world_fraction=args.world_fraction,
                             accumulation=args.accumulation, warmup_fraction=args.warmup, zero_other_rows=False,
                             objective=objective)
    trainer = Trainer(module, lm, train_samples, emit, settings, rank, world)
    run_dir = out / 'run'
    if rank == 0:
        _clean_temporaries(run_dir)
    log: list[dict[str, float]] = []
    evals: list[dict[str, Any]] = []
    best: dict[str, Any] = {}
    if args.resume and (run_dir / 'state.pt').is_file():
        state = torch.load(run_dir / 'state.pt', weights_only=False, map_location='cpu')
        load_trainable(module, lm, state['weights'], lora, args.fsdp)
        trainer.load_state_dict(state['trainer'], optimizer=False)
        load_optimizer_state(module, trainer, state['optimizer'], args.fsdp)
        log, evals, best = state['log'], state['evals'], state['best']
        _log(rank, f'resumed at step {trainer.step_done} of {args.steps}')
    elif rank == 0:
        try:
            run_dir.mkdir(parents=True, exist_ok=True)
            (run_dir / 'args.json').write_text(json.dumps({**vars(args), 'inputs': inputs}, indent=2))
        except OSError as exc:
            raise DiskFull(f'cannot write {run_dir / "args.json"}: {_write_failure(exc)}') from exc
    decode = tok.decode_values
    score_key = 'loss_action' if any(s.kind == 'action' for s in val_samples) else 'loss'

    def validate() -> None:
        if not val_samples:
            return
        v = trainer.evaluate(val_samples, decode)
        v['step'] = trainer.step_done
        if rank == 0 and not args.fsdp and args.mode != 'action':  # FSDP: no process holds the whole model
            v['imagined_psnr_db'] = imagined_psnr(lm, images, text, tok, cfg, val_eps, args.val_imagine)
        evals.append(v)
        if not best or v[score_key] < best['score']:
            best.update(step=trainer.step_done, score=v[score_key])
            weights = trainable_state(module, lm, lora, args.fsdp)
            if rank == 0:
                _atomic_save(weights, run_dir / 'best.pt')

    def save_state() -> None:
        weights = trainable_state(module, lm, lora, args.fsdp)
        opt = optimizer_state(module, trainer, args.fsdp)
        if rank == 0:
            _atomic_save({'weights': weights, 'optimizer': opt, 'trainer': trainer.state_dict(optimizer=False),
                          'log': log, 'evals': evals, 'best': best}, run_dir / 'state.pt')

    t0 = time.perf_counter()
    with tqdm(total=args.steps, initial=trainer.step_done, desc=f'fine-tuning ({args.method})', unit='step',
              disable=args.no_progress or rank != 0, file=sys.stderr) as steps_bar:
        if trainer.step_done == 0:
            validate()
        while trainer.step_done < args.steps:
            entry = trainer.step()
            log.append(entry)
            steps_bar.update(1)
            steps_bar.set_postfix(loss=f'{entry["loss"]:.3f}')
            done = trainer.step_done
            if done % args.eval_every == 0 or done == args.steps:
                validate()
            if done % args.save_every == 0 and done < args.steps:
                save_state()
    seconds = time.perf_counter() - t0

    if best and (run_dir / 'best.pt').is_file() and best['step'] != trainer.step_done:
        load_trainable(module, lm, torch.load(run_dir / 'best.pt', weights_only=True, map_location='cpu'), lora,
                       args.fsdp)
    final = trainable_state(module, lm, lora, args.fsdp) if args.fsdp else None
    summary = {
        'init': str(files.root), 'method': args.method, 'mode': args.mode, 'world_fraction': args.world_fraction,
        'steps': args.steps, 'batch_size': args.batch_size, 'accumulation': args.accumulation, 'processes': world,
        'fsdp': args.fsdp, 'precision': precision, 'device': str(device), 'lr': settings.lr,
        'train_bags': [str(b) for b in train_bags], 'val_bags': [str(b) for b in val_bags],
        'world_only_bags': [str(b) for b in world_bags],
        'train_sequences': len(train_samples), 'val_sequences': len(val_samples),
        'action_stats': args.action_stats, 'action_min': list(cfg.action_min), 'action_max': list(cfg.action_max),
        'objective': objective_name, 'objective_values': asdict(objective),
        'best': best, 'validation': evals, 'seconds_this_run': round(seconds, 1),
        'settings': cfg.to_dict(),
    }
    if rank == 0:
        try:
            _export(out, lora, peft_model, final, files, source_cfg, vocab, lm, cfg, weights_dtype, summary, log,
                    evals, run_dir, trainer, best)
        except (OSError, RuntimeError) as exc:
            raise DiskFull(f'cannot write the fine-tuned checkpoint to {out}: {_write_failure(exc)}') from exc
    if world > 1:
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
    return summary


def _export(out: Path, lora: bool, peft_model: Any, final: Any, files: Any,
            source_cfg: dict[str, Any], vocab: dict[str, int], lm: torch.nn.Module, cfg: Any,
            weights_dtype: torch.dtype, summary: dict[str, Any], log: list, evals: list, run_dir: Path,
            trainer: Trainer, best: dict) -> None:
    if lora:
        peft_model.save_pretrained(str(out / 'adapter'))
        plain = peft_model.merge_and_unload()
    elif final is not None:  # FSDP: the gathered weights into a plain model on this process
        plain = load_backbone(files, source_cfg, vocab, torch.device('cpu'), torch.float32)
        plain.load_state_dict(final)
    else:
        plain = lm
    write_finetuned(out, plain, files, source_cfg, cfg, torch.bfloat16 if weights_dtype == torch.bfloat16
                    else torch.float32)
    (out / 'train_log.json').write_text(json.dumps({**summary, 'log': log}, indent=2))
    loss_plot(out / 'loss_curve.png', log, evals)
    (out / 'README.md').write_text(model_card(summary))
    _save_final_state(run_dir, trainer, log, evals, best)


def _save_final_state(run_dir: Path, trainer: Trainer, log: list, evals: list, best: dict) -> None:
    (run_dir / 'finished.json').write_text(json.dumps({'step': trainer.step_done, 'best': best}))


def loss_plot(path: Path, log: list[dict[str, float]], evals: list[dict[str, Any]]) -> None:
    import matplotlib

    matplotlib.use('Agg')
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3.5))
    for key, label in (('loss', 'train'), ('loss_action', 'train, action tokens'), ('loss_world', 'train, image')):
        xs = [e['step'] + 1 for e in log if key in e]
        if xs:
            ax.plot(xs, [e[key] for e in log if key in e], label=label, lw=1)
    for key, label in (('loss_action', 'held out, action tokens'), ('loss_world', 'held out, image tokens')):
        xs = [e['step'] for e in evals if key in e]
        if xs:
            ax.plot(xs, [e[key] for e in evals if key in e], 'o-', label=label)
    ax.set_xlabel('step')
    ax.set_ylabel('cross-entropy')
    ax.set_yscale('log')
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def _num(v: Any) -> str:
    return '–' if v is None else f'{v:.4g}'


def model_card(s: dict[str, Any]) -> str:
    best = s['best']
    last = next((e for e in reversed(s['validation']) if e['step'] == best.get('step')), {})
    dims = ('dx', 'dy', 'dz', 'droll', 'dpitch', 'dyaw', 'gripper')
    lines = [
        '# WorldVLA, fine-tuned with worldvla_finetune', '',
        f'- from: `{s["init"]}`', f'- method: {s["method"]} ({s["mode"]} objective, world-model share '
        f'{s["world_fraction"] if s["world_fraction"] is not None else "as in the data"}), {s["steps"]} steps of '
        f'{s["batch_size"]} sequences, peak lr {s["lr"]:g}, {s["precision"]}, {s["processes"]} process(es)',
        f'- objective: {s["objective"]} ({", ".join(f"{k} {v}" for k, v in s["objective_values"].items())})',
        f'- data: {len(s["train_bags"])} training bags ({s["train_sequences"]} sequences), '
        f'{len(s["val_bags"])} held out ({s["val_sequences"]} sequences)',
        f'- kept: the step with the lowest held-out loss: step {best.get("step", "–")}', '',
        '## Action tokenizer ranges (from the training bags)', '', '| dim | min | max |', '|---|---|---|',
        *[f'| {d} | {a:.5g} | {b:.5g} |' for d, a, b in zip(dims, s['action_min'], s['action_max'], strict=True)],
        '',
    ]
    if last:
        lines += ['## Held out, at the kept step (teacher-forced)', '',
                  f'- loss: {_num(last.get("loss"))}; action tokens {_num(last.get("loss_action"))}; '
                  f'image tokens {_num(last.get("loss_world"))}',
                  f'- action-bin accuracy: {_num(last.get("action_token_accuracy"))}']
        if last.get('imagined_psnr_db') is not None:
            lines.append(f'- world model: {last["imagined_psnr_db"]:.2f} dB PSNR of imagined next frames '
                         '(against the real ones, both decoded from tokens)')
        if 'action_l1' in last:
            lines.append('- action L1 per dimension: ' + ', '.join(
                f'{d} {v:.4g}' for d, v in zip(dims, last['action_l1'], strict=True)))
    lines += ['', 'Load it like any checkpoint: `ros2 launch worldvla bringup.launch.py checkpoint:=<this directory>`.',
              '']
    return '\n'.join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    explicit = {k for k, v in vars(args).items() if v != parser.get_default(k)}
    try:
        args = prepare_out(args, explicit)
        run(args)
    except (UsageError, DataError) as exc:
        print(f'worldvla_finetune: error: {exc}', file=sys.stderr)
        return 2
    except CheckpointError as exc:
        print(f'worldvla_finetune: error: cannot load checkpoint: {exc}', file=sys.stderr)
        return 1
    except DiskFull as exc:
        print(f'worldvla_finetune: error: {exc} (free space, then --resume continues from the last saved state)',
              file=sys.stderr)
        return 3
    return 0


if __name__ == '__main__':
    raise SystemExit(main())
