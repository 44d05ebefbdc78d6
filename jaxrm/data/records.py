"""Preference records: the three kinds jaxrm trains on, and the one function that validates them.

A record is one JSON object (a JSONL line, a Parquet or ``datasets`` row). Its kind follows from its
fields:

* pairwise ``{"prompt"?, "chosen", "rejected", "margin"?, "margin_std"?, "rating"?, "score_chosen"?,
  "score_rejected"?}`` (per-response scores, e.g. UltraFeedback's, come as a pair or not at all);
* ranked ``{"prompt"?, "responses": [...], "ranks" | "scores"}`` (higher score = better; equal = tie);
* tie ``{"prompt"?, "a", "b", "outcome"}`` with outcome ``1`` (a wins), ``-1`` (b wins), ``0`` (tie),
  or ``"a"`` / ``"b"`` / ``"tie"``.

Every kind may carry ``id``, ``subset`` and ``true_rewards`` (one finite number per response). A
prompt or response is a string or a chat message list ``[{"role", "content"}, ...]``; a response
given as messages is the assistant turn(s) that answer the prompt. A field set to ``null`` counts as
absent.

Without a ``prompt``, responses that repeat the conversation (Anthropic hh-rlhf style) are split:
strings at the last ``"\\n\\nAssistant:"`` marker they share (the marker stays in the prompt), message
lists after their shared leading messages.

Every error is a :class:`DataError` whose message starts with the record's location (``path:line``),
names the field, and says what to do.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
import warnings as _warnings
from typing import Any

#: Llama 2's annotator rating levels, weakest first: the index is the strength (``rating`` in
#: :class:`~jaxrm.data.tokenize.TokenizedExample`). "unsure" is read as "negligibly better".
RATING_LEVELS = ("negligibly better", "slightly better", "better", "significantly better")

ROLES = ("system", "user", "assistant", "tool")

#: The hh-rlhf turn marker that ends an implicit prompt.
ASSISTANT_MARKER = "\n\nAssistant:"

#: The largest finite float32: numbers read from records are used in float32 on the device.
FLOAT32_MAX = 3.4028234663852886e38

_RATING_ALIASES = {name: index for index, name in enumerate(RATING_LEVELS)} | {"unsure": 0}
_OUTCOME_ALIASES = {"a": 1, "b": -1, "tie": 0}
_METADATA_FIELDS = ("id", "subset", "true_rewards")
_FIELDS = {
    "pairwise": ("prompt", "chosen", "rejected", "margin", "margin_std", "rating", "score_chosen", "score_rejected")
    + _METADATA_FIELDS,
    "ranked": ("prompt", "responses", "ranks", "scores") + _METADATA_FIELDS,
    "tie": ("prompt", "a", "b", "outcome") + _METADATA_FIELDS,
}
# The fields that give a record's kind away, and the ones each kind cannot do without.
_MARKERS = {
    "pairwise": ("chosen", "rejected"),
    "ranked": ("responses", "ranks", "scores"),
    "tie": ("a", "b", "outcome"),
}
_REQUIRED = {"pairwise": ("chosen", "rejected"), "ranked": ("responses",), "tie": ("a", "b", "outcome")}


class DataError(ValueError):
    """A record, file or dataset that jaxrm cannot read; the message starts with ``location: ``."""


class DataWarning(UserWarning):
    """Something suspicious but readable in the data (issued only when nobody collects warnings)."""


@dataclasses.dataclass(frozen=True, slots=True)
class Message:
    role: str
    content: str


Text = str | tuple[Message, ...]


@dataclasses.dataclass(frozen=True, slots=True)
class PairRecord:
    prompt: Text | None
    chosen: Text
    rejected: Text
    margin: float | None
    rating: str | None
    source: str
    subset: str | None = None
    true_rewards: tuple[float, float] | None = None
    id: str | int | None = None
    #: ``(score_chosen, score_rejected)`` when the record has per-response scores.
    scores: tuple[float, float] | None = None
    #: The spread of an estimated margin (``jaxrm margins estimate``: the ensemble's std).
    margin_std: float | None = None

    @property
    def responses(self) -> tuple[Text, Text]:
        return (self.chosen, self.rejected)


@dataclasses.dataclass(frozen=True, slots=True)
class RankedRecord:
    prompt: Text | None
    responses: tuple[Text, ...]
    ranks: tuple[int, ...]
    source: str
    subset: str | None = None
    true_rewards: tuple[float, ...] | None = None
    scores: tuple[float, ...] | None = None
    id: str | int | None = None


@dataclasses.dataclass(frozen=True, slots=True)
class TieRecord:
    prompt: Text | None
    a: Text
    b: Text
    #: +1: ``a`` is preferred, −1: ``b`` is preferred, 0: a tie.
    outcome: int
    source: str
    subset: str | None = None
    true_rewards: tuple[float, float] | None = None
    id: str | int | None = None

    @property
    def responses(self) -> tuple[Text, Text]:
        return (self.a, self.b)


Record = PairRecord | RankedRecord | TieRecord


def record_responses(record: Record) -> tuple[Text, ...]:
    """The responses of any record kind, in order (pairs: chosen, rejected; ties: a, b)."""
    return record.responses


def parse_record(
    obj: Any,
    source: str,
    *,
    unknown_fields: str = "error",
    warnings: list[str] | None = None,
) -> Record:
    """Validates one raw record and returns its typed form.

    Args:
      obj: the decoded JSON object (a dict).
      source: where it came from, ``path:line`` or ``name[index]``; every message starts with it.
      unknown_fields: a field jaxrm does not know: ``"error"`` (the default: a typo must not
        silently drop data), ``"warn"`` or ``"ignore"``.
      warnings: if given, warning lines are appended here; otherwise they are issued as
        :class:`DataWarning`.

    Returns:
      A :class:`PairRecord`, :class:`RankedRecord` or :class:`TieRecord`.

    Raises:
      DataError: the record is malformed; the message names the location, the field and the fix.
    """
    if unknown_fields not in ("error", "warn", "ignore"):
        raise ValueError(f"unknown_fields must be 'error', 'warn' or 'ignore', got {unknown_fields!r}")
    if not isinstance(obj, dict):
        raise DataError(
            f"{source}: a record must be a JSON object with fields such as chosen/rejected, "
            f"got {type(obj).__name__} {_preview(obj)}"
        )
    present = {key: value for key, value in obj.items() if value is not None}
    kind = _detect_kind(present, source)
    _check_unknown_fields(obj, _FIELDS[kind], f"{kind} record", source, unknown_fields, warnings)
    missing = [name for name in _REQUIRED[kind] if name not in present]
    if kind == "ranked" and "ranks" not in present and "scores" not in present:
        missing.append("ranks' or 'scores")
    if missing:
        have = ", ".join(repr(key) for key in present if key in _MARKERS[kind])
        raise DataError(
            f"{source}: looks like a {kind} record (it has {have}) but is missing '{missing[0]}'; "
            f"a {kind} record needs {_kind_fields(kind)}"
        )

    subset = present.get("subset")
    if subset is not None and not isinstance(subset, str):
        raise DataError(f"{source}: field 'subset' must be a string, got {_preview(subset)}")
    record_id = present.get("id")
    if record_id is not None and (not isinstance(record_id, (str, int)) or isinstance(record_id, bool)):
        raise DataError(f"{source}: field 'id' must be a string or an integer, got {_preview(record_id)}")
    context = _Context(source, unknown_fields, warnings)

    prompt = _parse_text(present["prompt"], "prompt", context, is_prompt=True) if "prompt" in present else None
    if kind == "pairwise":
        names = ("chosen", "rejected")
    elif kind == "tie":
        names = ("a", "b")
    else:
        raw_responses = present["responses"]
        if not isinstance(raw_responses, (list, tuple)):
            raise DataError(f"{source}: field 'responses' must be a list of responses, got {_preview(raw_responses)}")
        if len(raw_responses) < 2:
            raise DataError(
                f"{source}: field 'responses' has {len(raw_responses)} response(s); a ranked record needs at "
                "least 2 to compare"
            )
        names = tuple(f"responses[{i}]" for i in range(len(raw_responses)))
    raw = [present[name] for name in names] if kind != "ranked" else list(present["responses"])
    responses = [_parse_text(value, name, context) for name, value in zip(names, raw)]
    if prompt is None:
        # A response left empty by the split (the assistant said nothing) is kept: it is what was rated.
        prompt, responses = split_shared_prompt(responses)

    true_rewards = _parse_numbers(present.get("true_rewards"), "true_rewards", len(responses), source)
    if kind == "pairwise":
        return PairRecord(
            prompt=prompt, chosen=responses[0], rejected=responses[1],
            margin=_parse_margin(present.get("margin"), source), rating=_parse_rating(present.get("rating"), source),
            source=source, subset=subset, true_rewards=true_rewards, id=record_id,
            scores=_parse_pair_scores(present, source),
            margin_std=_parse_margin(present.get("margin_std"), source, name="margin_std"),
        )
    if kind == "tie":
        return TieRecord(
            prompt=prompt, a=responses[0], b=responses[1], outcome=_parse_outcome(present["outcome"], source),
            source=source, subset=subset, true_rewards=true_rewards, id=record_id,
        )
    scores = _parse_numbers(present.get("scores"), "scores", len(responses), source)
    if "ranks" in present:
        ranks = _parse_ranks(present["ranks"], len(responses), source)
    else:
        ranks = ranks_from_scores(scores)
    return RankedRecord(
        prompt=prompt, responses=tuple(responses), ranks=ranks, source=source, subset=subset,
        true_rewards=true_rewards, scores=scores, id=record_id,
    )


def ranks_from_scores(scores) -> tuple[int, ...]:
    """Dense ranks, 0 = best: a higher score is better, equal scores share a rank.

    >>> ranks_from_scores([0.5, 2.0, 0.5, -1.0])
    (1, 0, 1, 2)
    """
    distinct = sorted(set(scores), reverse=True)
    position = {score: rank for rank, score in enumerate(distinct)}
    return tuple(position[score] for score in scores)


def normalize_rating(value: Any) -> str:
    """A rating (a level name in any case/spacing, "unsure", or 0..3) as its name in RATING_LEVELS."""
    if isinstance(value, int) and not isinstance(value, bool):
        if 0 <= value < len(RATING_LEVELS):
            return RATING_LEVELS[value]
        raise ValueError(
            f"{value} is out of range; integer ratings are 0 (negligibly better) to 3 (significantly better)"
        )
    if isinstance(value, str):
        key = " ".join(value.replace("_", " ").replace("-", " ").lower().split())
        if key in _RATING_ALIASES:
            return RATING_LEVELS[_RATING_ALIASES[key]]
    raise ValueError(
        f"{value!r} is not a Llama 2 rating; use one of {', '.join(repr(r) for r in RATING_LEVELS)}, "
        "'unsure', or an integer 0..3 (3 = significantly better)"
    )


def split_shared_prompt(responses: list[Text]) -> tuple[Text | None, list[Text]]:
    """Splits responses that all repeat the same conversation into (prompt, responses).

    Strings are cut after the last ``"\\n\\nAssistant:"`` marker inside their common prefix; message
    lists after their common leading messages (each response keeps at least its last message).
    Returns ``(None, responses)`` when nothing is shared.
    """
    if all(isinstance(response, str) for response in responses):
        shared = os.path.commonprefix(responses)
        cut = shared.rfind(ASSISTANT_MARKER)
        if cut < 0:
            return None, responses
        cut += len(ASSISTANT_MARKER)
        return shared[:cut], [response[cut:] for response in responses]
    if all(isinstance(response, tuple) for response in responses):
        limit = min(len(response) for response in responses) - 1
        count = 0
        while count < limit and all(response[count] == responses[0][count] for response in responses):
            count += 1
        if count == 0:
            return None, responses
        return responses[0][:count], [response[count:] for response in responses]
    return None, responses


@dataclasses.dataclass
class _Context:
    source: str
    unknown_fields: str
    warnings: list[str] | None


def _detect_kind(present: dict, source: str) -> str:
    kinds = [kind for kind, markers in _MARKERS.items() if any(marker in present for marker in markers)]
    if len(kinds) == 1:
        return kinds[0]
    if not kinds:
        fields = ", ".join(repr(key) for key in present) or "no non-null fields"
        raise DataError(
            f"{source}: not a preference record (it has {fields}); use chosen/rejected (pairwise), "
            "responses with ranks or scores (ranked), or a/b/outcome (tie)"
        )
    clues = "; ".join(
        f"{kind}: {', '.join(repr(m) for m in _MARKERS[kind] if m in present)}" for kind in kinds
    )
    raise DataError(f"{source}: the record mixes fields of different kinds ({clues}); keep the fields of one kind")


def _kind_fields(kind: str) -> str:
    return {
        "pairwise": "'chosen' and 'rejected' (and optionally 'prompt', 'margin', 'rating')",
        "ranked": "'responses' and 'ranks' or 'scores' (and optionally 'prompt')",
        "tie": "'a', 'b' and 'outcome' (and optionally 'prompt')",
    }[kind]


def _check_unknown_fields(obj: dict, allowed, what: str, source: str, policy: str, warnings) -> None:
    if policy == "ignore":
        return
    for key in obj:
        if key in allowed:
            continue
        near = difflib.get_close_matches(str(key), allowed, n=1, cutoff=0.6)
        hint = f"did you mean '{near[0]}'?" if near else f"valid fields: {', '.join(allowed)}"
        message = f"{source}: unknown field {key!r} in a {what} ({hint})"
        if policy == "error":
            raise DataError(
                f"{message}; rename it, or set unknown_fields='warn' or 'ignore' (data.unknown_fields) to read past it"
            )
        _warn(message + "; ignored", warnings)


def _warn(message: str, warnings: list[str] | None) -> None:
    if warnings is None:
        _warnings.warn(message, DataWarning, stacklevel=3)
    else:
        warnings.append(message)


def _parse_text(value: Any, name: str, context: _Context, *, is_prompt: bool = False) -> Text | None:
    source = context.source
    if isinstance(value, str):
        if not is_prompt and not value.strip():
            raise DataError(f"{source}: field '{name}' is empty; every response needs some text")
        return value
    if not isinstance(value, (list, tuple)):
        expected = "a string or a list of chat messages [{\"role\": ..., \"content\": ...}]"
        raise DataError(f"{source}: field '{name}' must be {expected}, got {_preview(value)}")
    if not value:
        if is_prompt:
            return None
        raise DataError(f"{source}: field '{name}' is an empty message list; give at least one message")
    messages = []
    for index, item in enumerate(value):
        where = f"{name}[{index}]"
        if not isinstance(item, dict):
            raise DataError(
                f"{source}: {where} must be a message {{\"role\": ..., \"content\": ...}}, got {_preview(item)}"
            )
        for key in ("role", "content"):
            if item.get(key) is None:
                raise DataError(f"{source}: {where} has no '{key}'; every message needs a role and a content string")
        _check_unknown_fields(
            {key: v for key, v in item.items() if v is not None}, ("role", "content"), "message",
            f"{source}: {where}", context.unknown_fields, context.warnings,
        )
        role, content = item["role"], item["content"]
        if role not in ROLES:
            raise DataError(f"{source}: {where} has role {role!r}; use one of {', '.join(ROLES)}")
        if not isinstance(content, str):
            raise DataError(
                f"{source}: {where}.content must be a string, got {_preview(content)}; "
                "flatten multi-part content to text first"
            )
        messages.append(Message(role, content))
    messages = tuple(messages)
    if not is_prompt and _is_blank(messages):
        raise DataError(f"{source}: field '{name}' has only empty messages; every response needs some text")
    return messages


def _is_blank(text: Text) -> bool:
    if isinstance(text, str):
        return not text.strip()
    return all(not message.content.strip() for message in text)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _parse_margin(value: Any, source: str, *, name: str = "margin") -> float | None:
    if value is None:
        return None
    if not _is_number(value) or not math.isfinite(value) or value < 0:
        raise DataError(
            f"{source}: field '{name}' must be a finite number >= 0, got {_preview(value)}; "
            "a margin says how much better chosen is, so a negative one means the pair is swapped"
        )
    if value > FLOAT32_MAX:
        raise DataError(
            f"{source}: field '{name}' is {_preview(value)}, beyond the float32 range (about 3.4e38) that training "
            "computes in, where it would become inf; rescale the margins (loss.margin_scale multiplies them back)"
        )
    return float(value)


def _parse_pair_scores(present: dict, source: str) -> tuple[float, float] | None:
    given = [name for name in ("score_chosen", "score_rejected") if name in present]
    if not given:
        return None
    if len(given) == 1:
        missing = "score_rejected" if given[0] == "score_chosen" else "score_chosen"
        raise DataError(f"{source}: field '{given[0]}' needs '{missing}' too; give both scores or neither")
    scores = _parse_numbers([present["score_chosen"], present["score_rejected"]], "[score_chosen, score_rejected]",
                            2, source)
    return (scores[0], scores[1])


def _parse_rating(value: Any, source: str) -> str | None:
    if value is None:
        return None
    try:
        return normalize_rating(value)
    except ValueError as error:
        raise DataError(f"{source}: field 'rating': {error}") from None


def _parse_outcome(value: Any, source: str) -> int:
    if isinstance(value, str) and value.strip().lower() in _OUTCOME_ALIASES:
        return _OUTCOME_ALIASES[value.strip().lower()]
    if isinstance(value, int) and not isinstance(value, bool) and value in (1, 0, -1):
        return int(value)
    raise DataError(
        f"{source}: field 'outcome' must be 1 or \"a\" (a preferred), -1 or \"b\" (b preferred), "
        f"or 0 or \"tie\", got {_preview(value)}"
    )


def _parse_numbers(value: Any, name: str, count: int, source: str) -> tuple[float, ...] | None:
    if value is None:
        return None
    if not isinstance(value, (list, tuple)) or len(value) != count:
        raise DataError(
            f"{source}: field '{name}' must be a list of {count} numbers, one per response, got {_preview(value)}"
        )
    for index, number in enumerate(value):
        if not _is_number(number) or not math.isfinite(number):
            raise DataError(f"{source}: {name}[{index}] must be a finite number, got {_preview(number)}")
    return tuple(float(number) for number in value)


def _parse_ranks(value: Any, count: int, source: str) -> tuple[int, ...]:
    if not isinstance(value, (list, tuple)) or len(value) != count:
        raise DataError(
            f"{source}: field 'ranks' must be a list of {count} integers, one per response, got {_preview(value)}"
        )
    for index, rank in enumerate(value):
        if not isinstance(rank, int) or isinstance(rank, bool) or rank < 0:
            raise DataError(f"{source}: ranks[{index}] must be an integer >= 0 (0 = best), got {_preview(rank)}")
    if sorted(set(value)) != list(range(max(value) + 1)):
        raise DataError(
            f"{source}: field 'ranks' {list(value)} skips a rank; ranks must be dense from 0 (0 = best, equal "
            "ranks are ties), e.g. [0, 2, 1] or [0, 0, 1]"
        )
    return tuple(value)


def _preview(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."
