"""The nodes' YAML read without ROS, so offline evaluation runs with the robot's settings."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from worldvla_ros.safety import SafetyLimits


def node_parameters(config: str | Path, node: str) -> dict[str, Any]:
    data = yaml.safe_load(Path(config).read_text()) or {}
    for key, section in data.items():
        if key.strip('/').split('/')[-1] == node:
            return dict((section or {}).get('ros__parameters', {}))
    return {}


def safety_limits(params: dict[str, Any]) -> SafetyLimits:
    from worldvla_ros.model.action_tokenizer import LIBERO_ACTION_MAX, LIBERO_ACTION_MIN

    return SafetyLimits(tuple(params.get('action_min', LIBERO_ACTION_MIN)),
                        tuple(params.get('action_max', LIBERO_ACTION_MAX)),
                        tuple(params.get('max_step', [0.0] * 7)))
