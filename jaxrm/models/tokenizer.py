"""The tokenizer of a local model directory, ready for padded batches."""

from __future__ import annotations

from pathlib import Path

import transformers

from jaxrm.models.weights import model_dir


def load_tokenizer(path: str | Path) -> transformers.PreTrainedTokenizerBase:
    """Loads the Hugging Face tokenizer saved in ``path`` (local files only, no remote code).

    Reward models need a pad token to batch sequences of different lengths. Tokenizers without one
    (Llama, Mistral) get their end-of-sequence token as pad: padding is masked out, and jaxrm pools the last
    real token from the attention mask, so sharing the id is harmless. A chat template saved with the
    tokenizer (``chat_template.jinja`` or ``tokenizer_config.json``) is loaded with it, so
    ``tokenizer.apply_chat_template`` renders conversational data as the model was trained to see it.

    Raises:
      FileNotFoundError: ``path`` is not a local directory (jaxrm does not download from the Hub).
      ValueError: the tokenizer has neither a pad nor an end-of-sequence token.
    """
    directory = model_dir(path)
    tokenizer = transformers.AutoTokenizer.from_pretrained(directory, local_files_only=True, trust_remote_code=False)
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ValueError(
                f"The tokenizer in {directory} has neither a pad token nor an end-of-sequence token to pad with; "
                "add one (tokenizer.add_special_tokens({'pad_token': '<pad>'}), resizing the model's embeddings) "
                "and save the tokenizer again."
            )
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer
