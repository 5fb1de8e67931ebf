"""Child processes that run this package's own modules (``python -m cgns.downstream``, ``accelerate launch -m
cgns.pretraining``): they must import the same ``cgns`` as their parent, from any working directory."""
import os
from typing import Dict, Mapping, Optional

#: the folder that holds the ``cgns`` package (a clone's root, or site-packages)
PACKAGE_PARENT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def child_env(env: Optional[Mapping[str, str]] = None) -> Dict[str, str]:
    """``env`` (default: this process's environment) with :data:`PACKAGE_PARENT` first on ``PYTHONPATH``."""
    env = dict(os.environ if env is None else env)
    paths = [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p and p != PACKAGE_PARENT]
    env["PYTHONPATH"] = os.pathsep.join([PACKAGE_PARENT] + paths)
    return env


__all__ = ["PACKAGE_PARENT", "child_env"]
