"""Can the embedded default's backbone learn *where* a patch is? A synthetic probe, no sim, no VQGAN.

    python benchmarks/position_readout.py [--gripper coded|plain|wide] [--steps 900] [--layers 4] ...

Each sequence is the action model's: BOS, an 8×8 image block of random "table" codes with a
"gripper" at a random cell, 8710, then a chunk whose first action holds the gripper's column (Δx)
and row (Δy) as action tokens. The row is told only by where the gripper sits in the sequence,
i.e. by rotary positions, which is all the real tokenizer's codes give (their code vectors carry
no position: R² ≈ 0 for the gripper's and the block's patch). ``--gripper``:
``coded``: one code per column, so the code names the column; ``plain``: one code everywhere;
``wide``: two patches (the cell and the one right of it) with codes drawn from 20 each, closer to
a real frame's gripper; ``sim``: a real sim frame (gripper at a random table position, hover height,
the episode's blocks/bowl/plate, or none with ``--empty-table``) through a trained image tokenizer
(``--tokenizer``, default the bundled model's); the answer is the gripper's table x / y, a hit
within ±1/14 of the table (a constant guess: ~15 %). Trained with the project's trainer
(`train_lm`, the action attention mask, lr 2e-3, batch 24); printed: the share of held-out
sequences whose column / row is decoded to the right cell (chance 1/8). ``--continuous`` puts
the target anywhere in the cell, as a real position is; ``--bin-sigma`` trains on soft action-bin targets.
"""
from __future__ import annotations

import argparse
import time
from dataclasses import replace

import numpy as np
import torch

from worldvla_ros.model import tokens as T
from worldvla_ros.model.action_tokenizer import ActionTokenizer
from worldvla_ros.model.image_tokenizer import ImageTokenizer
from worldvla_ros.model.policy import load_policy
from worldvla_ros.model.tiny import build_lm, build_vocab
from worldvla_ros.model.vqgan import VQGAN
from worldvla_ros.sim.bundled import bundled_checkpoint
from worldvla_ros.sim.tabletop import HOVER_Z, TABLE, TabletopSim
from worldvla_ros.train.cli import BACKBONE, SETTINGS, vqgan_config
from worldvla_ros.train.lm_trainer import emit_ids, train_lm
from worldvla_ros.train.sequences import Sample, collate

GRID = 8
TABLE_CODES = 100
GRIPPER_CODE = 1000  # + column


def cell_value(i: int) -> float:
    return (i / (GRID - 1) * 2 - 1) * 0.9


def make_sample(rng: np.random.Generator, images: ImageTokenizer, tok: ActionTokenizer, gripper: str,
                continuous: bool = False) -> tuple[Sample, int, int]:
    codes = rng.integers(0, TABLE_CODES, (GRID, GRID))
    row, col = (int(v) for v in rng.integers(0, GRID, 2))
    if gripper == 'wide':
        codes[row, col] = GRIPPER_CODE + rng.integers(0, 20)
        if col + 1 < GRID:
            codes[row, col + 1] = GRIPPER_CODE + 20 + rng.integers(0, 20)
    else:
        codes[row, col] = GRIPPER_CODE + (col if gripper == 'coded' else 0)
    chunk = np.zeros((SETTINGS.chunk_size, 7))
    chunk[:, 6] = -1.0
    chunk[0, :2] = cell_value(col), cell_value(row)
    if continuous:  # anywhere in the cell, like a real position: ~33 bins per cell instead of one
        chunk[0, :2] += rng.uniform(-0.9 / (GRID - 1), 0.9 / (GRID - 1), 2)
    prompt = [T.BOS, *images.codes_to_block(codes), T.END_OF_TURN]
    ids = np.asarray([*prompt, *tok.encode(chunk).tolist(), T.END_OF_TURN], dtype=np.int64)
    target = np.zeros(len(ids), dtype=bool)
    target[len(prompt):] = True
    return Sample(ids, target, 'action'), col, row


def sim_samples(n: int, seed: int, images: ImageTokenizer, tok: ActionTokenizer,
                empty_table: bool) -> list[tuple[Sample, float, float]]:
    """Real rendered frames; the target is the gripper's table position scaled to ±0.9."""
    rng, sim, out = np.random.default_rng(seed), TabletopSim(), []
    frames, truths = [], []
    for i in range(n):
        sim.reset(seed * 100_000 + i)
        if empty_table:
            for pos in (*sim.state.blocks.values(), *sim.state.targets.values()):
                pos[:2] = -10.0
        sim.state.gripper[:] = [*rng.uniform(0.03, TABLE - 0.03, 2), HOVER_Z]
        frames.append(sim.render())
        truths.append((sim.state.gripper[:2] / TABLE * 2 - 1) * 0.9)
    blocks = [b for i in range(0, n, 256) for b in images.encode(frames[i:i + 256])]
    for block, (x, y) in zip(blocks, truths, strict=True):
        chunk = np.zeros((SETTINGS.chunk_size, 7))
        chunk[:, 6] = -1.0
        chunk[0, :2] = x, y
        prompt = [T.BOS, *block, T.END_OF_TURN]
        ids = np.asarray([*prompt, *tok.encode(chunk).tolist(), T.END_OF_TURN], dtype=np.int64)
        target = np.zeros(len(ids), dtype=bool)
        target[len(prompt):] = True
        out.append((Sample(ids, target, 'action'), float(x), float(y)))
    return out


