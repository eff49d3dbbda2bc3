"""Read ``hyperparams.yml``: one block per env id or preset, merged over ``default``, validated
as a :class:`~windquant_gym.agents.recipe.Recipe` (unknown keys refused by name)."""

from __future__ import annotations

import copy
from importlib import resources
from pathlib import Path
from typing import Any, Dict, List

import yaml

from ..errors import UnknownNameError
from .recipe import Recipe


def _merge(base: Dict[str, Any], update: Dict[str, Any]) -> Dict[str, Any]:
    out = copy.deepcopy(base)
    for key, value in (update or {}).items():
        out[key] = _merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def merge_hyperparams(base: Dict[str, Any], update: Dict[str, Any]) -> Dict[str, Any]:
    """``update`` over ``base``, nested dicts merged key by key (a copy)."""
    return _merge(base, update)


def _table(path: str | None) -> Dict[str, Any]:
    text = Path(path).read_text() if path else resources.files(__package__).joinpath("hyperparams.yml").read_text()
    return yaml.safe_load(text) or {}


def preset_names(path: str | None = None) -> List[str]:
    """The blocks of the YAML (ours, or ``path``) other than ``default``, in file order."""
    return [str(k) for k in _table(path) if k != "default"]


def load_hyperparams(key: str = "WindQuant-v0", path: str | None = None) -> Dict[str, Any]:
    """The block ``key`` of the YAML (ours, or ``path``) merged over its ``default`` block."""
    table = _table(path)
    if key not in table:
        known = sorted(str(k) for k in table if k != "default")
        raise UnknownNameError(
            f"No hyperparameter block {key!r} in {path or 'agents/hyperparams.yml'}; known presets are {known}. "
            "Pass one of them (windquant train --preset NAME), or add a block of that name to the YAML."
        )
    return validated(_merge(table.get("default", {}), table[key]))


def load_recipe(key: str = "WindQuant-v0", path: str | None = None) -> Recipe:
    """The block ``key`` as a typed :class:`Recipe`."""
    return Recipe.from_dict(load_hyperparams(key, path))


def validated(hp: Dict[str, Any]) -> Dict[str, Any]:
    """``hp`` checked as a :class:`Recipe` and written back in its plain form (every key the
    recipe knows, with its default where the block is silent)."""
    return Recipe.from_dict(hp).to_dict()
