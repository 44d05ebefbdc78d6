"""The decoder backbone against transformers' PyTorch Llama, Qwen2, Qwen3 and Mistral, and its parameter table."""

import re
from types import SimpleNamespace

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import transformers  # noqa: E402
from flax import nnx  # noqa: E402
from safetensors.numpy import load_file  # noqa: E402

from jaxrm.models.decoder import DecoderBackbone  # noqa: E402
from jaxrm.models.decoder_params import (  # noqa: E402
    HF_BACKBONE_PREFIX,
    IGNORED_HF_KEYS,
    export_params,
    load_params,
    param_table,
)

TINY = dict(
    hidden_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=128,
    intermediate_size=128,
    max_position_embeddings=64,
)
LLAMA3_ROPE = dict(
    rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=8
)
CONFIGS = {
    "llama": lambda: transformers.LlamaConfig(**TINY),
    # `rope_scaling` is the transformers 4 spelling; transformers 5 moves it into `rope_parameters`.
    "llama3_rope_all_biases": lambda: transformers.LlamaConfig(
        **TINY, rope_scaling=LLAMA3_ROPE, attention_bias=True, mlp_bias=True
    ),
    "qwen2": lambda: transformers.Qwen2Config(**TINY),
    "qwen3_tied": lambda: transformers.Qwen3Config(**TINY, head_dim=32, tie_word_embeddings=True),
    "mistral_window4": lambda: transformers.MistralConfig(**TINY, sliding_window=4),
}

LENGTH = 12
REAL_TOKENS = (12, 7, 3)


@nnx.jit
def _forward(backbone, input_ids, attention_mask):
    return backbone(input_ids, attention_mask)


def _backbone_tensors(checkpoint):
    ignored = [re.compile(pattern) for pattern in IGNORED_HF_KEYS]
    return {
        key.removeprefix(HF_BACKBONE_PREFIX): value
        for key, value in checkpoint.items()
        if not any(pattern.fullmatch(key) for pattern in ignored)
    }


def _batch(vocab_size, padding_side):
    rng = np.random.default_rng(0)
    mask = np.zeros((len(REAL_TOKENS), LENGTH), np.int64)
    for row, count in enumerate(REAL_TOKENS):
        if padding_side == "left":
            mask[row, LENGTH - count :] = 1
        else:
            mask[row, :count] = 1
    input_ids = np.where(mask == 1, rng.integers(1, vocab_size, mask.shape), 0)
    return input_ids, mask


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """Builds (once per name) a random transformers model, saves it, and loads its backbone tensors."""
    cache = {}

    def build(name):
        if name not in cache:
            config = CONFIGS[name]()
            torch.manual_seed(0)
            torch_model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="eager")
            torch_model = torch_model.float().eval()
            # At initialisation biases are 0 and norm scales 1; perturb everything so each tensor matters.
            with torch.no_grad():
                for parameter in torch_model.parameters():
                    parameter.add_(0.1 * torch.randn_like(parameter))
            directory = tmp_path_factory.mktemp(name)
            torch_model.save_pretrained(directory)
            checkpoint = load_file(directory / "model.safetensors")
            cache[name] = SimpleNamespace(
                config=config, torch_model=torch_model, checkpoint=checkpoint, tensors=_backbone_tensors(checkpoint)
            )
        return cache[name]

    return build


def _loaded_backbone(checkpoint, **options):
    backbone = DecoderBackbone(checkpoint.config, rngs=nnx.Rngs(0), **options)
    load_params(backbone, checkpoint.tensors, param_table(checkpoint.config))
    return backbone


@pytest.mark.parametrize("padding_side", ["left", "right"])
@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_last_hidden_state_matches_transformers(checkpoints, name, padding_side):
    checkpoint = checkpoints(name)
    input_ids, mask = _batch(checkpoint.config.vocab_size, padding_side)
    position_ids = np.maximum(np.cumsum(mask, axis=-1) - 1, 0)
    with torch.no_grad():
        expected = checkpoint.torch_model.model(
            input_ids=torch.from_numpy(input_ids),
            attention_mask=torch.from_numpy(mask),
            position_ids=torch.from_numpy(position_ids),
        ).last_hidden_state.numpy()

    actual = np.asarray(_forward(_loaded_backbone(checkpoint), jnp.asarray(input_ids), jnp.asarray(mask)))

    assert actual.shape == expected.shape
    assert np.isfinite(actual).all()
    real = mask == 1
    np.testing.assert_allclose(actual[real], expected[real], atol=1e-4, rtol=0)


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_selected_positions_equal_the_full_hidden_states_there(checkpoints, name):
    """With ``positions`` the last layer computes only those rows: the same states as the full pass."""
    checkpoint = checkpoints(name)
    input_ids, mask = _batch(checkpoint.config.vocab_size, "right")
    # Two packed sequences in the first row (ids 1 and 2), the other rows padded; positions mix the
    # last token of each sequence, a first token and a padding column.
    segments = mask.copy()
    segments[0, 5:] = 2
    positions = np.array([[4, 11, 0], [6, 2, 9], [2, 0, 11]])
    backbone = _loaded_backbone(checkpoint)
    full = np.asarray(backbone(jnp.asarray(input_ids), jnp.asarray(segments)))
    selected = np.asarray(backbone(jnp.asarray(input_ids), jnp.asarray(segments), jnp.asarray(positions)))
    assert selected.shape == (3, 3, checkpoint.config.hidden_size)
    np.testing.assert_allclose(selected, np.take_along_axis(full, positions[..., None], axis=1), atol=2e-5, rtol=0)


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_table_covers_checkpoint_and_module_exactly(checkpoints, name):
    checkpoint = checkpoints(name)
    table = param_table(checkpoint.config)
    hf_keys = [row.hf_key for row in table]
    nnx_paths = [row.nnx_path for row in table]
    assert len(set(hf_keys)) == len(hf_keys) and len(set(nnx_paths)) == len(nnx_paths)
    assert set(hf_keys) == set(checkpoint.tensors)
    assert ("lm_head.weight" in checkpoint.checkpoint) == (not checkpoint.config.tie_word_embeddings)

    abstract = nnx.eval_shape(lambda: DecoderBackbone(checkpoint.config, rngs=nnx.Rngs(0)))
    module_paths = {path for path, _ in nnx.to_flat_state(nnx.state(abstract, nnx.Param))}
    assert set(nnx_paths) == module_paths


