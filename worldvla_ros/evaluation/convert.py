"""Turn recorded demonstrations into rosbag2 episodes the evaluation (and training) reads.

    convert_to_bag libero demos.hdf5 OUT_DIR [--image-key agentview_rgb] [--rate 20]
    convert_to_bag folder EPISODE_DIR OUT_BAG   # frames/*.png|jpg + actions.csv|npy + instruction.txt
    convert_to_bag synthetic OUT_BAG [--frames 40] [--storage sqlite3] [--compressed png|jpeg]

Every episode becomes one bag: ``/camera/image_raw`` (sensor_msgs/Image, rgb8; with ``--compressed``
sensor_msgs/CompressedImage on ``/camera/image_raw/compressed``), ``/instruction`` (std_msgs/String)
and ``/teleop/ee_command`` (worldvla/EndEffectorCommand, stamped with the frame it answers).

LIBERO frames are stored as the simulator rendered them. The released checkpoints' settings
(``rotate_180: true``) turn them by 180° before tokenizing, exactly as the release's LIBERO
evaluation does (``img[::-1, ::-1]``), so the model sees what it was trained on. Use
``--rotate-180`` only for a configuration with ``rotate_180: false``.

The instruction (``--instruction-source``): ``filename`` (default) is the task name from the file name
without its scene prefix (``KITCHEN_SCENE3_turn_on_the_stove_demo.hdf5`` → "turn on the stove"), the text
the release's LIBERO evaluation gives the model (``task.language``) and, for LIBERO-Spatial, -Object and
-Goal, the text it trained on. For LIBERO-10 (and -90) the release is inconsistent with itself: it trained
on the task name with underscores as spaces and the scene prefix kept ("KITCHEN SCENE3 turn on the
stove"), ``--instruction-source name``, but evaluates with the prefix stripped. ``bddl`` takes the BDDL
``:language`` text in ``problem_info``, which differs from the file name for 34 of the 130 LIBERO tasks.
"""
from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Callable
from pathlib import Path

import cv2
import numpy as np

from .bag_io import BagError
from .episode import write_episode

FRAME_SUFFIXES = ('.png', '.jpg', '.jpeg', '.bmp')


def libero_instruction(h5file: object, path: Path, source: str = 'filename') -> str:
    """The task's instruction: from the file name without its scene prefix (``'filename'``: what the release's
    evaluation uses), the file name's task name whole, underscores as spaces (``'name'``: what the release
    trained LIBERO-10 on), or the BDDL ``:language`` text in ``problem_info`` (``'bddl'``).

    The file name and the BDDL text differ for 34 of LIBERO's 130 tasks; a model must see the text it was
    trained on.
    """
    if source == 'name':
        return ' '.join(re.sub(r'_demo$', '', path.stem).replace('_', ' ').split())
    if source == 'bddl':
        info = getattr(h5file['data'], 'attrs', {}).get('problem_info')  # type: ignore[index]
        if info is None:
            raise BagError(f'{path}: no problem_info attribute: use --instruction-source filename')
        text = json.loads(info if isinstance(info, str) else info.decode()).get('language_instruction', '')
        if not str(text).strip():
            raise BagError(f'{path}: problem_info has no language_instruction: use --instruction-source filename')
        return ' '.join(str(text).split())
    stem = re.sub(r'_demo$', '', path.stem)
    stem = re.sub(r'^([A-Z_]+SCENE\d+_)', '', stem)  # LIBERO-90/10 names start with the scene
    return ' '.join(stem.replace('_', ' ').split())


MAX_DEMO_FRAMES = 100_000  # an hour and a half at LIBERO's 20 Hz; a file declaring more is refused
MAX_FRAME_SIDE = 8192  # as the nodes' camera input
STREAM_FRAMES = 64  # frames read from the HDF5 file at a time: memory stays bounded whatever a demo declares


def _frame_converter(name: str, dataset: object) -> tuple[Callable[[np.ndarray], np.ndarray], str]:
    """How a demo's stored frames become H×W×3 uint8 RGB, decided from the declared shape and dtype (and checked
    per batch as they stream), or a BagError naming the dataset and why no single meaning exists."""
    shape, dtype = tuple(dataset.shape), np.dtype(dataset.dtype)
    where = f'{name} ({shape} {dtype})'
    if (len(shape) == 4 and shape[3] == 1) or len(shape) == 3:
        channels = 1
    elif len(shape) == 4 and shape[3] in (3, 4):
        channels = shape[3]
    else:
        raise BagError(f'{where}: not a frame sequence (N, H, W[, 1|3|4])')
    n, h, w = shape[:3]
    if n == 0:
        raise BagError(f'{where}: holds no frames')
    if n > MAX_DEMO_FRAMES or max(h, w) > MAX_FRAME_SIDE or min(h, w) < 1:
        raise BagError(f'{where}: declares more than {MAX_DEMO_FRAMES} frames or sides beyond {MAX_FRAME_SIDE} px')
    storage = getattr(getattr(dataset, 'id', None), 'get_storage_size', lambda: 1)()
    if storage == 0:
        raise BagError(f'{where}: declares {n} frames but stores no data (an empty, sparse dataset)')
    if dtype == np.uint8:
        to_uint8 = None
    elif dtype.kind == 'f':
        def to_uint8(x: np.ndarray) -> np.ndarray:
            if not np.all(np.isfinite(x)) or x.min() < 0.0 or x.max() > 1.0:
                raise BagError(f'{where}: float frames must lie in [0, 1] (found {np.nanmin(x):g} … {np.nanmax(x):g}'
                               f'{", NaN or inf" if not np.all(np.isfinite(x)) else ""})')
            return np.round(x * 255.0).astype(np.uint8)
    else:
        raise BagError(f'{where}: {dtype} frames have no single meaning as RGB (8-bit integers or floats in [0, 1] '
                       'are converted)')

    def convert(batch: np.ndarray) -> np.ndarray:
        out = batch if to_uint8 is None else to_uint8(np.asarray(batch))
        out = out.reshape(*out.shape[:3], -1)
        if channels == 1:
            out = np.repeat(out, 3, axis=3)  # gray → the same value in R, G and B
        return np.ascontiguousarray(out[..., :3])  # RGBA → RGB: the alpha channel is not part of the image

    note = {1: ', gray → RGB', 3: '', 4: ', RGBA → RGB'}[channels] + (', float [0, 1] → uint8' if to_uint8 else '')
    return convert, note


def _demo_actions(name: str, dataset: object, frames: int) -> np.ndarray:
    from worldvla_ros.model.action_tokenizer import MAX_ACTION_UNITS

    actions = np.asarray(dataset, dtype=np.float64)
    if actions.ndim != 2 or actions.shape != (frames, 7):
        raise BagError(f'{name}: actions have shape {actions.shape}, expected ({frames}, 7): one per frame')
    bad = np.flatnonzero(~np.isfinite(actions).all(1))
    if len(bad):
        raise BagError(f'{name}: {len(bad)} of {frames} actions are NaN or infinite (first at step {bad[0]})')
    huge = np.flatnonzero((np.abs(actions) > MAX_ACTION_UNITS).any(1))
    if len(huge):
        raise BagError(f'{name}: actions beyond ±{MAX_ACTION_UNITS:g} units (first at step {huge[0]})')
    return actions


