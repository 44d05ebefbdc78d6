"""jaxrm.kernels.amx: the AMX matrix product against float64 NumPy, and reward models' gradients through it against
XLA's products. The kernel tests need a CPU with AMX and a C++ compiler (skipped elsewhere: the layers then never
call it)."""

import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

import jax
import jax.numpy as jnp
from flax import nnx

from jaxrm.kernels import amx
from jaxrm.models import RewardModel

# Where the CPU has AMX and a C++ compiler is installed, the kernel must build: a failed build fails these tests.
needs_amx = pytest.mark.skipif(not amx.cpu_has_amx() or not (shutil.which("c++") or shutil.which("g++")),
                               reason="this CPU has no AMX tile unit, or no C++ compiler is installed")

FLAGS = "flags\t\t: fpu sse avx512f avx512_bf16 {} arch_capabilities\n"


def test_cpu_has_amx_reads_both_flags():
    assert amx.cpu_has_amx(FLAGS.format("amx_bf16 amx_tile amx_int8"))
    assert not amx.cpu_has_amx(FLAGS.format("amx_tile"))  # tiles without the bfloat16 unit
    assert not amx.cpu_has_amx(FLAGS.format(""))
    assert not amx.cpu_has_amx("processor : 0\n")


def test_jaxrm_amx_0_turns_it_off():
    code = "from jaxrm.kernels import amx; print(amx.available(), amx.enabled())"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**os.environ, "JAXRM_AMX": "0"}).stdout
    assert out.split() == ["False", "False"]