@torch.inference_mode()
def accuracy(lm: torch.nn.Module, test: list[tuple[Sample, float, float]], tok: ActionTokenizer) -> tuple[float, float]:
    lm.eval()
    dev = next(lm.parameters()).device
    ids, mask, positions, _ = (t.to(dev) for t in collate([s for s, _, _ in test]))
    hidden = lm.model(input_ids=ids, attention_mask=mask, position_ids=positions).last_hidden_state
    hits = []
    for j, (s, want_x, want_y) in enumerate(test):
        start = int(np.flatnonzero(s.target)[0])  # ACTION_START; hidden at i predicts token i + 1
        values = lm.lm_head(hidden[j, start : start + 2]).argmax(-1).cpu().numpy()
        x, y = tok.decode_values(np.r_[values, [T.ACTION_BIN_FIRST] * 5][None])[0, :2]
        step = 0.9 / (GRID - 1)
        hits.append((abs(x - want_x) < step, abs(y - want_y) < step))
    lm.train()
    col_acc, row_acc = np.mean(hits, axis=0)
    return float(col_acc), float(row_acc)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--gripper', choices=('coded', 'plain', 'wide', 'sim'), default='coded')
    p.add_argument('--continuous', action='store_true', help='targets anywhere in the cell, not its centre')
    p.add_argument('--bin-sigma', type=float, default=0.0, help='soft action-bin targets (train_lm bin_sigma)')
    p.add_argument('--tokenizer', default=None, help='checkpoint whose image tokenizer encodes the sim frames')
    p.add_argument('--empty-table', action='store_true', help='sim: no blocks, bowl or plate')
    p.add_argument('--steps', type=int, default=900)
    p.add_argument('--layers', type=int, default=BACKBONE.num_hidden_layers)
    p.add_argument('--hidden-size', type=int, default=BACKBONE.hidden_size)
    p.add_argument('--heads', type=int, default=BACKBONE.num_attention_heads)
    p.add_argument('--rope-theta', type=float, default=BACKBONE.rope_theta)
    p.add_argument('--evaluations', type=int, default=3)
    p.add_argument('--device', default='cpu')
    args = p.parse_args()
    rng = np.random.default_rng(0)
    vocab = build_vocab(0)
    tok = ActionTokenizer(SETTINGS.action_min, SETTINGS.action_max)
    if args.gripper == 'sim':
        images = load_policy(args.tokenizer or bundled_checkpoint(), device='cpu', dtype='float32').images
        vqgan = images.vqgan
        train = [s for s, _, _ in sim_samples(5000, 1, images, tok, args.empty_table)]
        test = sim_samples(300, 2, images, tok, args.empty_table)
    else:
        vqgan = VQGAN(vqgan_config(GRID))  # random weights: only its code ↔ token mapping is used
        images = ImageTokenizer(vqgan, vocab, SETTINGS.resolution, rotate_180=False)
        train = [make_sample(rng, images, tok, args.gripper, args.continuous)[0] for _ in range(5000)]
        test = [(s, cell_value(col), cell_value(row))
                for s, col, row in (make_sample(rng, images, tok, args.gripper, args.continuous) for _ in range(300))]
    backbone = replace(BACKBONE, num_hidden_layers=args.layers, hidden_size=args.hidden_size,
                       num_attention_heads=args.heads, num_key_value_heads=args.heads,
                       intermediate_size=4 * args.hidden_size, rope_theta=args.rope_theta)
    torch.manual_seed(0)
    lm = build_lm(backbone, vqgan.cfg, vocab).to(args.device)
    emit = emit_ids(images.image_token_ids, images.codes_to_block(np.zeros((GRID, GRID), int))[1])
    every = max(1, args.steps // args.evaluations)
    t0 = time.perf_counter()

    def on_step(step: int, entry: dict[str, float]) -> None:
        if (step + 1) % every == 0:
            col, row = accuracy(lm, test, tok)
            print(f'step {step + 1:5d}  loss {entry["loss"]:.3f}  column {col:.2f}  row {row:.2f}  '
                  f'chance {1 / GRID:.2f}  '
                  f'{time.perf_counter() - t0:.0f} s', flush=True)

    train_lm(lm, train, emit, args.steps, seed=0, on_step=on_step, bin_sigma=args.bin_sigma)


if __name__ == '__main__':
    main()
