"""Tables that map Hugging Face checkpoint tensors onto NNX parameters, and the two helpers that use them.

A model family describes its checkpoint layout as a list of `ParamRow`s: one row per tensor, naming the
Hugging Face key, the path of the parameter in ``nnx.state(module)``, and the two layout conversions.
`load_params` and `export_params` work for any such table, so each family only writes its table.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

ArrayTransform = Callable[[np.ndarray], np.ndarray]


class ParamRow(NamedTuple):
    """One checkpoint tensor and the NNX parameter that holds it."""

    hf_key: str
    """Key in the checkpoint, without the family's prefix (e.g. ``"layers.0.self_attn.q_proj.weight"``)."""
    nnx_path: tuple[str | int, ...]
    """Path of the `nnx.Variable` in ``nnx.state(module)``."""
    to_nnx: ArrayTransform
    """Converts the checkpoint layout to the NNX layout."""
    to_hf: ArrayTransform
    """Converts the NNX layout back to the checkpoint layout (the inverse of `to_nnx`)."""


class Transform(NamedTuple):
    """A layout conversion and its inverse."""

    to_nnx: ArrayTransform
    to_hf: ArrayTransform


def _identity(array: np.ndarray) -> np.ndarray:
    return array


AS_IS = Transform(_identity, _identity)
# PyTorch's nn.Linear stores its weight as [out_features, in_features]; nnx.Linear's kernel is [in, out].
TRANSPOSE = Transform(np.transpose, np.transpose)

TemplateRow = tuple[str, tuple[str | int, ...], Transform]


def expand(template: Iterable[TemplateRow], hf_prefix: str, nnx_prefix: tuple[str | int, ...]) -> list[ParamRow]:
    """Turns ``(hf suffix, nnx subpath, transform)`` rows into `ParamRow`s under the given prefixes."""
    return [
        ParamRow(hf_prefix + hf_suffix, nnx_prefix + nnx_subpath, transform.to_nnx, transform.to_hf)
        for hf_suffix, nnx_subpath, transform in template
    ]


def _variable_at(module: nnx.Module, path: Sequence[str | int]) -> nnx.Variable:
    node = module
    for step in path:
        node = node[step] if isinstance(step, int) else getattr(node, step)
    if not isinstance(node, nnx.Variable):
        raise TypeError(f"Path {tuple(path)} leads to a {type(node).__name__}, not an nnx.Variable.")
    return node


def _hf_shape(row: ParamRow, nnx_shape: tuple[int, ...]) -> tuple[int, ...]:
    # A zero-strided view gives the checkpoint shape without allocating the tensor.
    return row.to_hf(np.broadcast_to(np.float32(0), nnx_shape)).shape


def load_params(module: nnx.Module, tensors: Mapping[str, np.ndarray], table: Sequence[ParamRow]) -> None:
    """Copies checkpoint tensors into the module's parameters, in place.

    Each tensor is converted with its row's ``to_nnx``, cast to the parameter's dtype and, when the
    parameter already lives on devices, placed with the parameter's current sharding.

    Args:
      module: the module whose parameters are overwritten.
      tensors: checkpoint tensors keyed like the table's ``hf_key`` (prefix already removed).
      table: the family's parameter table.

    Raises:
      KeyError: a key of the table is missing from ``tensors``.
      ValueError: a tensor's shape differs from the parameter's; the message names the key.
    """
    for row in table:
        if row.hf_key not in tensors:
            raise KeyError(f"The checkpoint has no tensor {row.hf_key!r}, which the model needs.")
        variable = _variable_at(module, row.nnx_path)
        current = variable.get_value()
        value = row.to_nnx(np.asarray(tensors[row.hf_key]))
        if value.shape != current.shape:
            raise ValueError(
                f"Checkpoint tensor {row.hf_key!r} has shape {tuple(np.shape(tensors[row.hf_key]))}, but the "
                f"model expects {_hf_shape(row, current.shape)}; check that the config matches the checkpoint."
            )
        value = jnp.asarray(value, dtype=current.dtype)
        sharding = getattr(current, "sharding", None)
        if sharding is not None:
            value = jax.device_put(value, sharding)
        variable.set_value(value)


def export_params(module: nnx.Module, table: Sequence[ParamRow]) -> dict[str, np.ndarray]:
    """Returns the module's parameters as float32 NumPy arrays in checkpoint layout, keyed without prefix."""
    exported = {}
    for row in table:
        value = np.asarray(jnp.asarray(_variable_at(module, row.nnx_path).get_value(), jnp.float32))
        exported[row.hf_key] = np.ascontiguousarray(row.to_hf(value))
    return exported