def libero_to_bags(
    hdf5: str | Path,
    out_dir: str | Path,
    image_key: str = 'agentview_rgb',
    rate_hz: float = 20.0,
    storage: str = 'mcap',
    rotate_180: bool = False,
    max_demos: int = 0,
    compressed: str = '',
    instruction_source: str = 'filename',
) -> list[Path]:
    """One bag per ``data/demo_*`` group of a LIBERO demonstration file. Every demo is checked before any bag is
    written; frames stream from the file to the bag a batch at a time."""
    import h5py

    hdf5, out_dir = Path(hdf5), Path(out_dir)
    try:
        f = h5py.File(hdf5, 'r')
    except OSError as exc:
        raise BagError(f'{hdf5}: not a readable HDF5 file ({exc})') from exc
    with f:
        if 'data' not in f:
            raise BagError(f'{hdf5}: no "data" group; not a LIBERO/robomimic demonstration file')
        instruction = libero_instruction(f, hdf5, instruction_source)
        demos = sorted(f['data'].keys(), key=lambda k: int(re.sub(r'\D', '', k) or 0))
        if max_demos:
            demos = demos[:max_demos]
        if not demos:
            raise BagError(f'{hdf5}: the "data" group holds no demonstrations')
        plans = []
        for name in demos:
            g = f['data'][name]
            if f'obs/{image_key}' not in g or 'actions' not in g:
                keys = list(g['obs'].keys()) if 'obs' in g else []
                raise BagError(f'{hdf5}: {name} lacks obs/{image_key} or actions (obs has: {", ".join(keys)})')
            frames = g['obs'][image_key]
            convert, note = _frame_converter(f'{hdf5.name}: {name}/obs/{image_key}', frames)
            if note:
                print(f'convert_to_bag: {name}: frames converted{note}', file=sys.stderr)
            actions = _demo_actions(f'{hdf5.name}: {name}/actions', g['actions'], frames.shape[0])
            plans.append((name, frames, convert, actions))
        out_dir.mkdir(parents=True, exist_ok=True)
        stem = re.sub(r'_demo$', '', hdf5.stem)
        bags = []
        for name, frames, convert, actions in plans:
            def stream(frames=frames, convert=convert):
                for start in range(0, frames.shape[0], STREAM_FRAMES):
                    batch = convert(frames[start : start + STREAM_FRAMES])
                    yield from (b[::-1, ::-1] if rotate_180 else b for b in batch)

            path = out_dir / f'{stem}_{name}'
            try:
                bags.append(write_episode(path, stream(), actions, instruction, rate_hz, storage,
                                          compressed=compressed))
            except BaseException:
                import shutil

                shutil.rmtree(path, ignore_errors=True)  # no half-written bag is left behind
                raise
    return bags


def folder_to_bag(folder: str | Path, out: str | Path, rate_hz: float = 10.0, storage: str = 'mcap',
                  instruction: str = '', compressed: str = '') -> Path:
    """``frames/`` (images sorted by name) + ``actions.csv`` or ``actions.npy`` (N×7) + ``instruction.txt``."""
    folder = Path(folder)
    frame_dir = folder / 'frames' if (folder / 'frames').is_dir() else folder
    files = sorted(p for p in frame_dir.iterdir() if p.suffix.lower() in FRAME_SUFFIXES)
    if not files:
        raise BagError(f'{frame_dir}: no frames ({", ".join(FRAME_SUFFIXES)})')
    from worldvla_ros.files import MB, FileRefused, check_regular, read_text

    try:
        if (folder / 'actions.npy').exists():
            actions = np.load(check_regular(folder / 'actions.npy', 256 * MB, 'actions'), allow_pickle=False)
        elif (folder / 'actions.csv').exists():
            actions = np.loadtxt(check_regular(folder / 'actions.csv', 256 * MB, 'actions'), delimiter=',', ndmin=2)
        else:
            raise BagError(f'{folder}: no actions.npy or actions.csv')
    except (FileRefused, ValueError) as exc:
        raise BagError(f'{folder}: unusable actions: {exc}') from exc
    if actions.ndim != 2 or actions.shape[1] != 7 or len(actions) != len(files):
        raise BagError(f'{folder}: actions have shape {actions.shape}, expected ({len(files)}, 7)')
    if not instruction:
        if not (folder / 'instruction.txt').is_file():
            raise BagError(f'{folder}: no instruction.txt (or give --instruction)')
        try:
            instruction = read_text(folder / 'instruction.txt', MB, 'instruction').strip()
        except FileRefused as exc:
            raise BagError(str(exc)) from exc
    frames = []
    for p in files:
        bgr = cv2.imread(str(p), cv2.IMREAD_COLOR)
        if bgr is None:
            raise BagError(f'{p}: cannot read image')
        frames.append(cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB))
    return write_episode(out, frames, actions, instruction, rate_hz, storage, compressed=compressed)


