"""Mixed-precision building blocks: `matmul`, `attention` and `normalize` against float64 NumPy and JAX references."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxrm.models.layers import (Dense, attention, dense_together, matmul, normalize, positions_in_segment,
                                 segment_mask)


def _numpy_attention(query, key, value, mask, scale):
    """Naive float64 softmax attention; query [B, T, N, D], key/value [B, S, K, D], mask [B, 1|N, T|1, S]."""
    query, key, value = (np.asarray(a, np.float64) for a in (query, key, value))
    groups = query.shape[2] // key.shape[2]
    key, value = np.repeat(key, groups, axis=2), np.repeat(value, groups, axis=2)
    scores = np.einsum("btnd,bsnd->bnts", query, key) * scale
    scores = np.where(np.broadcast_to(mask, scores.shape), scores, -np.inf)
    all_masked = np.all(np.isneginf(scores), axis=-1, keepdims=True)
    scores = np.where(all_masked, 0.0, scores)  # uniform over every key, as jax.nn.dot_product_attention
    weights = np.exp(scores - scores.max(-1, keepdims=True))
    weights /= weights.sum(-1, keepdims=True)
    return np.einsum("bnts,bsnd->btnd", weights, value)


def _inputs(heads=4, kv_heads=2, batch=3, length=7, head_dim=8, seed=0):
    rng = np.random.default_rng(seed)
    query = rng.normal(size=(batch, length, heads, head_dim)).astype(np.float32)
    key, value = (rng.normal(size=(batch, length, kv_heads, head_dim)).astype(np.float32) for _ in range(2))
    lengths = np.array([length, 3, 1])[:batch]
    padding = np.arange(length)[None, :] < lengths[:, None]
    return query, key, value, padding


@pytest.mark.parametrize("heads, kv_heads", [(4, 4), (4, 2), (4, 1)])
def test_attention_matches_numpy_with_padding_and_causal_masks(heads, kv_heads):
    query, key, value, padding = _inputs(heads, kv_heads)
    causal = np.tril(np.ones((7, 7), bool))
    for mask in (padding[:, None, None, :], padding[:, None, None, :] & causal[None, None]):
        got = jax.jit(lambda q, k, v, m: attention(q, k, v, m, scale=0.3))(query, key, value, mask)
        assert got.dtype == jnp.float32
        np.testing.assert_allclose(got, _numpy_attention(query, key, value, mask, 0.3), atol=1e-5)


def test_attention_with_a_per_head_mask():
    query, key, value, padding = _inputs(4, 2)
    rng = np.random.default_rng(1)
    mask = rng.random((3, 4, 7, 7)) < 0.6
    mask[..., 0] = True
    got = attention(query, key, value, mask, scale=0.25)
    np.testing.assert_allclose(got, _numpy_attention(query, key, value, mask, 0.25), atol=1e-5)


def test_a_query_with_no_allowed_key_attends_uniformly_and_has_finite_gradients():
    query, key, value, _ = _inputs(2, 2, batch=1)
    mask = np.zeros((1, 1, 1, 7), bool)
    np.testing.assert_allclose(attention(query, key, value, mask, scale=0.5),
                               np.broadcast_to(value.mean(axis=1, keepdims=True), value.shape), atol=1e-6)
    grads = jax.grad(lambda q, k, v: jnp.sum(attention(q, k, v, mask, scale=0.5) ** 2), argnums=(0, 1, 2))(
        query, key, value)
    assert all(np.all(np.isfinite(g)) for g in grads)


@pytest.mark.parametrize("heads, kv_heads", [(4, 4), (4, 2)])
def test_attention_gradients_match_jax_reference(heads, kv_heads):
    query, key, value, padding = _inputs(heads, kv_heads)
    mask = padding[:, None, None, :] & np.tril(np.ones((7, 7), bool))[None, None]
    cotangent = np.random.default_rng(2).normal(size=query.shape).astype(np.float32)

    def loss(function):
        return lambda q, k, v: jnp.sum(function(q, k, v) * cotangent)

    ours = jax.grad(loss(lambda q, k, v: attention(q, k, v, mask, scale=0.3)), argnums=(0, 1, 2))(query, key, value)
    reference = jax.grad(loss(lambda q, k, v: jax.nn.dot_product_attention(q, k, v, mask=mask, scale=0.3)),
                         argnums=(0, 1, 2))(query, key, value)
    for got, want in zip(ours, reference):
        np.testing.assert_allclose(got, want, atol=2e-5)


def test_bfloat16_attention_is_close_to_float32_in_value_and_gradient():
    query, key, value, padding = _inputs(4, 2)
    mask = padding[:, None, None, :]

    def loss(dtype):
        return lambda q, k, v: jnp.sum(jnp.sin(attention(q, k, v, mask, scale=0.3, dtype=dtype)))

    exact = jax.value_and_grad(loss(jnp.float32), argnums=(0, 1, 2))(query, key, value)
    mixed = jax.value_and_grad(loss(jnp.bfloat16), argnums=(0, 1, 2))(query, key, value)
    assert abs(float(mixed[0]) - float(exact[0])) < 0.05 * max(1.0, abs(float(exact[0])))
    for got, want in zip(mixed[1], exact[1]):
        assert got.dtype == jnp.float32
        # bfloat16 operands carry 8 significant bits: errors of a few percent of the gradient's scale.
        assert np.max(np.abs(got - want)) < 0.05 * np.max(np.abs(want))
        assert np.corrcoef(np.ravel(got), np.ravel(want))[0, 1] > 0.999


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16, jnp.float16])
def test_matmul_and_its_gradients_match_numpy_on_rounded_operands(dtype):
    rng = np.random.default_rng(3)
    x = rng.normal(size=(2, 5, 6)).astype(np.float32)
    kernel = rng.normal(size=(6, 4)).astype(np.float32)
    out_grad = rng.normal(size=(2, 5, 4)).astype(np.float32)
    rounded = lambda a: np.asarray(jnp.asarray(a).astype(dtype).astype(jnp.float32), np.float64)  # noqa: E731

    y, backward = jax.vjp(lambda x, k: matmul(x, k, dtype), x, kernel)
    x_grad, kernel_grad = backward(jnp.asarray(out_grad))
    assert y.dtype == x_grad.dtype == kernel_grad.dtype == jnp.float32
    # Products of operands rounded to `dtype`, accumulated exactly (float32 accumulation, tiny sums).
    np.testing.assert_allclose(y, rounded(x) @ rounded(kernel), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(x_grad, rounded(rounded(out_grad) @ rounded(kernel).T), rtol=1e-2, atol=1e-2)
    np.testing.assert_allclose(kernel_grad, np.einsum("bti,bto->io", rounded(x), rounded(out_grad)),
                               rtol=1e-5, atol=1e-5)


def test_bfloat16_matmul_lowers_to_bfloat16_products_with_float32_results():
    """The point of the custom VJP: forward and both backward products take bf16 operands."""
    x, kernel = jnp.ones((4, 8)), jnp.ones((8, 3))
    grad = jax.jit(jax.value_and_grad(lambda x, k: jnp.sum(matmul(x, k, jnp.bfloat16)), argnums=(0, 1)))
    text = grad.lower(x, kernel).as_text()
    dots = [line for line in text.splitlines() if "dot_general" in line]
    assert len(dots) == 3
    for line in dots:
        assert "bf16" in line.split("->")[0] and line.split("->")[-1].strip().startswith("tensor<") \
            and "f32>" in line.split("->")[-1]


def test_dense_layer_keeps_parameter_names_dtypes_and_logical_axes():
    layer = Dense(6, 4, ("embed", "mlp"), dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
    assert layer.kernel.shape == (6, 4) and layer.bias.shape == (4,)
    assert layer.kernel[...].dtype == jnp.float32
    assert layer.kernel.get_metadata()["out_sharding"] == ("embed", "mlp")
    assert layer.bias.get_metadata()["out_sharding"] == ("mlp",)
    x = np.random.default_rng(4).normal(size=(3, 6)).astype(np.float32)
    want = np.asarray(jnp.asarray(x).astype(jnp.bfloat16).astype(jnp.float32)) @ np.asarray(
        layer.kernel[...].astype(jnp.bfloat16).astype(jnp.float32))
    np.testing.assert_allclose(layer(x), want + np.asarray(layer.bias[...]), rtol=1e-5, atol=1e-6)
    assert Dense(6, 4, (None, None), use_bias=False, rngs=nnx.Rngs(0)).bias is None


def test_positions_and_mask_of_packed_rows():
    segments = jnp.array([[1, 1, 1, 2, 2, 0, 0], [0, 0, 1, 1, 1, 1, 1]])
    np.testing.assert_array_equal(positions_in_segment(segments), [[0, 1, 2, 0, 1, 0, 1], [0, 1, 0, 1, 2, 3, 4]])
    mask = np.asarray(segment_mask(segments, segments))[0, 0]
    np.testing.assert_array_equal(mask[0], [1, 1, 1, 0, 0, 0, 0])  # sequence 1 reads only itself
    np.testing.assert_array_equal(mask[3], [0, 0, 0, 1, 1, 0, 0])
    np.testing.assert_array_equal(mask[5], [1, 1, 1, 1, 1, 0, 0])  # a pad query reads every real key


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_dense_together_equals_the_layers_one_by_one(dtype):
    layers = [Dense(6, width, ("embed", "heads"), use_bias=bias, dtype=dtype, rngs=nnx.Rngs(i))
              for i, (width, bias) in enumerate([(4, True), (2, False), (4, True)])]
    for layer in layers:
        if layer.bias is not None:
            layer.bias[...] = jax.random.normal(jax.random.key(7), layer.bias.shape)
    x = jax.random.normal(jax.random.key(3), (2, 5, 6))

    def loss(layers, fused):
        outs = dense_together(x, *layers) if fused else [layer(x) for layer in layers]
        return sum(jnp.sum(jnp.sin(out) * (i + 1)) for i, out in enumerate(outs))

    for out, layer in zip(dense_together(x, *layers), layers):
        np.testing.assert_allclose(out, layer(x), rtol=1e-6, atol=1e-6)
    separate, fused = (nnx.grad(lambda ls, f=f: loss(ls, f))(nnx.List(layers)) for f in (False, True))
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5), nnx.state(separate),
                 nnx.state(fused))


def _numpy_norm_gradients(x, scale, bias, out_grad, eps, center):
    """LayerNorm / RMSNorm output and gradients in float64 by central differences of the textbook formula."""
    def forward(x, scale, bias):
        mean = x.mean(-1, keepdims=True) if center else 0.0
        normed = (x - mean) / np.sqrt(((x - mean) ** 2).mean(-1, keepdims=True) + eps)
        return normed * scale + (bias if center else 0.0)

    def gradient(index):
        args = [np.asarray(a, np.float64).copy() for a in (x, scale, bias)]
        grad = np.zeros_like(args[index])
        for position in np.ndindex(grad.shape):
            value, step = args[index][position], 1e-6
            args[index][position] = value + step
            up = np.sum(forward(*args) * out_grad)
            args[index][position] = value - step
            down = np.sum(forward(*args) * out_grad)
            args[index][position] = value
            grad[position] = (up - down) / (2 * step)
        return grad

    return forward(*(np.asarray(a, np.float64) for a in (x, scale, bias))), [gradient(i) for i in range(3)]


@pytest.mark.parametrize("center", [True, False])
def test_normalize_and_its_written_out_gradients_match_central_differences(center):
    rng = np.random.default_rng(3)
    x = (3 * rng.standard_normal((2, 5, 12)) + 1).astype(np.float32)
    scale, bias = (rng.standard_normal(12).astype(np.float32) for _ in range(2))
    out_grad = rng.standard_normal((2, 5, 12))
    out, vjp = jax.vjp(lambda x, s, b: normalize(x, s, b if center else None, eps=1e-5, dtype=jnp.float32,
                                                   center=center), x, scale, bias)
    grads = vjp(jnp.asarray(out_grad, jnp.float32))
    reference, reference_grads = _numpy_norm_gradients(x, scale, bias, out_grad, 1e-5, center)
    np.testing.assert_allclose(np.asarray(out), reference, atol=2e-5)
    for name, ours, theirs in zip(["x", "scale", "bias"], grads, reference_grads):
        if name == "bias" and not center:  # RMSNorm has no bias: the lambda's unused argument gets zeros
            np.testing.assert_array_equal(np.asarray(ours), 0.0)
            continue
        np.testing.assert_allclose(np.asarray(ours), theirs, atol=2e-4, err_msg=name)


def test_normalize_in_bfloat16_sums_parameter_gradients_in_float32():
    """Over 4,096 rows, the scale and bias gradients are float32 sums (within float32 rounding of float64),
    not bfloat16 ones (which would be off by ~1e-2 relative); the output is the bfloat16-rounded LayerNorm."""
    rng = np.random.default_rng(4)
    x = rng.standard_normal((4096, 16)).astype(np.float32)
    scale, bias = np.ones(16, np.float32), np.zeros(16, np.float32)
    out_grad = (1 + 0.01 * rng.standard_normal((4096, 16))).astype(jnp.bfloat16)
    out, vjp = jax.vjp(lambda x, s, b: normalize(x, s, b, eps=1e-5, dtype=jnp.bfloat16), x, scale, bias)
    assert out.dtype == jnp.bfloat16
    normed = (x - x.mean(-1, keepdims=True)) / np.sqrt(x.var(-1, keepdims=True) + 1e-5)
    np.testing.assert_allclose(np.asarray(out, np.float32), normed, atol=2e-2 * np.abs(normed).max())
    _, scale_grad, bias_grad = vjp(out_grad)
    g = np.asarray(out_grad, np.float64)
    np.testing.assert_allclose(np.asarray(bias_grad), g.sum(0), rtol=1e-6)
    rounded = np.asarray(jnp.asarray(normed.astype(np.float32)).astype(jnp.bfloat16), np.float64)
    np.testing.assert_allclose(np.asarray(scale_grad), (g * rounded).sum(0), rtol=1e-5, atol=1e-3)


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="a rewrite for XLA:CPU's products")
def test_compiled_attention_gradient_contracts_every_product_over_the_lhs_last_axis():
    """XLA:CPU runs a product that contracts the lhs's rows (Pᵀ dO, dSᵀ Q) as a float32 Eigen dot; the backward
    pass writes those as transposed products instead, which must survive XLA's simplifier into the compiled
    program."""
    query, key, value, padding = _inputs(4, 2, length=16)
    mask = padding[:, None, None, :]
    grad = jax.jit(jax.grad(lambda q, k, v: jnp.sum(jnp.sin(attention(q, k, v, mask, scale=0.3, dtype=jnp.bfloat16))),
                            argnums=(0, 1, 2)))
    text = grad.lower(query, key, value).compile().as_text()
    dots = [line for line in text.splitlines() if " dot(" in line]
    assert len(dots) == 6  # two forward products, four backward
    for line in dots:
        assert "lhs_contracting_dims={3}" in line, line
