"""The online confidence margin inside the train step: formula, warm-up by state.step, accumulation."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import transformers
from flax import nnx

from jaxrm.data.batching import collate
from jaxrm.data.tokenize import TokenizedExample
from jaxrm.models import RewardModel
from jaxrm.train.config import LossConfig, MeshConfig, TrainConfig
from jaxrm.train.mesh import batch_sharding, global_batch, make_mesh, on_mesh, replicated, state_shardings
from jaxrm.train.optimizer import make_optimizer
from jaxrm.train.step import TrainState, make_train_step, split_model


def pairs(count, seed=0, micro_batches=1):
    rng = np.random.default_rng(seed)
    examples = []
    for i in range(count):
        sequences = tuple(rng.integers(2, 40, size=rng.integers(3, 12)).astype(np.int32) for _ in range(2))
        examples.append(TokenizedExample(
            sequences=sequences, ranks=np.array([0, 1], np.int32), outcome=1, margin=0.25, rating=-1,
            true_rewards=None, source=f"t:{i}", truncated=False, subset=None,
            response_lengths=np.array([len(s) for s in sequences], np.int32),
        ))
    return collate(examples, list_size=2, length=32, pad_id=0, sequences_per_row=4, micro_batches=micro_batches)


@pytest.fixture(scope="module")
def model_parts():
    config = transformers.Qwen3Config(
        vocab_size=40, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=1, head_dim=8, max_position_embeddings=32, pad_token_id=0, eos_token_id=1,
    )
    with nnx.use_eager_sharding(False):
        model = RewardModel.from_config(config, rngs=nnx.Rngs(0))
    # A larger head spreads the untrained rewards, so the margins are far from 0 and from the cap.
    reward_fn, params = split_model(model)
    params = jax.tree.map(lambda x: x * 20.0 if x.ndim == 2 and x.shape[-1] == 1 else x, params)
    return reward_fn, params


_COMPILED = {}


def run_step(model_parts, loss_config, batch, *, step=0, accum=1):
    """One step from ``state.step = step``; the jitted step is reused across steps (step is traced)."""
    reward_fn, params = model_parts
    mesh = make_mesh(MeshConfig(), jax.devices()[:1])
    params = jax.device_put(params, state_shardings(params, mesh))
    optimizer = make_optimizer(TrainConfig(learning_rate=1e-3, steps=10))
    state = on_mesh(TrainState(jnp.asarray(step, jnp.int32), params, jax.jit(optimizer.init)(params)), mesh)
    key = (loss_config, accum)
    if key not in _COMPILED:
        sharding = jax.tree.map(lambda x: x.sharding, state)
        _COMPILED[key] = jax.jit(make_train_step(reward_fn, optimizer, loss_config, grad_accum_steps=accum),
                                 in_shardings=(sharding, batch_sharding(mesh)),
                                 out_shardings=(sharding, replicated(mesh)))
    _, metrics = _COMPILED[key](state, global_batch(batch, mesh))
    rewards = np.asarray(reward_fn(params, batch), np.float64)
    return metrics, rewards


def bradley_terry(gap, margin):
    return np.mean(np.logaddexp(0.0, -(gap - margin)))


@pytest.mark.parametrize("step, ramp", [(0, 0.0), (2, 0.25), (30, 1.0)])
def test_confidence_margin_in_the_step(model_parts, step, ramp):
    batch = pairs(8)
    config = LossConfig(margin="confidence", margin_scale=2.0, confidence_warmup_steps=8)
    metrics, rewards = run_step(model_parts, config, batch, step=step)
    gap = rewards[:, 0] - rewards[:, 1]
    assert np.ptp(gap) > 0.5
    margin = batch.margin + ramp * 2.0 * np.maximum(0.0, np.tanh(gap / 2))
    np.testing.assert_allclose(metrics["loss"], bradley_terry(gap, margin), rtol=1e-5)
    np.testing.assert_allclose(metrics["loss_margin"], margin.mean(), rtol=1e-5)


def test_confidence_margin_with_accumulation_matches_one_batch(model_parts):
    config = LossConfig(margin="confidence", margin_scale=1.0)
    one, _ = run_step(model_parts, config, pairs(8, seed=1))
    accumulated, _ = run_step(model_parts, config, pairs(8, seed=1, micro_batches=4), accum=4)
    for key in ("loss", "loss_margin", "grad_norm"):
        np.testing.assert_allclose(accumulated[key], one[key], rtol=1e-5)


def test_other_sources_use_the_batch_margin_only(model_parts):
    batch = pairs(8, seed=2)
    metrics, rewards = run_step(model_parts, LossConfig(margin="data"), batch)
    np.testing.assert_allclose(metrics["loss"], bradley_terry(rewards[:, 0] - rewards[:, 1], batch.margin), rtol=1e-5)
    np.testing.assert_allclose(metrics["loss_margin"], 0.25, rtol=1e-6)
