"""Records → token ids: one function for training, evaluation and scoring, so EOS and truncation match.

Each response of a record becomes one sequence ``prefix + prompt + response + suffix``:

* **Rendering.** Strings are used as they are. Chat messages go through the tokenizer's chat
  template: the prompt part is the template of the prompt messages with ``add_generation_prompt``
  (or without it, if only that version is a prefix of the conversation), the response part is the
  rest of the full conversation's template. A template for which the prompt is not a prefix of the
  conversation makes the whole conversation the "response" (with a warning). Without a chat template,
  messages render in the hh-rlhf style ``"\\n\\nHuman: …\\n\\nAssistant: …"`` (system: ``"System: …"``).
  A string prompt with message responses (or the reverse) is read as a user (assistant) message.
* **Tokens.** Prompt and response text are tokenised separately, without special tokens, so the prompt
  ids are identical for every response of a record. ``prefix`` and ``suffix`` are the special tokens
  the tokenizer itself puts around one sequence (BERT: ``[CLS]`` … ``[SEP]``; Llama: ``<s>`` …;
  Qwen: nothing), plus ``eos_token_id`` at the very end when ``append_eos`` asks for it (by default:
  whenever the tokenizer has an EOS and its own suffix does not already end with it, because decoder
  reward models read the reward at the last token). A template that writes the prefix (or suffix)
  into its text does not get it twice.
* **Truncation** to ``max_length`` tokens in all, special tokens included: ``prompt_left`` drops prompt
  tokens from the left, the same number for every response of the record, so that the longest
  response fits; a response that does not fit even alone is cut from the right (the suffix stays).
  ``right`` cuts each sequence from the right, keeping the suffix. ``error`` raises. Nothing is ever
  dropped; every truncated record is counted and named in the report.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np

from jaxrm.data.records import (
    RATING_LEVELS,
    DataError,
    Message,
    PairRecord,
    RankedRecord,
    Record,
    TieRecord,
    record_responses,
)

__all__ = ["SpecialTokens", "TokenizeReport", "TokenizedExample", "special_tokens", "tokenize_records"]

TRUNCATION_MODES = ("prompt_left", "right", "error")

#: Truncation warnings kept in a report; the rest are counted.
MAX_WARNINGS = 20

_PLAIN_LABELS = {"system": "System", "user": "Human", "assistant": "Assistant", "tool": "Tool"}
_TIE_RANKS = {1: (0, 1), -1: (1, 0), 0: (0, 0)}


@dataclasses.dataclass(frozen=True, eq=False)
class TokenizedExample:
    """One record as K token sequences (pairs: chosen, rejected; ties: a, b; ranked: the list).

    Attributes:
      sequences: K int32 arrays, each the full model input ``prefix + prompt + response + suffix``.
      ranks: int32 ``[K]``, 0 = best, equal = tie. Pairs ``[0, 1]``; ties ``[0, 1]`` / ``[1, 0]`` / ``[0, 0]``.
      outcome: +1 if sequence 0 is preferred over sequence 1, −1 if sequence 1 is, 0 for a tie
        (pairs: +1; ties: the record's outcome; ranked lists: from their first two ranks).
      margin: the record's margin, 0.0 when absent.
      rating: index into :data:`~jaxrm.data.records.RATING_LEVELS`, −1 when absent.
      true_rewards: float32 ``[K]`` known rewards (synthetic data), else None.
      source: where the record came from (``path:line``).
      truncated: some sequence of the record lost tokens to ``max_length``.
      subset: the record's subset label, if any.
      response_lengths: int32 ``[K]``, response tokens kept in each sequence (special tokens and
        prompt excluded; when a chat template hides the prompt boundary, the whole conversation).
      scores: float32 ``[K]`` per-response scores (ranked ``scores``; pairwise ``score_chosen``,
        ``score_rejected``), else None.
    """

    sequences: tuple[np.ndarray, ...]
    ranks: np.ndarray
    outcome: int
    margin: float
    rating: int
    true_rewards: np.ndarray | None
    source: str
    truncated: bool
    subset: str | None
    response_lengths: np.ndarray
    scores: np.ndarray | None = None


@dataclasses.dataclass
class TokenizeReport:
    n_examples: int
    n_truncated: int
    #: Truncated records (first :data:`MAX_WARNINGS`, then one line counting the rest) and chat
    #: template fallbacks.
    warnings: list[str]
    #: Records whose chat template did not show where the prompt ends (whole-sequence truncation).
    n_prompt_unknown: int = 0
    special_tokens: SpecialTokens | None = None


@dataclasses.dataclass(frozen=True)
class SpecialTokens:
    """The ids around every sequence, and the id to pad batches with."""

    prefix: tuple[int, ...]
    #: The tokenizer's own suffix, plus the EOS id when it is appended.
    suffix: tuple[int, ...]
    #: ``pad_token_id``, or ``eos_token_id`` for tokenizers without a pad token (padding is masked).
    pad_id: int
    eos_appended: bool


def special_tokens(tokenizer, *, append_eos: bool | None = None) -> SpecialTokens:
    """Finds the special tokens ``tokenizer`` adds around a single sequence, and the EOS rule.

    Raises:
      ValueError: the tokenizer has neither a pad nor an EOS token, or ``append_eos=True`` without EOS.
    """
    pad_id, eos_id = tokenizer.pad_token_id, tokenizer.eos_token_id
    if pad_id is None and eos_id is None:
        raise ValueError(
            f"the tokenizer ({type(tokenizer).__name__}) has neither a pad token nor an EOS token, so batches "
            "cannot be padded and the last token is undefined; set one first, e.g. "
            "tokenizer.add_special_tokens({'pad_token': '<pad>'}) (and resize the model's embeddings)"
        )
    marker = "jaxrm marker text"
    plain = list(tokenizer(marker, add_special_tokens=False)["input_ids"])
    full = list(tokenizer(marker, add_special_tokens=True)["input_ids"])
    prefix, suffix = _split_around(full, plain, set(tokenizer.all_special_ids))
    if append_eos and eos_id is None:
        raise ValueError(
            f"append_eos=True but the tokenizer ({type(tokenizer).__name__}) has no EOS token; "
            "leave append_eos=None or set tokenizer.eos_token"
        )
    eos_appended = False
    if append_eos is not False and eos_id is not None and (not suffix or suffix[-1] != eos_id):
        suffix = suffix + (int(eos_id),)
        eos_appended = True
    return SpecialTokens(prefix, suffix, int(pad_id if pad_id is not None else eos_id), eos_appended)


def tokenize_records(
    records: Sequence[Record],
    tokenizer,
    *,
    max_length: int,
    truncation: str = "prompt_left",
    append_eos: bool | None = None,
) -> tuple[list[TokenizedExample], TokenizeReport]:
    """Tokenises records for a reward model (see the module docstring for the rules).

    Args:
      records: parsed records (:func:`~jaxrm.data.records.parse_record`).
      tokenizer: a Hugging Face tokenizer (fast ones are much faster: every text goes in one batch call).
      max_length: tokens per sequence, special tokens included.
      truncation: ``"prompt_left"``, ``"right"`` or ``"error"``.
      append_eos: ``None``: append EOS unless the tokenizer's suffix already ends with it (or it has
        none); ``True``: make sure every sequence ends with EOS; ``False``: never append it.

    Returns:
      ``(examples, report)``: one example per record, in order.

    Raises:
      DataError: ``truncation="error"`` and a sequence is too long, or a chat template rejects a record.
      ValueError: bad arguments, or a tokenizer without pad and EOS tokens.
    """
    if truncation not in TRUNCATION_MODES:
        raise ValueError(f"truncation must be one of {', '.join(TRUNCATION_MODES)}, got {truncation!r}")
    special = special_tokens(tokenizer, append_eos=append_eos)
    budget = max_length - len(special.prefix) - len(special.suffix)
    if budget < 1:
        raise ValueError(
            f"max_length={max_length} leaves no room for text after the {len(special.prefix) + len(special.suffix)} "
            "special tokens of every sequence; raise max_length"
        )
    rendered = [_render_record(record, tokenizer) for record in records]
    texts = []
    for prompt_text, response_texts, _ in rendered:
        texts.append(prompt_text)
        texts.extend(response_texts)
    ids = _tokenize_texts(tokenizer, texts)

    examples = []
    warnings: list[str] = []
    n_truncated = n_prompt_unknown = n_warnings = 0
    position = 0
    for record, (_, response_texts, prompt_known) in zip(records, rendered):
        prompt_ids = ids[position]
        response_ids = ids[position + 1 : position + 1 + len(response_texts)]
        position += 1 + len(response_texts)
        prompt_ids, response_ids = _strip_written_specials(prompt_ids, response_ids, special)
        if not prompt_known:
            n_prompt_unknown += 1
            n_warnings += 1
            if len(warnings) < MAX_WARNINGS:
                warnings.append(
                    f"{record.source}: the chat template does not render the prompt as a prefix of the "
                    "conversation, so the prompt boundary is unknown: each whole conversation counts as the "
                    "response and is truncated from the left"
                )
        bodies, kept_response, truncated, detail = _truncate(
            prompt_ids, response_ids, budget, truncation, prompt_known, record.source, max_length, special
        )
        if truncated:
            n_truncated += 1
            n_warnings += 1
            if len(warnings) < MAX_WARNINGS:
                warnings.append(f"{record.source}: truncated to max_length={max_length} ({truncation}): {detail}")
        examples.append(_example(record, special, bodies, kept_response, truncated))
    shown = min(n_warnings, MAX_WARNINGS)
    if n_warnings > shown:
        warnings.append(f"... and {n_warnings - shown} more warning(s) like these")
    report = TokenizeReport(
        n_examples=len(examples), n_truncated=n_truncated, warnings=warnings,
        n_prompt_unknown=n_prompt_unknown, special_tokens=special,
    )
    return examples, report


def _split_around(full: list[int], plain: list[int], special_ids: set[int]) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """``full = prefix + plain + suffix``: returns (prefix, suffix)."""
    for start in range(len(full) - len(plain) + 1):
        if full[start : start + len(plain)] == plain:
            return tuple(full[:start]), tuple(full[start + len(plain) :])
    # A post-processor that also changes the text's own ids: fall back to the special ids at the ends.
    start = 0
    while start < len(full) and full[start] in special_ids:
        start += 1
    end = len(full)
    while end > start and full[end - 1] in special_ids:
        end -= 1
    return tuple(full[:start]), tuple(full[end:])


def _as_messages(text, role: str) -> tuple[Message, ...]:
    if text is None:
        return ()
    if isinstance(text, str):
        return (Message(role, text),)
    return text


def _render_record(record: Record, tokenizer) -> tuple[str, list[str], bool]:
    """``(prompt_text, response_texts, prompt_known)`` for one record."""
    responses = record_responses(record)
    if not any(isinstance(part, tuple) for part in (record.prompt, *responses)):
        return record.prompt or "", list(responses), True
    prompt = _as_messages(record.prompt, "user")
    conversations = [_as_messages(response, "assistant") for response in responses]
    if not getattr(tokenizer, "chat_template", None):
        prompt_text = _plain(prompt)
        if all(conversation[0].role == "assistant" for conversation in conversations):
            prompt_text += "\n\nAssistant:"
        # The first assistant turn continues the prompt's "Assistant:" label: " " + content.
        texts = [_plain(prompt + conversation)[len(prompt_text) :] for conversation in conversations]
        return prompt_text, texts, True
    fulls = [_template(tokenizer, prompt + conversation, record.source) for conversation in conversations]
    if not prompt:
        return "", fulls, True
    for generation_prompt in (True, False):
        prompt_text = _template(tokenizer, prompt, record.source, add_generation_prompt=generation_prompt)
        if all(full.startswith(prompt_text) for full in fulls):
            return prompt_text, [full[len(prompt_text) :] for full in fulls], True
    return "", fulls, False


def _plain(messages: Sequence[Message]) -> str:
    return "".join(f"\n\n{_PLAIN_LABELS[message.role]}: {message.content}" for message in messages)


def _template(tokenizer, messages: Sequence[Message], source: str, *, add_generation_prompt: bool = False) -> str:
    conversation = [{"role": message.role, "content": message.content} for message in messages]
    try:
        text = tokenizer.apply_chat_template(
            conversation, tokenize=False, add_generation_prompt=add_generation_prompt
        )
    except Exception as error:  # jinja raises whatever the template author chose (often TemplateError)
        raise DataError(
            f"{source}: the tokenizer's chat template rejected this conversation ({type(error).__name__}: {error}); "
            "fix the roles/order of the messages, or give prompt and responses as plain strings"
        ) from None
    if not isinstance(text, str):
        raise TypeError(f"apply_chat_template(tokenize=False) returned {type(text).__name__}, expected a string")
    return text


def _tokenize_texts(tokenizer, texts: list[str]) -> list[list[int]]:
    if not texts:
        return []
    encoded = tokenizer(
        texts, add_special_tokens=False, return_attention_mask=False, return_token_type_ids=False, verbose=False
    )
    return [list(ids) for ids in encoded["input_ids"]]


def _strip_written_specials(prompt_ids, response_ids, special: SpecialTokens):
    """Drops a prefix / suffix that a chat template already wrote as text, so it is not doubled."""
    prefix, suffix = list(special.prefix), list(special.suffix)
    if prefix:
        if prompt_ids[: len(prefix)] == prefix:
            prompt_ids = prompt_ids[len(prefix) :]
        elif not prompt_ids:
            response_ids = [ids[len(prefix) :] if ids[: len(prefix)] == prefix else ids for ids in response_ids]
    if suffix:
        response_ids = [ids[: -len(suffix)] if ids[-len(suffix) :] == suffix else ids for ids in response_ids]
    return prompt_ids, response_ids


def _truncate(prompt_ids, response_ids, budget, mode, prompt_known, source, max_length, special):
    """Returns (bodies, kept response lengths, truncated, detail) with every body ≤ budget tokens."""
    prompt_length = len(prompt_ids)
    response_lengths = [len(ids) for ids in response_ids]
    if prompt_length + max(response_lengths) <= budget:
        return [prompt_ids + ids for ids in response_ids], response_lengths, False, ""
    if mode == "error":
        worst = max(range(len(response_ids)), key=lambda k: response_lengths[k])
        n_special = len(special.prefix) + len(special.suffix)
        raise DataError(
            f"{source}: sequence {worst} needs {prompt_length + response_lengths[worst] + n_special} tokens "
            f"(prompt {prompt_length} + response {response_lengths[worst]} + {n_special} special) but "
            f"max_length is {max_length}; raise max_length, or use truncation='prompt_left' or 'right'"
        )
    if mode == "right":
        bodies = [(prompt_ids + ids)[:budget] for ids in response_ids]
        kept = [max(0, len(body) - prompt_length) for body in bodies]
        lost = sum(1 for k in kept if k == 0)
        detail = f"responses {response_lengths} -> {kept} tokens after a {min(prompt_length, budget)}-token prompt"
        if lost:
            detail += f"; {lost} response(s) lost every token (the prompt alone fills max_length)"
        return bodies, kept, True, detail
    if not prompt_known:
        bodies = [ids[-budget:] if len(ids) > budget else ids for ids in response_ids]
        kept = [len(body) for body in bodies]
        return bodies, kept, True, f"conversations {response_lengths} -> {kept} tokens, cut from the left"
    prompt_keep = min(prompt_length, max(0, budget - max(response_lengths)))
    response_room = budget - prompt_keep
    kept_prompt = prompt_ids[prompt_length - prompt_keep :]
    bodies = [kept_prompt + ids[:response_room] for ids in response_ids]
    kept = [min(length, response_room) for length in response_lengths]
    detail = f"prompt {prompt_length} -> {prompt_keep} tokens (kept from the right)"
    if kept != response_lengths:
        detail += f"; responses {response_lengths} -> {kept} tokens (cut from the right: too long even alone)"
    return bodies, kept, True, detail


def _example(record: Record, special: SpecialTokens, bodies, kept, truncated: bool) -> TokenizedExample:
    prefix, suffix = list(special.prefix), list(special.suffix)
    sequences = tuple(np.asarray(prefix + body + suffix, dtype=np.int32) for body in bodies)
    margin, rating = 0.0, -1
    if isinstance(record, PairRecord):
        ranks, outcome = (0, 1), 1
        margin = record.margin if record.margin is not None else 0.0
        rating = RATING_LEVELS.index(record.rating) if record.rating is not None else -1
    elif isinstance(record, TieRecord):
        ranks, outcome = _TIE_RANKS[record.outcome], record.outcome
    elif isinstance(record, RankedRecord):
        ranks = record.ranks
        outcome = int(np.sign(ranks[1] - ranks[0]))
    else:
        raise TypeError(f"expected a PairRecord, RankedRecord or TieRecord, got {type(record).__name__}")
    true_rewards = None if record.true_rewards is None else np.asarray(record.true_rewards, dtype=np.float32)
    return TokenizedExample(
        sequences=sequences,
        ranks=np.asarray(ranks, dtype=np.int32),
        outcome=outcome,
        margin=float(margin),
        rating=rating,
        true_rewards=true_rewards,
        source=record.source,
        truncated=truncated,
        subset=record.subset,
        response_lengths=np.asarray(kept, dtype=np.int32),
        scores=None if getattr(record, "scores", None) is None else np.asarray(record.scores, dtype=np.float32),
    )
