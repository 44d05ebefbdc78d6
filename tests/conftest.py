"""Every test session sees 8 virtual CPU devices, set before JAX initialises its backend; `tiny_config` gives the
small BERT and Qwen3 configurations the kernel tests run whole reward models on."""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
_flags = os.environ.get("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in _flags:
    os.environ["XLA_FLAGS"] = (_flags + " --xla_force_host_platform_device_count=8").strip()


import pytest  # noqa: E402  (after the environment above)


@pytest.fixture
def tiny_config():
    """``tiny_config(family)``: a two-layer transformers config of ``"bert"`` or ``"qwen3"`` (grouped-query
    heads), hidden size 64, 128 tokens, positions up to 64."""
    import transformers

    def config(family: str):
        if family == "bert":
            return transformers.BertConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                           intermediate_size=96, vocab_size=128, max_position_embeddings=64)
        return transformers.Qwen3Config(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                        num_key_value_heads=2, head_dim=16, intermediate_size=96, vocab_size=128,
                                        max_position_embeddings=64)

    return config