@pytest.mark.parametrize("name", ["llama3_rope_all_biases", "qwen3_tied"])
def test_export_gives_back_the_loaded_tensors(checkpoints, name):
    checkpoint = checkpoints(name)
    exported = export_params(_loaded_backbone(checkpoint), param_table(checkpoint.config))
    assert set(exported) == set(checkpoint.tensors)
    for key, tensor in checkpoint.tensors.items():
        assert exported[key].dtype == np.float32
        np.testing.assert_array_equal(exported[key], tensor, err_msg=key)


def test_bfloat16_compute_stays_close_to_float32(checkpoints):
    checkpoint = checkpoints("llama")
    input_ids, mask = _batch(checkpoint.config.vocab_size, "left")
    reference = np.asarray(_forward(_loaded_backbone(checkpoint), input_ids, mask))
    low_precision = _forward(_loaded_backbone(checkpoint, dtype=jnp.bfloat16), input_ids, mask)

    assert low_precision.dtype == jnp.bfloat16
    real = mask == 1
    difference = np.asarray(low_precision, np.float32)[real] - reference[real]
    assert np.linalg.norm(difference) / np.linalg.norm(reference[real]) < 5e-2


def test_remat_gives_the_same_gradients(checkpoints):
    checkpoint = checkpoints("qwen3_tied")
    # Left padding gives pad queries with no real key before them; their gradients must stay finite.
    input_ids, mask = _batch(checkpoint.config.vocab_size, "left")

    @nnx.jit
    def gradients(backbone):
        return nnx.grad(lambda model: model(input_ids, mask).sum())(backbone)

    stored = jax.tree.leaves(gradients(_loaded_backbone(checkpoint)))
    recomputed = jax.tree.leaves(gradients(_loaded_backbone(checkpoint, remat=True)))
    assert len(stored) == len(recomputed) > 0
    for plain, rematerialised in zip(stored, recomputed):
        assert np.isfinite(plain).all()
        np.testing.assert_allclose(rematerialised, plain, atol=1e-6, rtol=1e-6)


EXPECTED_LOGICAL_AXES = {
    ("embed_tokens", "embedding"): ("vocab", "embed"),
    ("norm", "scale"): (None,),
    ("input_layernorm", "scale"): (None,),
    ("post_attention_layernorm", "scale"): (None,),
    ("self_attn", "q_norm", "scale"): (None,),
    ("self_attn", "k_norm", "scale"): (None,),
    ("self_attn", "q_proj", "kernel"): ("embed", "heads"),
    ("self_attn", "q_proj", "bias"): ("heads",),
    ("self_attn", "k_proj", "kernel"): ("embed", "kv_heads"),
    ("self_attn", "k_proj", "bias"): ("kv_heads",),
    ("self_attn", "v_proj", "kernel"): ("embed", "kv_heads"),
    ("self_attn", "v_proj", "bias"): ("kv_heads",),
    ("self_attn", "o_proj", "kernel"): ("heads", "embed"),
    ("self_attn", "o_proj", "bias"): ("embed",),
    ("mlp", "gate_proj", "kernel"): ("embed", "mlp"),
    ("mlp", "gate_proj", "bias"): ("mlp",),
    ("mlp", "up_proj", "kernel"): ("embed", "mlp"),
    ("mlp", "up_proj", "bias"): ("mlp",),
    ("mlp", "down_proj", "kernel"): ("mlp", "embed"),
    ("mlp", "down_proj", "bias"): ("embed",),
}


@pytest.mark.parametrize("name", ["llama3_rope_all_biases", "qwen3_tied"])
def test_parameters_carry_logical_axis_names(name):
    config = CONFIGS[name]()
    backbone = nnx.eval_shape(lambda: DecoderBackbone(config, rngs=nnx.Rngs(0)))
    specs = nnx.to_flat_state(nnx.get_partition_spec(nnx.state(backbone, nnx.Param)))
    assert specs
    for path, spec in specs:
        within_layer = path[2:] if path[0] == "layers" else path
        assert tuple(spec.get_value()) == EXPECTED_LOGICAL_AXES[within_layer], path

    rules = [("embed", "fsdp"), ("vocab", "model"), ("heads", "model"), ("kv_heads", "model"), ("mlp", "model")]
    with nnx.logical_axis_rules(rules):
        mapped = nnx.get_partition_spec(nnx.state(backbone, nnx.Param))
    assert tuple(mapped["embed_tokens"]["embedding"].get_value()) == ("model", "fsdp")


def test_load_params_names_the_key_of_a_wrongly_shaped_tensor(checkpoints):
    checkpoint = checkpoints("llama")
    tensors = dict(checkpoint.tensors)
    tensors["layers.1.mlp.up_proj.weight"] = np.zeros((3, 5), np.float32)
    backbone = DecoderBackbone(checkpoint.config, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match=r"layers\.1\.mlp\.up_proj\.weight.*\(3, 5\).*\(128, 64\)"):
        load_params(backbone, tensors, param_table(checkpoint.config))
