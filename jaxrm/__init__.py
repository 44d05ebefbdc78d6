"""jaxrm: reward models for RLHF in JAX and Flax NNX.

``jaxrm.losses`` imports only JAX, so users who want the ranking losses pay nothing for the rest;
the model and training names load on first use.
"""

from jaxrm import losses

__version__ = "0.1.0"

_LAZY = {
    "RewardModel": "jaxrm.models",
    "load_tokenizer": "jaxrm.models",
}


def __getattr__(name):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'jaxrm' has no attribute {name!r}")


__all__ = ["losses", "RewardModel", "load_tokenizer", "__version__"]