def _reference(a, b, transpose_a, transpose_b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    a = np.swapaxes(a, -1, -2) if transpose_a else a
    b = np.swapaxes(b, -1, -2) if transpose_b else b
    return a @ b


# Ragged edges in every dimension (tiles are 16 rows × 32 values), tiny and empty contractions, and batches; then
# contractions deeper than 2,048, which go by panels of up to 512 × 256 over chunks of 512 (a ragged last chunk,
# two panels each way, ragged panels).
SHAPES = [((), 64, 32, 48), ((), 17, 5, 3), ((), 1, 1, 1), ((), 100, 70, 33), ((), 33, 64, 31),
          ((), 256, 384, 96), ((3,), 40, 24, 50), ((2, 3), 16, 32, 16), ((4,), 1, 65, 2),
          ((), 600, 2100, 300), ((2,), 40, 2200, 50)]


@needs_amx
@pytest.mark.parametrize("transpose_a", [False, True])
@pytest.mark.parametrize("transpose_b", [False, True])
@pytest.mark.parametrize("batch, m, k, n", SHAPES)
def test_matmul_matches_float64_numpy(batch, m, k, n, transpose_a, transpose_b):
    rng = np.random.default_rng(m * 1000 + k * 10 + n)
    a = rng.standard_normal((*batch, *((k, m) if transpose_a else (m, k)))).astype(jnp.bfloat16)
    b = rng.standard_normal((*batch, *((n, k) if transpose_b else (k, n)))).astype(jnp.bfloat16)
    product = jax.jit(amx.matmul, static_argnums=(2, 3))(a, b, transpose_a, transpose_b)
    assert product.shape == (*batch, m, n) and product.dtype == jnp.float32
    reference = _reference(a, b, transpose_a, transpose_b)
    # float32 accumulation of at most 384 exact bfloat16 products
    np.testing.assert_allclose(np.asarray(product), reference, rtol=1e-5, atol=1e-5 * np.sqrt(k))


@needs_amx
def test_matmul_of_an_empty_contraction_is_zero():
    product = amx.matmul(jnp.ones((5, 0), jnp.bfloat16), jnp.ones((0, 7), jnp.bfloat16))
    np.testing.assert_array_equal(np.asarray(product), np.zeros((5, 7), np.float32))


@needs_amx
def test_matmul_rejects_what_it_cannot_multiply():
    with pytest.raises(ValueError, match="contraction sizes differ"):
        amx.matmul(jnp.ones((4, 3), jnp.bfloat16), jnp.ones((4, 5), jnp.bfloat16))
    with pytest.raises(ValueError, match="bfloat16"):
        amx.matmul(jnp.ones((4, 3)), jnp.ones((3, 5)))
    with pytest.raises(ValueError, match="batch axes"):
        amx.matmul(jnp.ones((2, 4, 3), jnp.bfloat16), jnp.ones((3, 3, 5), jnp.bfloat16))


def _attention_reference(query, key, value, bias, out_grad):
    """`amx.attention` and its gradients in float64 NumPy, bias rows broadcast as the kernel takes them."""
    q, k, v, b, g = (np.asarray(x, np.float64) for x in (query, key, value, bias, out_grad))
    items, queries, _ = q.shape
    b = np.tile(np.repeat(b, items // b.shape[0], axis=0), (1, queries // b.shape[1], 1))
    scores = q @ np.swapaxes(k, -1, -2) + b
    p = np.exp(scores - scores.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    out = p @ v
    scores_grad = p * (g @ np.swapaxes(v, -1, -2) - (g * out).sum(-1, keepdims=True))
    return out, p, scores_grad @ k, np.swapaxes(scores_grad, -1, -2) @ q, np.swapaxes(p, -1, -2) @ g


# (items, bias rows, queries, bias positions T, keys, head dim): whole tiles, ragged edges everywhere, two query
# heads per key/value head (queries = 2 T), one bias row for all items, and wide heads.
ATTENTION_SHAPES = [(6, 3, 256, 128, 256, 32), (4, 2, 50, 25, 37, 20), (2, 1, 16, 16, 16, 64), (3, 3, 33, 33, 33, 128)]


@needs_amx
@pytest.mark.parametrize("items, rows, queries, positions, keys, depth", ATTENTION_SHAPES)
def test_attention_matches_float64_numpy(items, rows, queries, positions, keys, depth):
    """Forward (with P written out, and without, for inference) and backward of the fused attention against
    float64: the products take bfloat16 operands (P, dO and dS rounded to bfloat16, as XLA's bfloat16
    attention does), so agreement is to bfloat16's ~0.4 %, on the scale of each output. Row 0 of the first
    bias masks every key: that query attends uniformly."""
    rng = np.random.default_rng(queries + keys + depth)
    query = jnp.asarray(0.3 * rng.standard_normal((items, queries, depth)), jnp.bfloat16)
    key, value = (jnp.asarray(rng.standard_normal((items, keys, depth)), jnp.bfloat16) for _ in range(2))
    mask = rng.random((rows, positions, keys)) < 0.8
    mask[0, 0] = False
    bias = jnp.asarray(np.where(mask, 0.0, -1e30), jnp.float32)
    out_grad = jnp.asarray(rng.standard_normal((items, queries, depth)), jnp.float32)
    out, probabilities = jax.jit(amx.attention)(query, key, value, bias)
    grads = jax.jit(amx.attention_backward)(query, key, value, probabilities, out, out_grad)
    assert out.dtype == jnp.float32 and probabilities.dtype == jnp.bfloat16
    inference_out, none = jax.jit(lambda *a: amx.attention(*a, probabilities=False))(query, key, value, bias)
    assert none is None
    np.testing.assert_array_equal(np.asarray(inference_out), np.asarray(out))  # the same kernel, P kept in cache
    references = _attention_reference(query, key, value, bias, out_grad)
    np.testing.assert_allclose(np.asarray(probabilities[0, 0], np.float64), np.full(keys, 1 / keys), rtol=4e-3)
    for name, ours, reference in zip(["out", "P", "dQ", "dK", "dV"], [out, probabilities, *grads], references):
        assert ours.shape == reference.shape, name
        np.testing.assert_allclose(np.asarray(ours, np.float64), reference, atol=1.2e-2 * np.abs(reference).max(),
                                   err_msg=name)
        error = np.abs(np.asarray(ours, np.float64) - reference).max() / np.abs(reference).max()
        assert error < 1e-2, (name, error)


@needs_amx
def test_attention_rejects_what_it_cannot_attend():
    q, kv = jnp.ones((2, 8, 16), jnp.bfloat16), jnp.ones((2, 4, 16), jnp.bfloat16)
    with pytest.raises(ValueError, match="bias float32"):
        amx.attention(q, kv, kv, jnp.zeros((2, 3, 4)))  # T = 3 does not divide 8 queries
    with pytest.raises(ValueError, match="bfloat16"):
        amx.attention(q.astype(jnp.float32), kv, kv, jnp.zeros((2, 8, 4)))
    with pytest.raises(ValueError, match="shapes do not match"):
        amx.attention_backward(q, kv, kv, jnp.ones((2, 8, 5), jnp.bfloat16), q, q)


@needs_amx
@pytest.mark.parametrize("mask_shape", [(3, 1, 20, 24), (3, 1, 1, 24), (3, 4, 20, 24)])
def test_layers_attention_through_amx_matches_xla(mask_shape, monkeypatch):
    """`layers.attention` (grouped-query: 4 query heads on 2 key/value heads) with the fused kernel against
    XLA's path: a mask per batch row, a padding mask broadcast over queries, and a mask per head (which the
    kernel does not take: XLA's path runs, so the two agree exactly)."""
    from jaxrm.models.layers import attention

    rng = np.random.default_rng(1)
    query = jnp.asarray(rng.standard_normal((3, 20, 4, 16)), jnp.float32)
    key, value = (jnp.asarray(rng.standard_normal((3, 24, 2, 16)), jnp.float32) for _ in range(2))
    mask = jnp.asarray(rng.random(mask_shape) < 0.7)
    weights = jnp.asarray(rng.standard_normal(query.shape), jnp.float32)

    def loss(q, k, v):
        return jnp.sum(weights * attention(q, k, v, mask, scale=0.25, dtype=jnp.bfloat16))

    results = {}
    for use_amx in (True, False):
        monkeypatch.setattr(amx, "enabled", lambda: use_amx)
        jax.clear_caches()
        function = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))
        fused = amx.ATTENTION in function.lower(query, key, value).as_text()
        results[use_amx] = (function(query, key, value), fused)
    (ours, fused), (theirs, fused_xla) = results[True], results[False]
    assert fused == (mask_shape[1] == 1) and not fused_xla
    for a, b in zip(jax.tree.leaves(ours), jax.tree.leaves(theirs)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=5e-3 * float(np.abs(b).max()))


def _gradients(config, input_ids, segment_ids):
    model = RewardModel.from_config(config, rngs=nnx.Rngs(0), dtype=jnp.bfloat16)
    graphdef, params = nnx.split(model, nnx.Param)

    @jax.jit
    def loss_and_gradients(params):
        def loss(p):
            rewards = nnx.merge(graphdef, p).packed_rewards(input_ids, segment_ids, 2)
            return jnp.sum(rewards * jnp.array([[1.0, -0.5], [0.25, 2.0]]))

        return jax.value_and_grad(loss)(params)

    return loss_and_gradients(params)


@needs_amx
@pytest.mark.parametrize("family, tolerance", [("bert", 2.5e-3), ("qwen3", 3e-2)])
def test_reward_model_through_amx_matches_xla_products(family, tolerance, monkeypatch, tiny_config):
    """The whole packed forward and backward pass (dense layers and attention) with every bfloat16 product on
    AMX tiles gives XLA's bfloat16 results: both multiply the same bfloat16 operands in float32, so they differ
    only where a float32 result rounds to the other side of a bfloat16 value before the next product (up to
    ~1 % through Qwen3's query/key norms; a tenth of that in BERT). Losses agree to float32 rounding."""
    config = tiny_config(family)
    rng = np.random.default_rng(0)
    input_ids = jnp.asarray(rng.integers(2, 128, (2, 40)), jnp.int32)
    segment_ids = jnp.asarray(np.repeat([[1] * 23 + [2] * 12 + [0] * 5, [1] * 40], 1, axis=0), jnp.int32)
    assert amx.available()
    results = {}
    for use_amx in (True, False):
        monkeypatch.setattr(amx, "enabled", lambda: use_amx)
        jax.clear_caches()  # custom_vjp rules are traced once per signature and cached: trace them anew
        results[use_amx] = _gradients(config, input_ids, segment_ids)
    (loss_amx, grads_amx), (loss_xla, grads_xla) = results[True], results[False]
    np.testing.assert_allclose(float(loss_amx), float(loss_xla), rtol=1e-5)
    largest = max(float(np.abs(leaf).max()) for leaf in jax.tree_util.tree_leaves(grads_xla))
    for (path, ours), (_, theirs) in zip(jax.tree_util.tree_leaves_with_path(grads_amx),
                                          jax.tree_util.tree_leaves_with_path(grads_xla)):
        # Relative to each parameter's own scale; gradients that are zero in exact arithmetic (the key bias:
        # softmax ignores a constant shift) hold only rounding noise, compared against the largest gradient.
        scale = max(float(np.abs(np.asarray(theirs)).max()), 1e-4 * largest)
        np.testing.assert_allclose(np.asarray(ours), np.asarray(theirs), atol=tolerance * scale,
                                   err_msg=jax.tree_util.keystr(path))


@needs_amx
def test_layers_use_it_only_with_one_device():
    """The test session has 8 virtual devices: a custom call has no sharding rule, so XLA's products stay."""
    assert jax.device_count() == 8 and not amx.enabled()
    code = "import jax; from jaxrm.kernels import amx; print(jax.device_count(), amx.enabled())"
    environ = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=environ).stdout
    assert out.split() == ["1", "True"]


@needs_amx
def test_xla_products_traces_without_the_kernel():
    """Inside `amx.xla_products` the layers trace XLA's dots (what `jaxrm bench train` counts FLOPs on), before and
    after it the kernel; a jitted function traced before is traced anew."""
    code = """
import jax, jax.numpy as jnp
from jaxrm.kernels import amx
from jaxrm.models.layers import matmul
x, w = jnp.ones((32, 64)), jnp.ones((64, 48))
product = jax.jit(lambda x, w: matmul(x, w, jnp.bfloat16))
uses = lambda: amx.TARGET in product.lower(x, w).as_text()
before = uses()
with amx.xla_products():
    inside = uses()
print(before, inside, uses())
"""
    environ = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=environ).stdout
    assert out.split() == ["True", "False", "True"]
