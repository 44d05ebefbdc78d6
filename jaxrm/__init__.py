"""jaxrm: reward models for RLHF in JAX and Flax NNX.

Importing the package loads nothing else: ``jaxrm.losses`` imports only JAX, so users who want the
ranking losses pay nothing for the rest, and the model and training names load on first use. (The
``jaxrm`` command imports `jaxrm.host` first and may restart itself before JAX is loaded.)
"""

import importlib

__version__ = "0.1.0"

_LAZY = {
    "losses": None,  # the submodule itself
    "RewardModel": "jaxrm.models",
    "load_tokenizer": "jaxrm.models",
}


def __getattr__(name):
    if name not in _LAZY:
        raise AttributeError(f"module 'jaxrm' has no attribute {name!r}")
    if _LAZY[name] is None:
        return importlib.import_module(f"jaxrm.{name}")
    return getattr(importlib.import_module(_LAZY[name]), name)


__all__ = ["losses", "RewardModel", "load_tokenizer", "__version__"]
