"""The bag tools under inputs as an adversary would make them: huge frames, sparse or mistyped HDF5 datasets.
Memory stays bounded whatever a file declares, and what has no single meaning is refused with a reason."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from worldvla_ros.evaluation.convert import main as convert_to_bag
from worldvla_ros.evaluation.episode import read_episode, write_episode

h5py = pytest.importorskip('h5py')
# the process's own peak: VmHWM (ru_maxrss would include the forking parent's RSS, which exec keeps on Linux)
HWM = "int(next(l for l in open('/proc/self/status') if l.startswith('VmHWM')).split()[1]) // 1024"
PEAK_RSS = f'''
import sys
from worldvla_ros.evaluation.episode import read_episode
ep = read_episode(sys.argv[1], frame_size=int(sys.argv[2]))
print(len(ep.frames), ep.frames[0].shape, {HWM})
'''


def test_a_bag_of_huge_frames_is_read_as_model_crops_in_bounded_memory(tmp_path: Path) -> None:
    """24 PNG frames of 4096² (1.2 GB decoded, a few MB in the bag): read as 64² crops, the peak stays near one
    decoded frame. Before, every decoded frame was kept whole (an 8192² bag of 60 frames reached 5.9 GB)."""
    side, n = 4096, 24
    frame = np.zeros((side, side, 3), np.uint8)
    frame[: side // 2, :, 0] = 200
    frame[:, : side // 3, 1] = 90
    bag = write_episode(tmp_path / 'huge', [frame] * n, np.zeros((n, 7)), 'pick up the block', compressed='png')
    assert sum(f.stat().st_size for f in bag.rglob('*') if f.is_file()) < 20e6
    out = subprocess.run([sys.executable, '-c', PEAK_RSS, str(bag), '64'], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    frames, shape, peak_mb = out.stdout.split(maxsplit=1)[0], out.stdout.split('(')[1].split(')')[0], \
        int(out.stdout.split()[-1])
    assert int(frames) == n and shape == '64, 64, 3'
    decoded_mb = n * side * side * 3 / 2**20
    assert peak_mb < 450, f'peak RSS {peak_mb} MiB reading {decoded_mb:.0f} MiB of decoded frames'
    # the crop is the model's: the same pixels the node feeds it
    crop = read_episode(bag, frame_size=64).frames[0]
    from worldvla_ros.image_conversion import to_model_frame

    np.testing.assert_array_equal(crop, to_model_frame(frame, 64, rotate_180=False))


def _libero(path: Path, frames: np.ndarray | None = None, actions: np.ndarray | None = None,
            sparse: tuple | None = None) -> Path:
    with h5py.File(path, 'w') as f:
        g = f.create_group('data/demo_0')
        if sparse is not None:
            g.create_dataset('obs/agentview_rgb', shape=sparse, dtype=np.uint8, chunks=(1, *sparse[1:]))
            n = sparse[0]
        else:
            g.create_dataset('obs/agentview_rgb', data=frames)
            n = len(frames)
        g.create_dataset('actions', data=np.zeros((n, 7)) if actions is None else actions)
    return path


def test_libero_frames_with_one_meaning_are_converted(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (5, 32, 32, 3), dtype=np.uint8)
    gray = rgb[..., 0]
    cases = {
        'gray': (gray, np.repeat(gray[..., None], 3, axis=3)),
        'gray1': (gray[..., None], np.repeat(gray[..., None], 3, axis=3)),
        'rgba': (np.concatenate([rgb, np.full((5, 32, 32, 1), 7, np.uint8)], axis=3), rgb),
        'float01': (rgb.astype(np.float32) / 255.0, rgb),
    }
    for name, (stored, expected) in cases.items():
        src = _libero(tmp_path / f'{name}_demo.hdf5', stored)
        assert convert_to_bag(['libero', str(src), str(tmp_path / f'out_{name}')]) == 0, name
        bag = next((tmp_path / f'out_{name}').iterdir())
        np.testing.assert_array_equal(np.stack(read_episode(bag).frames), expected, err_msg=name)


@pytest.mark.parametrize('case,says', [
    ('sparse', 'stores no data'),
    ('declared_huge', 'declares more than'),
    ('uint16', 'uint16 frames have no single meaning'),
    ('float_beyond_one', 'float frames must lie in [0, 1]'),
    ('float_nan', 'NaN or inf'),
    ('all_nan_actions', 'actions are NaN or infinite'),
    ('huge_actions', 'actions beyond'),
    ('zero_frames', 'holds no frames'),
    ('two_channels', 'not a frame sequence'),
])
def test_libero_files_without_one_meaning_are_refused_with_nothing_written(tmp_path: Path, capsys, case: str,
                                                                           says: str) -> None:
    rgb = np.random.default_rng(1).integers(0, 256, (4, 16, 16, 3), dtype=np.uint8)
    src = tmp_path / f'{case}_demo.hdf5'
    if case == 'sparse':
        _libero(src, sparse=(20000, 256, 256, 3))
    elif case == 'declared_huge':
        _libero(src, sparse=(200_000, 16, 16, 3))
    elif case == 'uint16':
        _libero(src, rgb.astype(np.uint16) * 256)
    elif case == 'float_beyond_one':
        _libero(src, rgb.astype(np.float32))  # 0 … 255 as floats: no single meaning
    elif case == 'float_nan':
        f = rgb.astype(np.float32) / 255.0
        f[2, 3, 3, 1] = np.nan
        _libero(src, f)
    elif case == 'all_nan_actions':
        _libero(src, rgb, np.full((4, 7), np.nan))
    elif case == 'huge_actions':
        a = np.zeros((4, 7))
        a[1, 0] = 1e300
        _libero(src, rgb, a)
    elif case == 'zero_frames':
        _libero(src, rgb[:0])
    else:
        _libero(src, rgb[..., :2])
    out = tmp_path / 'bags'
    assert convert_to_bag(['libero', str(src), str(out)]) == 2
    err = capsys.readouterr().err
    assert says in err and 'demo_0' in err and 'Traceback' not in err, err
    assert not out.exists() or not any(out.iterdir())


def test_a_long_libero_demo_streams_to_its_bag(tmp_path: Path) -> None:
    """3000 frames of 128² (141 MiB of frames): converted in batches, the peak stays far below the demo's size."""
    n = 3000
    src = tmp_path / 'long_demo.hdf5'
    with h5py.File(src, 'w') as f:
        d = f.create_dataset('data/demo_0/obs/agentview_rgb', shape=(n, 128, 128, 3), dtype=np.uint8,
                             chunks=(64, 128, 128, 3))
        for s in range(0, n, 500):
            values = (np.arange(s, s + 500) % 251).astype(np.uint8)[:, None, None, None]
            d[s : s + 500] = np.broadcast_to(values, (500, 128, 128, 3))  # h5py broadcasts element by element
        f.create_dataset('data/demo_0/actions', data=np.zeros((n, 7)))
    script = ('from worldvla_ros.evaluation.convert import main; '
              f'code = main(["libero", "{src}", "{tmp_path / "bags"}"]); print(code, {HWM})')
    out = subprocess.run([sys.executable, '-c', script], capture_output=True, text=True, timeout=600)
    code, peak = out.stdout.split()[-2:]
    assert code == '0', out.stderr[-2000:]
    assert int(peak) < 200, f'peak RSS {peak} MiB for a 141 MiB demo'
    ep = read_episode(next((tmp_path / 'bags').iterdir()))
    assert len(ep.frames) == n and int(ep.frames[2999][0, 0, 0]) == 2999 % 251
    assert json.dumps(ep.instruction) == '"long"'
