"""The train step: exact masked mean, gradient accumulation, the NaN guard, and one result on every mesh."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import transformers
from flax import nnx

from jaxrm import losses
from jaxrm.data.batching import collate
from jaxrm.data.tokenize import TokenizedExample
from jaxrm.models import RewardModel
from jaxrm.train.config import LossConfig, MeshConfig, TrainConfig
from jaxrm.train.mesh import batch_sharding, global_batch, make_mesh, on_mesh, replicated, state_shardings
from jaxrm.train.optimizer import make_optimizer
from jaxrm.train.step import TrainState, make_gradient_step, make_train_step, pair_statistics, split_model


def tiny_qwen3():
    return transformers.Qwen3Config(
        vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8, max_position_embeddings=64, pad_token_id=0, eos_token_id=1,
    )


def random_examples(count, seed=0, list_size=2):
    rng = np.random.default_rng(seed)
    examples = []
    for i in range(count):
        sequences = tuple(rng.integers(2, 50, size=rng.integers(3, 15)).astype(np.int32) for _ in range(list_size))
        examples.append(TokenizedExample(
            sequences=sequences, ranks=np.arange(list_size, dtype=np.int32), outcome=1,
            margin=float(rng.uniform(0, 1)), rating=-1, true_rewards=None, source=f"t:{i}", truncated=False,
            subset=None, response_lengths=np.array([len(s) for s in sequences], np.int32),
        ))
    return examples


def make_batch(examples, pad_to=None, *, sequences_per_row=4, micro_batches=1, row_shards=1):
    """Packed rows of 32 tokens (several sequences each), split for ``micro_batches`` and ``row_shards`` devices."""
    rows = list(examples) + [None] * ((pad_to or len(examples)) - len(examples))
    return collate(rows, list_size=len(examples[0].sequences), length=32, pad_id=0,
                   sequences_per_row=sequences_per_row, micro_batches=micro_batches, row_shards=row_shards)


def unpacked_rewards(reward_fn, params, examples):
    """Rewards [N, K] with every sequence in a padded row of its own: the reference for packed batches."""
    return np.asarray(reward_fn(params, make_batch(examples, sequences_per_row=1)))


def build(mesh_config=None, loss=LossConfig(), train=TrainConfig(learning_rate=1e-2, steps=10), accum=1):
    with nnx.use_eager_sharding(False):
        model = RewardModel.from_config(tiny_qwen3(), rngs=nnx.Rngs(0))
    reward_fn, params = split_model(model)
    mesh = make_mesh(mesh_config or MeshConfig(), jax.devices() if mesh_config else jax.devices()[:1])
    params = jax.device_put(params, state_shardings(params, mesh))
    optimizer = make_optimizer(train)
    state = on_mesh(TrainState(jnp.zeros((), jnp.int32), params, jax.jit(optimizer.init)(params)), mesh)
    sharding = jax.tree.map(lambda x: x.sharding, state)
    step = jax.jit(make_train_step(reward_fn, optimizer, loss, grad_accum_steps=accum),
                   in_shardings=(sharding, batch_sharding(mesh)), out_shardings=(sharding, replicated(mesh)))
    return state, step, mesh, reward_fn


def test_loss_is_exact_mean_over_real_examples():
    examples = random_examples(5)
    state, step, mesh, reward_fn = build()
    batch = make_batch(examples, pad_to=8)
    _, metrics = step(state, global_batch(batch, mesh))
    assert batch.input_ids.shape[0] < 10  # packed: fewer rows than the 10 sequences
    rewards = unpacked_rewards(reward_fn, state.params, examples)
    # the step applies the batch margin (data preparation already resolved loss.margin into it)
    expected = np.mean(np.logaddexp(0.0, -(rewards[:, 0] - rewards[:, 1] - batch.margin[:5])))
    np.testing.assert_allclose(metrics["loss"], expected, rtol=1e-5)
    assert metrics["examples"] == 5
    np.testing.assert_allclose(metrics["accuracy"], np.mean(rewards[:, 0] > rewards[:, 1]))


def test_gradient_accumulation_matches_one_batch():
    examples = random_examples(7)
    batch = make_batch(examples, pad_to=8)
    micro_batches = make_batch(examples, pad_to=8, micro_batches=4)  # each micro-batch packed on its own
    state_a, step_a, mesh, _ = build()
    state_b, step_b, _, _ = build(accum=4)
    new_a, metrics_a = step_a(state_a, global_batch(batch, mesh))
    new_b, metrics_b = step_b(state_b, global_batch(micro_batches, mesh))
    np.testing.assert_allclose(metrics_a["loss"], metrics_b["loss"], rtol=1e-5)
    np.testing.assert_allclose(metrics_a["grad_norm"], metrics_b["grad_norm"], rtol=1e-4)
    # The gradients themselves agree to float noise...
    _, _, _, reward_fn = build()
    grads = [make_gradient_step(reward_fn, LossConfig(), grad_accum_steps=accum)(state_a, accum_batch)[0]
             for accum, accum_batch in ((1, batch), (4, micro_batches))]
    scale = max(float(jnp.max(jnp.abs(leaf))) for leaf in jax.tree.leaves(grads[0]))
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6 * scale), *grads)
    # ...and so do the updates: Adam normalises the first one to about ±lr = 1e-2 per element, and an
    # element whose gradient is near Adam's eps moves by a noisy fraction of that.
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=5e-5), new_a.params, new_b.params)


def test_nonfinite_loss_leaves_state_untouched():
    examples = random_examples(4)
    batch = make_batch(examples)
    batch = dataclasses.replace(batch, margin=np.array([np.inf, 0, 0, 0], np.float32))
    state, step, mesh, _ = build(loss=LossConfig(margin="data"))
    before = jax.tree.map(np.asarray, state.params)
    new_state, metrics = step(state, global_batch(batch, mesh))
    assert metrics["nonfinite"] == 1
    jax.tree.map(np.testing.assert_array_equal, before, jax.tree.map(np.asarray, new_state.params))



@pytest.mark.parametrize("loss_value", [0.7, np.nan])
def test_update_step_is_optax_or_nothing(loss_value):
    """A finite step applies exactly Optax's update (clip → AdamW) to parameters and both moments; a
    non-finite loss leaves both untouched. The step count moves on either way."""
    from jaxrm.train.step import make_update_step

    train = TrainConfig(learning_rate=1e-2, steps=10, max_grad_norm=0.5)
    state, _, _, _ = build(train=train)
    optimizer = make_optimizer(train)
    rng = np.random.default_rng(0)
    grads = jax.tree.map(lambda p: jnp.asarray(rng.standard_normal(p.shape), p.dtype), state.params)
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    expected = (optax.apply_updates(state.params, updates), opt_state) if np.isfinite(loss_value) \
        else (state.params, state.opt_state)
    new_state, metrics = jax.jit(make_update_step(optimizer))(state, grads, jnp.float32(loss_value))
    assert int(new_state.step) == int(state.step) + 1 and metrics["nonfinite"] == int(not np.isfinite(loss_value))
    np.testing.assert_allclose(float(metrics["grad_norm"]), float(optax.tree.norm(grads)), rtol=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-7),
                 (new_state.params, new_state.opt_state), expected)

def test_pair_statistics_counts_ties_as_wrong():
    rewards = np.array([[1.0, 1.0], [2.0, 0.0], [0.0, 3.0], [5.0, 0.0]], np.float32)
    ranks = np.array([[0, 1]] * 4, np.int32)
    stats = pair_statistics(rewards, ranks, np.ones((4, 2), bool), np.array([True, True, True, False]))
    assert int(stats["pairs"]) == 3 and int(stats["correct"]) == 1
    np.testing.assert_allclose(stats["gap"], 0.0 + 2.0 - 3.0)


@pytest.mark.parametrize("loss_name", ["plackett_luce", "all_pairs"])
def test_listwise_losses_train(loss_name):
    examples = random_examples(8, list_size=3)
    state, step, mesh, _ = build(loss=LossConfig(name=loss_name))
    batch = global_batch(make_batch(examples), mesh)
    first = None
    for _ in range(10):
        state, metrics = step(state, batch)
        first = first if first is not None else float(metrics["loss"])
    assert float(metrics["loss"]) < first


MESHES = [None, MeshConfig(data=8), MeshConfig(data=4, fsdp=2), MeshConfig(data=2, fsdp=2, model=2)]


def test_every_mesh_gives_the_same_losses():
    assert jax.device_count() == 8, "tests run with 8 virtual CPU devices (tests/conftest.py)"
    examples = random_examples(40, seed=3)
    trajectories = []
    for mesh_config in MESHES:
        state, step, mesh, _ = build(mesh_config)
        # Each mesh packs the batches for its own number of batch shards: other rows, the same losses.
        shards = mesh.shape["data"] * mesh.shape["fsdp"]
        batches = [make_batch(examples[i * 8:(i + 1) * 8], row_shards=shards) for i in range(5)]
        losses_seen = []
        for batch in batches:
            state, metrics = step(state, global_batch(batch, mesh))
            losses_seen.append(float(metrics["loss"]))
        trajectories.append(losses_seen)
    for other in trajectories[1:]:
        np.testing.assert_allclose(other, trajectories[0], atol=1e-5)
    assert trajectories[0][-1] < trajectories[0][0]


def test_parameters_are_sharded_over_fsdp_and_model():
    state, _, mesh, _ = build(MeshConfig(data=2, fsdp=2, model=2))
    specs = {jax.tree_util.keystr(path): leaf.sharding.spec
             for path, leaf in jax.tree_util.tree_leaves_with_path(state.params)}
    assert any("fsdp" in str(spec) and "model" in str(spec) for spec in specs.values())
