"""Is a hand-written log-sigmoid worth it? Times and checks candidates against ``jax.nn.log_sigmoid``.

    python benchmarks/log_sigmoid_check.py [--size 10000000] [--repeats 10]

For each candidate, jit-compiled on ``size`` float32 elements: the best wall time of the forward
pass (``x -> log_sigmoid(x)``), of forward plus backward (``value_and_grad`` of the sum, as in
training) and of the gradient alone (XLA then drops the forward's log1p); the largest difference
from ``jax.nn.log_sigmoid``; and the gradient where the branches meet (±0) and far out (±1e4),
which must be σ(−x). ``kinked`` is the obvious rewrite with no custom derivative: its gradient at 0
is 1 instead of ½ (the kinks of ``|x|`` and ``min`` at 0).
"""

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np

from jaxrm.losses import _log_sigmoid


def kinked(x):
    return jnp.minimum(x, 0.0) - jnp.log1p(jnp.exp(-jnp.abs(x)))


CANDIDATES = {
    "jax.nn.log_sigmoid": jax.nn.log_sigmoid,
    "kinked (no custom_jvp)": kinked,
    "jaxrm _log_sigmoid": _log_sigmoid,
}


def best_times(functions, x, repeats):
    """Best wall time of each function, run in interleaved rounds so that load from other
    processes falls on every candidate alike."""
    for fn in functions.values():
        jax.block_until_ready(fn(x))
    best = dict.fromkeys(functions, float("inf"))
    for _ in range(repeats):
        for key, fn in functions.items():
            start = time.perf_counter()
            jax.block_until_ready(fn(x))
            best[key] = min(best[key], time.perf_counter() - start)
    return best


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=10_000_000)
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args()

    x = jax.random.normal(jax.random.key(0), (args.size,), jnp.float32) * 10.0
    reference = np.asarray(jax.nn.log_sigmoid(x))
    points = jnp.array([0.0, -0.0, 1e-30, -1e-30, 1.0, -1.0, 1e4, -1e4], jnp.float32)
    exact_grad = np.exp(-np.logaddexp(0.0, np.asarray(points, np.float64)))  # σ(−x)

    functions = {}
    for name, fn in CANDIDATES.items():
        functions[name, "fwd"] = jax.jit(fn)
        functions[name, "fwd+bwd"] = jax.jit(jax.value_and_grad(lambda v, fn=fn: jnp.sum(fn(v))))
        functions[name, "bwd only"] = jax.jit(jax.grad(lambda v, fn=fn: jnp.sum(fn(v))))
    best = best_times(functions, x, args.repeats)

    print(f"{args.size:,} float32 elements, best of {args.repeats}, backend {jax.default_backend()}")
    print(f"{'candidate':<24} {'fwd ms':>7} {'fwd+bwd ms':>11} {'grad only ms':>13} {'max|diff|':>10}  gradient")
    for name, fn in CANDIDATES.items():
        error = np.max(np.abs(np.asarray(functions[name, "fwd"](x)) - reference))
        grads = np.asarray(jax.vmap(jax.grad(fn))(points), np.float64)
        wrong = ~np.isclose(grads, exact_grad, rtol=1e-6, atol=0)
        verdict = "exact at 0, ±1e-30, ±1, ±1e4" if not wrong.any() else ", ".join(
            f"WRONG at {p:g}: {g:g} (σ(−x) = {e:g})"
            for p, g, e in zip(points[wrong], grads[wrong], exact_grad[wrong])
        )
        print(f"{name:<24} {best[name, 'fwd'] * 1e3:7.1f} {best[name, 'fwd+bwd'] * 1e3:11.1f}"
              f" {best[name, 'bwd only'] * 1e3:13.1f} {error:10.1e}  {verdict}")


if __name__ == "__main__":
    main()
