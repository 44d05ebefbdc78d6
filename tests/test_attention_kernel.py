"""jaxrm.kernels.attention: the fused float32 attention kernel against float64 NumPy (forward, probabilities and
gradients, with grouped heads, shared bias rows, masked keys and fully masked rows), the bfloat16 kernel against NumPy
with the same bfloat16 roundings, jaxrm's layers through both against XLA's operations, and where the layers take
them. Needs a C++ compiler (skipped without one), and for the bfloat16 kernel a CPU with AVX512-BF16."""

import doctest
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

import jax
import jax.numpy as jnp
from flax import nnx

from jaxrm.kernels import amx, attention
from jaxrm.models import RewardModel, layers

pytestmark = pytest.mark.skipif(not (shutil.which("c++") or shutil.which("g++")), reason="no C++ compiler")
# Where the CPU has AVX512-BF16 the bfloat16 kernel must build: a failed build fails these tests.
needs_bfloat16 = pytest.mark.skipif(not attention.bfloat16_built(), reason="this CPU has no AVX512-BF16")


def _reference(q, k, v, bias, out_grad):
    """Forward and backward of attention in float64: O, P and (dQ, dK, dV), item i taking bias row
    i // (items // B) and query r its row r mod T."""
    q, k, v, bias, out_grad = (np.asarray(x, np.float64) for x in (q, k, v, bias, out_grad))
    scores = np.einsum("iqd,isd->iqs", q, k) + _per_item(bias, *q.shape[:2])
    p = np.exp(scores - scores.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    out = p @ v
    dp = np.einsum("iqd,isd->iqs", out_grad, v)
    ds = p * (dp - (out_grad * out).sum(-1, keepdims=True))
    return out, p, (ds @ k, np.einsum("iqs,iqd->isd", ds, q), np.einsum("iqs,iqd->isd", p, out_grad))


def _per_item(bias, items, queries):
    """The bias [B, T, S] as each item's [Q, S]: item i takes row i // (items // B), query r its row r mod T."""
    rows, positions, _ = bias.shape
    return np.stack([np.tile(bias[i // (items // rows)], (queries // positions, 1)) for i in range(items)])


def _operands(items, queries, keys, depth, bias_rows, positions, seed=0):
    rng = np.random.default_rng(seed)
    q, k, v, g = (rng.normal(size=shape).astype(np.float32)
                  for shape in ((items, queries, depth), (items, keys, depth), (items, keys, depth),
                                (items, queries, depth)))
    masked = rng.random((bias_rows, positions, keys)) < 0.3
    masked[0, 0] = True  # a query that may read no key attends uniformly
    bias = np.where(masked, layers.MASKED_SCORE, 0.0).astype(np.float32)
    return q, k, v, bias, g


@pytest.mark.parametrize("items, queries, keys, depth, bias_rows, positions", [
    (6, 20, 16, 8, 2, 10),     # two heads of a group, three items per bias row
    (4, 7, 24, 16, 4, 7),      # a query count that is no multiple of the row blocks; 24 keys: a panel of 8 left
    (2, 64, 40, 40, 1, 16),    # four heads of a group, one bias row for every item
    (3, 1, 8, 8, 3, 1),        # one query per item
])
def test_attention_and_its_gradients_match_numpy(items, queries, keys, depth, bias_rows, positions):
    assert attention.available()
    q, k, v, bias, g = _operands(items, queries, keys, depth, bias_rows, positions)
    out, p = attention.attention(*map(jnp.asarray, (q, k, v, bias)))
    want_out, want_p, want_grads = _reference(q, k, v, bias, g)
    np.testing.assert_allclose(np.asarray(p), want_p, atol=2e-6)
    np.testing.assert_allclose(np.asarray(out), want_out, atol=1e-5)
    np.testing.assert_allclose(np.asarray(p)[0, 0], 1.0 / keys, rtol=1e-6)  # a fully masked row: uniform
    grads = attention.attention_backward(*map(jnp.asarray, (q, k, v)), p, out, jnp.asarray(g))
    for name, ours, want in zip(("dq", "dk", "dv"), grads, want_grads):
        np.testing.assert_allclose(np.asarray(ours), want, atol=1e-5 * max(1.0, np.abs(want).max()), err_msg=name)
    inference, none = attention.attention(*map(jnp.asarray, (q, k, v, bias)), probabilities=False)
    assert none is None
    np.testing.assert_array_equal(np.asarray(inference), np.asarray(out))


def _bfloat16(x):
    return np.asarray(jnp.asarray(x, jnp.float32).astype(jnp.bfloat16).astype(jnp.float32), np.float64)


def _bfloat16_reference(q, k, v, bias, out_grad):
    """`_reference` with the bfloat16 kernel's roundings: P, dO and dS rounded to bfloat16 before the products that
    read them (float64 otherwise), the inputs already bfloat16."""
    q, k, v, out_grad = (np.asarray(x, np.float64) for x in (q, k, v, out_grad))
    scores = np.einsum("iqd,isd->iqs", q, k) + _per_item(bias, *q.shape[:2])
    p = np.exp(scores - scores.max(-1, keepdims=True))
    p = _bfloat16(p / p.sum(-1, keepdims=True))
    out = p @ v
    dout = _bfloat16(out_grad)
    dp = np.einsum("iqd,isd->iqs", dout, v)
    ds = _bfloat16(p * (dp - (out_grad * out).sum(-1, keepdims=True)))
    return out, p, (ds @ k, np.einsum("iqs,iqd->isd", ds, q), np.einsum("iqs,iqd->isd", p, dout))


@needs_bfloat16
@pytest.mark.parametrize("items, queries, keys, depth, bias_rows, positions", [
    (6, 32, 32, 16, 2, 16),    # two heads of a group, three items per bias row
    (4, 26, 48, 32, 4, 13),    # 26 queries: two blocks of 12 rows and one of 2; 48 keys: a panel of 16 left
    (2, 64, 16, 64, 1, 16),    # four heads of a group, one bias row for every item, wide heads
    (3, 2, 16, 16, 3, 1),      # two heads of one query each
])
def test_bfloat16_attention_matches_numpy_with_its_roundings(items, queries, keys, depth, bias_rows, positions):
    """The bfloat16 kernel (P bfloat16, float32 out and gradients) against float64 NumPy that rounds P, dO and dS
    to bfloat16 where the kernel does: agreement to float32 accumulation, but for the few elements of P and dS
    whose float32 value rounds to the other bfloat16 neighbour (one bfloat16 step, 2⁻⁸ relative)."""
    q, k, v, bias, g = _operands(items, queries, keys, depth, bias_rows, positions, seed=queries)
    q, k, v = (jnp.asarray(x, jnp.bfloat16) for x in (q, k, v))
    assert attention.bfloat16_takes(q, k)
    out, p = attention.attention(q, k, v, jnp.asarray(bias))
    assert out.dtype == jnp.float32 and p.dtype == jnp.bfloat16
    want_out, want_p, want_grads = _bfloat16_reference(q, k, v, bias, g)
    np.testing.assert_allclose(np.asarray(p, np.float64), want_p, atol=2 ** -8)  # at most one bfloat16 step
    np.testing.assert_array_equal(np.asarray(p, np.float64)[0, 0], _bfloat16(1.0 / keys))  # fully masked: uniform
    masked = _per_item(bias, items, queries) < 0
    assert np.all(np.asarray(p)[masked & ~masked.all(-1, keepdims=True)] == 0)  # exactly, where a key is allowed
    np.testing.assert_allclose(np.asarray(out), want_out, atol=1e-4 * np.abs(want_out).max())  # seen: ≤ 2e-7
    grads = attention.attention_backward(q, k, v, p, out, jnp.asarray(g))
    for name, ours, want in zip(("dq", "dk", "dv"), grads, want_grads):
        assert ours.dtype == jnp.float32
        np.testing.assert_allclose(np.asarray(ours), want, atol=5e-4 * np.abs(want).max(), err_msg=name)  # ≤ 2e-6
    inference, none = attention.attention(q, k, v, jnp.asarray(bias), probabilities=False)
    assert none is None
    np.testing.assert_array_equal(np.asarray(inference), np.asarray(out))


@needs_bfloat16
def test_bfloat16_shapes_the_kernel_does_not_take_are_widened():
    """A head size or key count that is no multiple of 16, or an odd query count: float32 P from the float32 kernel
    on the widened operands (the same values as calling it on them)."""
    for queries, keys, depth in ((8, 24, 16), (8, 16, 8), (7, 16, 16)):
        q, k, v, bias, g = map(jnp.asarray, _operands(2, queries, keys, depth, 1, queries))
        q16, k16, v16 = (x.astype(jnp.bfloat16) for x in (q, k, v))
        assert not attention.bfloat16_takes(q16, k16)
        out, p = attention.attention(q16, k16, v16, bias)
        want_out, want_p = attention.attention(*(x.astype(jnp.float32) for x in (q16, k16, v16)), bias)
        assert p.dtype == jnp.float32
        np.testing.assert_array_equal(np.asarray(out), np.asarray(want_out))
        grads = attention.attention_backward(q16, k16, v16, p, out, g)
        want_grads = attention.attention_backward(*(x.astype(jnp.float32) for x in (q16, k16, v16)), p, out, g)
        for ours, want in zip(grads, want_grads):
            np.testing.assert_array_equal(np.asarray(ours), np.asarray(want))


def test_masked_keys_get_exactly_zero_probability():
    q, k, v, bias, _ = _operands(4, 12, 16, 8, 4, 12, seed=3)
    _, p = attention.attention(*map(jnp.asarray, (q, k, v, bias)))
    masked = np.broadcast_to(bias < 0, p.shape)
    live = ~np.all(masked, axis=-1, keepdims=True)  # rows with some allowed key
    assert np.all(np.asarray(p)[masked & live] == 0.0)
    np.testing.assert_allclose(np.asarray(p).sum(-1), 1.0, rtol=1e-6)


def test_shapes_and_dtypes_are_checked():
    q, k, v, bias, g = map(jnp.asarray, _operands(2, 8, 16, 8, 1, 8))
    with pytest.raises(ValueError, match="float32"):
        attention.attention(q.astype(jnp.bfloat16), k, v, bias)
    with pytest.raises(ValueError, match="multiples of 8"):
        attention.attention(q[..., :4], k[..., :4], v[..., :4], bias)
    with pytest.raises(ValueError, match="bias"):
        attention.attention(q, k, v, bias[:, :3])  # 3 positions do not divide 8 queries
    out, p = attention.attention(q, k, v, bias)
    with pytest.raises(ValueError, match="do not match"):
        attention.attention_backward(q, k, v, p[:, :4], out, g)


def _layer_gradients(batch, length, heads, kv_heads, head_dim, seed=0):
    rng = np.random.default_rng(seed)
    query = jnp.asarray(rng.normal(size=(batch, length, heads, head_dim)), jnp.float32)
    key, value = (jnp.asarray(rng.normal(size=(batch, length, kv_heads, head_dim)), jnp.float32) for _ in range(2))
    segment_ids = np.ones((batch, length), np.int32)
    segment_ids[0, length // 2:] = 2  # a packed row: two sequences
    segment_ids[-1, -3:] = 0          # and padding
    mask = layers.segment_mask(segment_ids, segment_ids)
    weights = jnp.asarray(rng.normal(size=(batch, length, heads, head_dim)), jnp.float32)

    def loss(query, key, value):
        out = layers.attention(query, key, value, mask, scale=head_dim ** -0.5)
        return jnp.sum(out * weights), out

    (_, out), grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))(query, key, value)
    return out, grads


@pytest.mark.parametrize("heads, kv_heads, head_dim", [(4, 4, 16), (4, 2, 8)])
def test_layers_attention_through_the_kernel_matches_xla(heads, kv_heads, head_dim, monkeypatch):
    """One mask for every head of a row (packed sequences and padding): jaxrm's attention layer gives XLA's values
    and gradients through the kernel, for ordinary and grouped-query heads."""
    results = {}
    for use_kernel in (True, False):
        monkeypatch.setattr(attention, "enabled", lambda: use_kernel)
        jax.clear_caches()  # custom_vjp rules are traced once per signature and cached: trace them anew
        text = jax.jit(lambda q, k, v: layers.attention(q, k, v, jnp.ones((1, 1, 1, 24), bool), scale=1.0)).lower(
            *(jnp.ones((2, 24, n, head_dim)) for n in (heads, kv_heads, kv_heads))).as_text()
        assert (attention.ATTENTION_INFERENCE in text) == use_kernel
        results[use_kernel] = _layer_gradients(3, 24, heads, kv_heads, head_dim)
    jax.clear_caches()
    (out, grads), (want_out, want_grads) = results[True], results[False]
    np.testing.assert_allclose(np.asarray(out), np.asarray(want_out), atol=2e-5)
    for name, ours, want in zip(("query", "key", "value"), grads, want_grads):
        np.testing.assert_allclose(np.asarray(ours), np.asarray(want), atol=2e-5 * float(np.abs(want).max()),
                                   err_msg=name)


@pytest.mark.parametrize("family", ["bert", "qwen3"])
def test_reward_model_through_the_kernel_matches_xla(family, monkeypatch, tiny_config):
    """The whole packed float32 forward and backward pass of a reward model, its attention through the kernel,
    gives XLA's rewards and parameter gradients (Qwen3: grouped-query heads)."""
    config = tiny_config(family)
    rng = np.random.default_rng(0)
    input_ids = jnp.asarray(rng.integers(2, 128, (2, 40)), jnp.int32)
    segment_ids = jnp.asarray([[1] * 23 + [2] * 12 + [0] * 5, [1] * 40], jnp.int32)
    graphdef, params = nnx.split(RewardModel.from_config(config, rngs=nnx.Rngs(0), dtype=jnp.float32), nnx.Param)

    def loss(p):
        rewards = nnx.merge(graphdef, p).packed_rewards(input_ids, segment_ids, 2)
        return jnp.sum(rewards * jnp.array([[1.0, -0.5], [0.25, 2.0]]))

    results = {}
    for use_kernel in (True, False):
        monkeypatch.setattr(attention, "enabled", lambda: use_kernel)
        jax.clear_caches()
        step = jax.jit(jax.value_and_grad(loss))
        assert (attention.ATTENTION in step.lower(params).as_text()) == use_kernel
        results[use_kernel] = step(params)
    jax.clear_caches()
    (value, grads), (want_value, want_grads) = results[True], results[False]
    np.testing.assert_allclose(float(value), float(want_value), rtol=1e-5)
    for (path, ours), (_, want) in zip(jax.tree_util.tree_leaves_with_path(grads),
                                       jax.tree_util.tree_leaves_with_path(want_grads)):
        scale = max(float(np.abs(np.asarray(want)).max()), 1e-6)
        np.testing.assert_allclose(np.asarray(ours), np.asarray(want), atol=1e-4 * scale,
                                   err_msg=jax.tree_util.keystr(path))


def test_bfloat16_attention_runs_the_float32_kernel_on_widened_operands(monkeypatch):
    """Without AMX, bfloat16 attention of a head size the bfloat16 kernel does not take (8) goes through the
    float32 kernel on the widened operands: on inputs that bfloat16 holds exactly (and a power-of-two scale) its
    output is the float32 kernel's bit for bit, and its gradients are the float32 kernel's rounded to bfloat16 (the
    gradient of the layer's cast); against XLA's own bfloat16 path, which rounds P and dS to bfloat16, they agree to
    bfloat16's precision."""
    rng = np.random.default_rng(1)
    batch, length, heads, head_dim = 2, 24, 4, 8
    operands = [jnp.asarray(rng.normal(size=(batch, length, heads, head_dim)), jnp.bfloat16).astype(jnp.float32)
                for _ in range(3)]
    weights = jnp.asarray(rng.normal(size=(batch, length, heads, head_dim)), jnp.float32)
    mask = layers.segment_mask(*(jnp.asarray([[1] * 16 + [2] * 6 + [0] * 2] * batch, jnp.int32),) * 2)
    monkeypatch.setattr(amx, "enabled", lambda: False)

    def run(dtype, use_kernel):
        monkeypatch.setattr(attention, "enabled", lambda: use_kernel)
        jax.clear_caches()
        loss = lambda q, k, v: jnp.sum(layers.attention(q, k, v, mask, scale=0.25, dtype=dtype) * weights)
        step = jax.jit(jax.value_and_grad(lambda *x: (loss(*x), layers.attention(*x, mask, scale=0.25, dtype=dtype)),
                                          argnums=(0, 1, 2), has_aux=True))
        text = step.lower(*operands).as_text()
        assert (attention.ATTENTION in text) == use_kernel and attention.ATTENTION_BF16 not in text
        (_, out), grads = step(*operands)
        return np.asarray(out), [np.asarray(g) for g in grads]

    out, grads = run(jnp.bfloat16, True)
    f32_out, f32_grads = run(jnp.float32, True)
    xla_out, xla_grads = run(jnp.bfloat16, False)
    jax.clear_caches()
    np.testing.assert_array_equal(out, f32_out)
    for ours, want, xla in zip(grads, f32_grads, xla_grads):
        np.testing.assert_array_equal(ours, np.asarray(jnp.asarray(want).astype(jnp.bfloat16).astype(jnp.float32)))
        np.testing.assert_allclose(ours, xla, atol=2e-2 * float(np.abs(xla).max()))
    np.testing.assert_allclose(out, xla_out, atol=2e-2 * float(np.abs(xla_out).max()))


@needs_bfloat16
@pytest.mark.parametrize("heads, kv_heads, head_dim", [(4, 4, 16), (4, 2, 32)])
def test_layers_bfloat16_attention_through_the_bfloat16_kernel_matches_xla(heads, kv_heads, head_dim, monkeypatch):
    """bfloat16 attention (packed sequences, padding, grouped-query heads) through the bfloat16 kernel against XLA's
    bfloat16 path: both round P and dS to bfloat16 for their products, from float32 values that differ in the
    last bits; dS sums to zero along each row, so dQ and dK are cancelling sums of such rounded terms, and the
    two agree to ~1 % of each gradient's scale (the kernel alone against NumPy with its roundings: above)."""
    rng = np.random.default_rng(2)
    batch, length = 2, 32
    query = jnp.asarray(rng.normal(size=(batch, length, heads, head_dim)), jnp.float32)
    key, value = (jnp.asarray(rng.normal(size=(batch, length, kv_heads, head_dim)), jnp.float32) for _ in range(2))
    weights = jnp.asarray(rng.normal(size=query.shape), jnp.float32)
    mask = layers.segment_mask(*(jnp.asarray([[1] * 20 + [2] * 9 + [0] * 3] * batch, jnp.int32),) * 2)
    monkeypatch.setattr(amx, "enabled", lambda: False)
    loss = lambda q, k, v: jnp.sum(layers.attention(q, k, v, mask, scale=head_dim ** -0.5, dtype=jnp.bfloat16)
                                   * weights)
    results = {}
    for use_kernel in (True, False):
        monkeypatch.setattr(attention, "enabled", lambda: use_kernel)
        jax.clear_caches()
        step = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))
        assert (attention.ATTENTION_BF16 in step.lower(query, key, value).as_text()) == use_kernel
        results[use_kernel] = step(query, key, value)
    jax.clear_caches()
    (value_ours, grads), (value_xla, grads_xla) = results[True], results[False]
    np.testing.assert_allclose(float(value_ours), float(value_xla), rtol=1e-2)
    for name, ours, want in zip(("query", "key", "value"), grads, grads_xla):
        np.testing.assert_allclose(np.asarray(ours), np.asarray(want), atol=1.5e-2 * float(np.abs(want).max()),
                                   err_msg=name)


def test_takes_float32_with_lane_multiples_on_one_device(monkeypatch):
    """The test session has 8 virtual devices: a custom call has no sharding rule, so XLA's operations stay."""
    ones = lambda *shape, dtype=jnp.float32: jnp.ones(shape, dtype)
    assert jax.device_count() == 8 and not attention.enabled()
    monkeypatch.setattr(attention, "enabled", lambda: True)
    assert attention.takes(ones(2, 3, 16, 8), ones(2, 3, 24, 8), ones(2, 3, 24, 8))
    assert attention.takes(ones(2, 3, 16, 8, dtype=jnp.bfloat16), *(ones(2, 3, 24, 8, dtype=jnp.bfloat16),) * 2)
    assert not attention.takes(ones(2, 3, 16, 8, dtype=jnp.bfloat16), *(ones(2, 3, 24, 8),) * 2)  # mixed
    assert not attention.takes(*(ones(2, 3, 24, 8, dtype=jnp.float16),) * 3)
    assert not attention.takes(ones(2, 3, 16, 8), ones(2, 3, 20, 8), ones(2, 3, 20, 8))  # 20 keys
    assert not attention.takes(ones(2, 3, 16, 12), ones(2, 3, 24, 12), ones(2, 3, 24, 12))  # head size 12


def test_one_device_takes_it_and_xla_only_does_not():
    """In a process with one CPU device the layers trace the kernel; inside `amx.xla_products` (what `jaxrm bench
    train` counts FLOPs on) XLA's operations, and the kernel again after it."""
    code = """
import jax, jax.numpy as jnp
from jaxrm.kernels import amx, attention
from jaxrm.models import layers
x = jnp.ones((2, 16, 4, 8))
traced = jax.jit(lambda x: layers.attention(x, x, x, jnp.ones((2, 1, 1, 16), bool), scale=1.0))
uses = lambda: attention.ATTENTION_INFERENCE in traced.lower(x).as_text()
before = uses()
with amx.xla_products():
    inside = uses()
print(jax.device_count(), before, inside, uses())
"""
    environ = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=environ).stdout
    assert out.split() == ["1", "True", "False", "True"]


def test_the_module_examples_hold():
    assert doctest.testmod(attention, raise_on_error=False).failed == 0
