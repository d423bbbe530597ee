"""Fine-tuning throughput and peak memory per configuration (full / LoRA, gradient checkpointing).

    python benchmarks/finetune.py                                # a tiny random checkpoint, CPU
    python benchmarks/finetune.py --checkpoint CKPT --device cuda --batch-size 4 --seq 700   # a 7B on a GPU

Sequences are random token ids of the length of one action sample (two 256 px history frames
+ instruction + a 5-action chunk is about 650 tokens), every answer token trained. Prints one
line per configuration: trained tokens/s, seconds per step, peak memory (CUDA allocator peak on a
GPU; the process's peak RSS on a CPU, which only grows, so later lines include earlier peaks).
"""
from __future__ import annotations

import argparse
import resource
import time
from pathlib import Path

import numpy as np
import torch

from worldvla_ros.model import tokens as T
from worldvla_ros.model.checkpoint import find_checkpoint_files, load_backbone, read_config, resolve_device
from worldvla_ros.model.text_tokenizer import TextTokenizer
from worldvla_ros.train.finetune import LORA_TARGETS
from worldvla_ros.train.sequences import Sample
from worldvla_ros.train.trainer import EmitHead, Trainer, TrainSettings


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--checkpoint', default='')
    p.add_argument('--device', default='cpu')
    p.add_argument('--batch-size', type=int, default=4)
    p.add_argument('--seq', type=int, default=650)
    p.add_argument('--steps', type=int, default=5)
    args = p.parse_args()
    ckpt = args.checkpoint
    if not ckpt:
        from worldvla_ros.model import make_tiny_checkpoint

        ckpt = str(make_tiny_checkpoint(Path('/tmp/worldvla_bench_ft') / 'tiny'))
    device = resolve_device(args.device)
    files = find_checkpoint_files(ckpt)
    cfg = read_config(files)
    vocab = TextTokenizer(files.text_tokenizer).vocab()
    rng = np.random.default_rng(0)
    samples = []
    for _ in range(64):
        ids = rng.integers(T.ACTION_BIN_FIRST, T.ACTION_BIN_LAST + 1, args.seq).astype(np.int64)
        target = np.zeros(args.seq, dtype=bool)
        target[args.seq // 2 :] = True
        samples.append(Sample(ids, target, 'action'))
    emit = torch.arange(T.ACTION_BIN_FIRST, T.ACTION_BIN_LAST + 1)
    bf16 = device.type == 'cuda'
    print(f'{Path(ckpt).name} on {device}, {args.batch_size} × {args.seq} tokens per step, '
          f'{"bf16 autocast" if bf16 else "fp32"}')
    for method in ('full', 'lora'):
        for checkpointing in (False, True):
            dtype = torch.bfloat16 if method == 'lora' and bf16 else torch.float32
            lm = load_backbone(files, cfg, vocab, device, dtype)
            if checkpointing:
                lm.gradient_checkpointing_enable()
            if method == 'lora':
                from peft import LoraConfig, get_peft_model

                model = get_peft_model(lm, LoraConfig(r=16, lora_alpha=32, target_modules=list(LORA_TARGETS)))
                for q in model.parameters():
                    if q.requires_grad:
                        q.data = q.data.float()
                if checkpointing:
                    lm.enable_input_require_grads()
            else:
                lm.requires_grad_(True)
            if device.type == 'cuda':
                torch.cuda.reset_peak_memory_stats()
            trainer = Trainer(EmitHead(lm, emit), lm, samples, emit,
                              TrainSettings(steps=args.steps, batch_size=args.batch_size, lr=1e-4, bf16=bf16,
                                            zero_other_rows=False))
            trainer.step()  # warm-up
            if device.type == 'cuda':
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            for _ in range(args.steps - 1):
                trainer.step()
            if device.type == 'cuda':
                torch.cuda.synchronize()
                peak = torch.cuda.max_memory_allocated() / 2**30
                where = 'GPU'
            else:
                peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
                where = 'RSS'
            per_step = (time.perf_counter() - t0) / (args.steps - 1)
            trained = sum(int(s.target[1:].sum()) for s in samples[: args.batch_size])
            n_train = sum(q.numel() for q in trainer.params)
            print(f'{method:5} checkpointing={checkpointing!s:5}  {n_train / 1e6:8.2f} M trained params  '
                  f'{trained / per_step:9.0f} tokens/s  {per_step:6.2f} s/step  peak {where} {peak:6.2f} GiB',
                  flush=True)
            del trainer, lm
            if device.type == 'cuda':
                torch.cuda.empty_cache()


if __name__ == '__main__':
    main()
