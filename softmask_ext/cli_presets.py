"""Help text of the command-line options whose values come from a preset (``finetune``, ``pretrain --family mdlm``).

Such an option has ``default=None`` (so an explicit flag can be told from the preset's value); its help lists each
preset's value, or the one default every preset shares, instead of argparse's ``(default: None)``.
"""

from __future__ import annotations

import argparse
from collections.abc import Mapping
from typing import Any

__all__ = ["PresetHelpFormatter", "describe_preset_options"]


class PresetHelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows defaults, except the None of options whose value comes from the preset (their help says it)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        return action.help if action.default is None else super()._get_help_string(action)


def _preset_values(key: str, presets: Mapping[str, Mapping[str, Any]], fallbacks: Mapping[str, Any]) -> str:
    """``presets: tiny 0.0001, dream-paper 1e-05``, or the default every preset shares."""
    if any(key in preset for preset in presets.values()):
        return "presets: " + ", ".join(
            f"{name} {preset.get(key, fallbacks.get(key))}" for name, preset in presets.items()
        )
    return f"default: {fallbacks[key]}"


def describe_preset_options(
    parser: argparse.ArgumentParser, presets: Mapping[str, Mapping[str, Any]], fallbacks: Mapping[str, Any]
) -> None:
    """Append each preset's value (or the fallback) to the help of the options with ``default=None`` that a preset
    or ``fallbacks`` (the values no preset sets) gives a value, matched by ``dest``."""
    for action in parser._actions:
        in_preset = any(action.dest in preset for preset in presets.values())
        if action.default is None and (in_preset or fallbacks.get(action.dest) is not None):
            action.help = f"{action.help or ''} ({_preset_values(action.dest, presets, fallbacks)})".lstrip()
