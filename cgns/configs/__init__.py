"""Named run configs, shipped with the package: ``--config demo`` or a path to a JSON file.

A config is a JSON object of flat pretraining argument values (``cgns/pretraining/arguments.py``);
keys starting with ``_`` (``"_comment"``) are notes and are dropped when read.
"""
import json
import os
from typing import Any, Dict, List

CONFIG_DIR = os.path.dirname(os.path.abspath(__file__))


def config_names() -> List[str]:
    """The packaged configs' names (``demo``, ``mimic_resnet50``, ...)."""
    return sorted(name[:-len(".json")] for name in os.listdir(CONFIG_DIR) if name.endswith(".json"))


def config_path(name_or_path: str) -> str:
    """A packaged config's file for a bare name (``demo``), else ``name_or_path`` itself (a path, resolved
    against the caller's working directory). ``FileNotFoundError`` names the packaged configs."""
    if os.path.isfile(name_or_path):
        return name_or_path
    packaged = os.path.join(CONFIG_DIR, f"{name_or_path}.json")
    if os.sep not in name_or_path and "/" not in name_or_path and os.path.isfile(packaged):
        return packaged
    raise FileNotFoundError(f"no config {name_or_path!r}: pass a JSON file or one of the packaged configs "
                            f"({', '.join(config_names())})")


def read_config(name_or_path: str) -> Dict[str, Any]:
    """The values of a config (by name or path), without its ``_``-prefixed note keys."""
    with open(config_path(name_or_path)) as f:
        return {k: v for k, v in json.load(f).items() if not k.startswith("_")}


__all__ = ["CONFIG_DIR", "config_names", "config_path", "read_config"]
