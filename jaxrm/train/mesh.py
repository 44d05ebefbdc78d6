"""The device mesh ``(data, fsdp, model)`` and where every array lives on it.

One code path from one CPU to a TPU pod: the batch is split over ``data × fsdp``, parameters (and
their optimizer moments) are split over ``fsdp`` on their ``embed`` dimension and over ``model`` on
heads / MLP / vocabulary dimensions. The train step is a plain ``jax.jit`` with these shardings;
XLA inserts the all-gathers and reduce-scatters, and the loss over the global batch array is the
exact global mean.

Models name their parameter dimensions logically (``"embed"``, ``"heads"``, …); :data:`LOGICAL_RULES`
maps the names to mesh axes. A dimension that the axis does not divide stays replicated.
"""

from __future__ import annotations

import jax
import numpy as np
from flax import nnx
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from jaxrm.train.config import ConfigError, MeshConfig

AXES = ("data", "fsdp", "model")
BATCH_AXES = ("data", "fsdp")
LOGICAL_RULES = {
    "embed": "fsdp",
    "vocab": "model",
    "heads": "model",
    "kv_heads": "model",
    "mlp": "model",
}


def make_mesh(config: MeshConfig, devices=None) -> Mesh:
    """The ``(data, fsdp, model)`` mesh over ``devices`` (default: every device of every process).

    One axis may be ``-1``: it takes every device the other two leave.
    """
    devices = list(devices if devices is not None else jax.devices())
    shape = [config.data, config.fsdp, config.model]
    if -1 in shape:
        fixed = int(np.prod([size for size in shape if size != -1]))
        shape[shape.index(-1)] = len(devices) // fixed
    if int(np.prod(shape)) != len(devices):
        raise ConfigError(
            f"mesh.data × mesh.fsdp × mesh.model = {' × '.join(map(str, shape))} = {int(np.prod(shape))}, "
            f"but there are {len(devices)} devices; make the product equal the device count "
            "(one axis may be -1 to take the rest)"
        )
    return jax.make_mesh(tuple(shape), AXES, axis_types=(AxisType.Auto,) * 3, devices=devices)


def batch_sharding(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P(BATCH_AXES))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def mesh_spec(logical: P | tuple, shape: tuple[int, ...], mesh: Mesh) -> P:
    """Maps a logical partition spec to mesh axes, replicating dimensions the axis cannot divide."""
    used, axes = set(), []
    for name, size in zip(tuple(logical) + (None,) * (len(shape) - len(logical)), shape):
        axis = LOGICAL_RULES.get(name) if isinstance(name, str) else None
        if axis is None or axis in used or mesh.shape[axis] == 1 or size % mesh.shape[axis]:
            axes.append(None)
        else:
            axes.append(axis)
            used.add(axis)
    return P(*axes)


def state_shardings(state: nnx.State, mesh: Mesh):
    """A ``NamedSharding`` per parameter of an (abstract) nnx state, from its logical names."""
    logical = nnx.get_partition_spec(state)
    return jax.tree.map(
        lambda spec, leaf: NamedSharding(mesh, mesh_spec(spec, leaf.shape, mesh)),
        logical, state,
        is_leaf=lambda x: isinstance(x, P),
    )


def on_mesh(tree, mesh: Mesh):
    """Replicates over ``mesh`` every array of ``tree`` that is not laid out on it yet (step, counters).

    An array on the right devices but without a ``NamedSharding`` of ``mesh`` (a counter made on the one
    device of a one-device mesh) is placed too: jit keys its cache on the sharding, so otherwise the
    first step's state and every later step's would compile the step twice.
    """
    def place(x):
        on_this_mesh = isinstance(x.sharding, NamedSharding) and x.sharding.mesh == mesh
        return x if on_this_mesh else jax.device_put(x, replicated(mesh))

    return jax.tree.map(place, tree)


def global_batch(local_batch, mesh: Mesh):
    """This process's rows of a batch → one global ``jax.Array`` per field, sharded over the batch axes."""
    sharding = batch_sharding(mesh)
    return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)), local_batch)


def check_batch_divides(batch_size: int, mesh: Mesh, grad_accum_steps: int = 1) -> None:
    shards = mesh.shape["data"] * mesh.shape["fsdp"]
    micro = batch_size // grad_accum_steps
    if micro % shards:
        raise ConfigError(
            f"train.batch_size / train.grad_accum_steps = {micro} examples per micro-batch must divide by "
            f"mesh.data × mesh.fsdp = {shards} batch shards"
        )