def synthetic_episode(frames: int = 40, seed: int = 0, size: int = 256) -> tuple[list[np.ndarray], np.ndarray, str]:
    """A scripted reach-grasp-carry episode of the demo camera: (frames, actions (N, 7), instruction)."""
    from worldvla_ros.synthetic import SyntheticCamera

    cam = SyntheticCamera(size=size, seed=seed)
    rng = np.random.default_rng(seed + 1)
    images, actions = [], []
    for i in range(frames):
        images.append(cam.render())
        target = cam.block if i < frames // 2 else cam.bowl
        delta = np.clip((target - cam.gripper[:2]) / 0.02, -0.9, 0.9)
        a = np.zeros(7)
        a[:2] = delta + rng.normal(0, 0.05, 2)
        a[2] = -0.3 if i < frames // 2 else 0.3
        a[3:6] = rng.normal(0, 0.02, 3)
        a[6] = 1.0 if i >= frames // 3 else -1.0
        actions.append(a)
        cam.step(a)
    return images, np.asarray(actions), 'put the red block in the bowl'


def synthetic_bag(out: str | Path, frames: int = 40, seed: int = 0, storage: str = 'mcap',
                  rate_hz: float = 10.0, size: int = 256, compressed: str = '') -> Path:
    images, actions, instruction = synthetic_episode(frames, seed, size)
    return write_episode(out, images, actions, instruction, rate_hz, storage, compressed=compressed)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog='convert_to_bag', description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest='source', required=True)
    lib = sub.add_parser('libero', help='LIBERO demonstration HDF5 → one bag per demo')
    lib.add_argument('hdf5')
    lib.add_argument('out_dir')
    lib.add_argument('--image-key', default='agentview_rgb')
    lib.add_argument('--rate', type=float, default=20.0, help='Hz (LIBERO control rate: 20)')
    lib.add_argument('--rotate-180', action='store_true', help='store frames turned by 180° (see above)')
    lib.add_argument('--max-demos', type=int, default=0)
    lib.add_argument('--instruction-source', choices=('filename', 'name', 'bddl'), default='filename',
                     help='filename (default): the task name from the file name, scene prefix stripped: what the '
                          "release evaluates every suite with and trained Spatial/Object/Goal on; name: the whole "
                          'task name, scene prefix kept, underscores as spaces: what the release trained LIBERO-10 '
                          "on (it then evaluates with the prefix stripped); bddl: problem_info's language_instruction")
    fol = sub.add_parser('folder', help='frames + actions + instruction.txt → one bag')
    fol.add_argument('folder')
    fol.add_argument('out')
    fol.add_argument('--rate', type=float, default=10.0)
    fol.add_argument('--instruction', default='')
    syn = sub.add_parser('synthetic', help='a small scripted episode of the demo camera')
    syn.add_argument('out')
    syn.add_argument('--frames', type=int, default=40)
    syn.add_argument('--seed', type=int, default=0)
    syn.add_argument('--rate', type=float, default=10.0)
    for p in (lib, fol, syn):
        p.add_argument('--storage', choices=('mcap', 'sqlite3'), default='mcap')
        p.add_argument('--compressed', choices=('png', 'jpeg'), default='',
                       help='store the camera as CompressedImage on <topic>/compressed (png is lossless)')
    args = parser.parse_args(argv)
    try:
        if args.source == 'libero':
            bags = libero_to_bags(args.hdf5, args.out_dir, args.image_key, args.rate, args.storage,
                                  args.rotate_180, args.max_demos, args.compressed, args.instruction_source)
        elif args.source == 'folder':
            bags = [folder_to_bag(args.folder, args.out, args.rate, args.storage, args.instruction, args.compressed)]
        else:
            bags = [synthetic_bag(args.out, args.frames, args.seed, args.storage, args.rate,
                                  compressed=args.compressed)]
    except (BagError, FileExistsError, ValueError) as exc:
        print(f'convert_to_bag: error: {exc}', file=sys.stderr)
        return 2
    except OSError as exc:  # unreadable input, or a full disk while writing
        print(f'convert_to_bag: error: {exc.filename or ""} {exc.strerror or exc}'.replace('  ', ' '), file=sys.stderr)
        return 2
    for b in bags:
        print(b)
    return 0


if __name__ == '__main__':
    raise SystemExit(main())
