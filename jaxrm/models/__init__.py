"""Reward models on Hugging Face backbones (Llama, Qwen2, Qwen3, Mistral, BERT), loaded from and saved to
local Hugging Face directories."""

from jaxrm.models.registry import SUPPORTED_MODEL_TYPES
from jaxrm.models.reward_model import RewardHead, RewardModel, pool
from jaxrm.models.tokenizer import load_tokenizer

__all__ = ["SUPPORTED_MODEL_TYPES", "RewardHead", "RewardModel", "load_tokenizer", "pool"]
