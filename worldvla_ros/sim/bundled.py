"""Where the bundled tabletop model lives (source tree, pip install, or a ROS workspace)."""
from __future__ import annotations

import os
import sys
from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parent.parent / 'data' / 'tabletop_model'


def bundled_checkpoint() -> Path:
    """The small model trained on the tabletop sim, shipped with the package."""
    prefixes = [p for p in os.environ.get('AMENT_PREFIX_PATH', '').split(os.pathsep) if p] + [sys.prefix]
    for candidate in [PACKAGE_DIR, *(Path(p) / 'share' / 'worldvla' / 'models' / 'tabletop' for p in prefixes)]:
        if (candidate / 'config.json').is_file():
            return candidate
    raise FileNotFoundError(f'the bundled model is missing (expected {PACKAGE_DIR}); retrain it with '
                            'scripts/train_dagger_chain.sh artifacts/chain worldvla_ros/data/tabletop_model')
