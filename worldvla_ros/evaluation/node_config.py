"""The nodes' YAML read without ROS, so offline evaluation runs with the robot's settings."""
from __future__ import annotations

from typing import Any

from worldvla_ros.model.action_tokenizer import LIBERO_ACTION_MAX, LIBERO_ACTION_MIN, LIBERO_ACTION_SCALE
from worldvla_ros.robot_outputs import action_scale_problem
from worldvla_ros.safety import SafetyLimits


def safety_limits(params: dict[str, Any]) -> SafetyLimits:
    """The action node's limits from its parameters (action_min, action_max, max_step; the node's defaults where a
    YAML leaves one out)."""
    return SafetyLimits(tuple(params.get('action_min', LIBERO_ACTION_MIN)),
                        tuple(params.get('action_max', LIBERO_ACTION_MAX)),
                        tuple(params.get('max_step', [0.0] * 7)))


def action_scale_presets() -> dict[str, tuple[float, ...]]:
    from worldvla_ros.sim.tabletop import SimConfig

    return {'libero': LIBERO_ACTION_SCALE, 'tabletop': SimConfig().action_scale}


def parse_action_scale(text: str) -> tuple[float, ...]:
    """A preset name (libero, tabletop) or 7 comma-separated values; ValueError otherwise."""
    presets = action_scale_presets()
    if text in presets:
        return presets[text]
    try:
        values = tuple(float(v) for v in text.split(','))
    except ValueError:
        values = ()
    if len(values) != 7:
        raise ValueError(f'{text!r} is neither a preset ({", ".join(presets)}) nor 7 comma-separated values ≥ 0')
    problem = action_scale_problem(values)
    if problem:
        raise ValueError(f'action scale {text!r}: {problem}')
    return values


def action_scale(params: dict[str, Any]) -> tuple[float, ...]:
    return tuple(float(v) for v in params.get('action_scale', LIBERO_ACTION_SCALE))
