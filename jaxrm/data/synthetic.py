"""A preference source whose ground truth is known: to check that a reward model learns what it should.

Responses are short texts of made-up words ``w00``, ``w01``, …; every word has a hidden utility
(seeded normal draws times ``reward_scale``) and the true reward of a response is the sum of its
words' utilities. Preferences are sampled from the models the losses assume, on the true rewards:

* pairs: Bradley–Terry, P(first preferred) = σ(r₁ − r₂);
* rankings: Plackett–Luce (a Gumbel-perturbed sort of the true rewards);
* ties: Rao–Kupper with θ = exp(log_theta): P(a ≻ b) = σ(r_a − r_b − log θ), the same for b, the rest a tie.

Prompts are ``"rate:"`` and two words ``p0``…``p7`` that carry no utility (the reward does not depend
on the prompt). Optional annotator ratings bucket the true gap |r₁ − r₂| by the task's quartiles
(:attr:`SyntheticTask.rating_thresholds`), so the four Llama 2 levels are about equally common and
stronger ratings mean larger true gaps.

Everything is a deterministic function of the task's fields and the ``seed`` argument.

Example:
    >>> task = SyntheticTask(seed=0)
    >>> record = task.pairs(1, seed=1)[0]
    >>> sorted(record)
    ['chosen', 'prompt', 'rejected', 'true_rewards']
    >>> task.true_reward(record["chosen"]) == record["true_rewards"][0]
    True
"""

from __future__ import annotations

import dataclasses
import functools
import gzip
import json
import os
from pathlib import Path

import numpy as np

from jaxrm.data.records import RATING_LEVELS
from jaxrm.data.stats import spearman

__all__ = ["SyntheticTask", "spearman", "write_jsonl"]

#: The special tokens of :meth:`SyntheticTask.tokenizer`, ids 0..3 in this order.
SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[BOS]", "[EOS]")
PROMPT_HEAD = "rate:"
PROMPT_WORDS = tuple(f"p{i}" for i in range(8))


@dataclasses.dataclass(frozen=True)
class SyntheticTask:
    vocab_size: int = 64
    min_words: int = 3
    max_words: int = 12
    seed: int = 0
    reward_scale: float = 1.0

    def __post_init__(self):
        if self.vocab_size < 2:
            raise ValueError(f"vocab_size must be at least 2, got {self.vocab_size}")
        if not 1 <= self.min_words <= self.max_words:
            raise ValueError(
                f"need 1 <= min_words <= max_words, got min_words={self.min_words}, max_words={self.max_words}"
            )
        if not (np.isfinite(self.reward_scale) and self.reward_scale > 0):
            raise ValueError(f"reward_scale must be a positive number, got {self.reward_scale}")

    @functools.cached_property
    def words(self) -> list[str]:
        """The response vocabulary: ``w00``, ``w01``, … (zero-padded to equal width)."""
        width = max(2, len(str(self.vocab_size - 1)))
        return [f"w{i:0{width}d}" for i in range(self.vocab_size)]

    @functools.cached_property
    def utilities(self) -> np.ndarray:
        """float64 ``[vocab_size]``: each word's hidden utility, normal(0, 1) · reward_scale."""
        return np.random.default_rng(self.seed).normal(size=self.vocab_size) * self.reward_scale

    @functools.cached_property
    def _utility_of(self) -> dict[str, float]:
        return dict(zip(self.words, self.utilities.tolist()))

    def true_reward(self, text: str) -> float:
        """The sum of the utilities of the words of ``text`` (other words, e.g. the prompt's, count 0)."""
        utility = self._utility_of
        return float(sum(utility.get(word, 0.0) for word in text.split()))

    @functools.cached_property
    def rating_thresholds(self) -> tuple[float, float, float]:
        """Quartiles of the true gap |r₁ − r₂| between two random responses (a fixed Monte Carlo
        estimate per task): gaps below the first are "negligibly better", … above the third
        "significantly better"."""
        rng = np.random.default_rng([self.seed, 7919])
        gaps = np.abs(self._sample_rewards(rng, 20_000) - self._sample_rewards(rng, 20_000))
        return tuple(float(q) for q in np.quantile(gaps, [0.25, 0.5, 0.75]))

    def rating(self, gap: float) -> str:
        """The Llama 2 rating level of a true reward gap (see :attr:`rating_thresholds`)."""
        return RATING_LEVELS[int(np.searchsorted(self.rating_thresholds, abs(gap), side="right"))]

    def tokenizer(self):
        """A word-level ``PreTrainedTokenizerFast`` for this task, built in code (nothing downloaded).

        Special tokens ``[PAD]`` 0, ``[UNK]`` 1, ``[BOS]`` 2, ``[EOS]`` 3; every sequence is
        ``[BOS] … [EOS]``, so decoders can read the reward at EOS and encoders at BOS, and
        :func:`~jaxrm.data.tokenize.tokenize_records` appends nothing more. Then ``rate:``, the prompt
        words and the response words; text is split on whitespace.
        """
        from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
        from transformers import PreTrainedTokenizerFast

        tokens = list(SPECIAL_TOKENS) + [PROMPT_HEAD, *PROMPT_WORDS] + self.words
        backend = Tokenizer(models.WordLevel({token: i for i, token in enumerate(tokens)}, unk_token="[UNK]"))
        backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
        backend.decoder = decoders.WordPiece(prefix="##", cleanup=False)
        backend.post_processor = processors.TemplateProcessing(
            single="[BOS] $A [EOS]",
            pair="[BOS] $A [EOS] $B [EOS]",
            special_tokens=[("[BOS]", 2), ("[EOS]", 3)],
        )
        return PreTrainedTokenizerFast(
            tokenizer_object=backend,
            pad_token="[PAD]", unk_token="[UNK]", bos_token="[BOS]", eos_token="[EOS]",
            model_max_length=max(512, 4 * (self.max_words + len(PROMPT_WORDS))),
        )

    def pairs(self, n: int, *, seed: int, ratings: bool = False, prompt: bool = True) -> list[dict]:
        """``n`` pairwise records; chosen/rejected sampled from Bradley–Terry on the true rewards.

        Each record has ``chosen``, ``rejected``, ``true_rewards`` ``[r_chosen, r_rejected]``, a
        ``prompt`` (unless ``prompt=False``) and, with ``ratings=True``, a Llama 2 ``rating``.
        """
        rng = np.random.default_rng(seed)
        records = []
        for _ in range(n):
            first, second = self._distinct_responses(rng, 2)
            reward_first, reward_second = self.true_reward(first), self.true_reward(second)
            if rng.random() < _sigmoid(reward_first - reward_second):
                chosen, rejected, rewards = first, second, [reward_first, reward_second]
            else:
                chosen, rejected, rewards = second, first, [reward_second, reward_first]
            record = {"prompt": self._prompt(rng)} if prompt else {}
            record |= {"chosen": chosen, "rejected": rejected, "true_rewards": rewards}
            if ratings:
                record["rating"] = self.rating(reward_first - reward_second)
            records.append(record)
        return records

    def rankings(self, n: int, k: int, *, seed: int) -> list[dict]:
        """``n`` ranked records of ``k`` responses, ranks sampled from Plackett–Luce on the true rewards."""
        if k < 2:
            raise ValueError(f"a ranking needs k >= 2 responses, got {k}")
        rng = np.random.default_rng(seed)
        records = []
        for _ in range(n):
            responses = self._distinct_responses(rng, k)
            rewards = np.array([self.true_reward(response) for response in responses])
            # Sorting Gumbel-perturbed log-strengths samples a Plackett–Luce order.
            order = np.argsort(-(rewards + rng.gumbel(size=k)))
            ranks = np.empty(k, dtype=int)
            ranks[order] = np.arange(k)
            records.append({
                "prompt": self._prompt(rng), "responses": responses,
                "ranks": ranks.tolist(), "true_rewards": rewards.tolist(),
            })
        return records

    def ties(self, n: int, *, seed: int, log_theta: float = 0.5) -> list[dict]:
        """``n`` tie records with outcomes (1: a, −1: b, 0: tie) sampled from Rao–Kupper."""
        if not (np.isfinite(log_theta) and log_theta >= 0):
            raise ValueError(f"log_theta must be a finite number >= 0 (theta >= 1), got {log_theta}")
        rng = np.random.default_rng(seed)
        records = []
        for _ in range(n):
            a, b = self._distinct_responses(rng, 2)
            reward_a, reward_b = self.true_reward(a), self.true_reward(b)
            p_a = _sigmoid(reward_a - reward_b - log_theta)
            p_b = _sigmoid(reward_b - reward_a - log_theta)
            draw = rng.random()
            outcome = 1 if draw < p_a else -1 if draw < p_a + p_b else 0
            records.append({
                "prompt": self._prompt(rng), "a": a, "b": b, "outcome": outcome,
                "true_rewards": [reward_a, reward_b],
            })
        return records

    def _response(self, rng: np.random.Generator) -> str:
        length = rng.integers(self.min_words, self.max_words + 1)
        return " ".join(self.words[i] for i in rng.integers(0, self.vocab_size, size=length))

    def _distinct_responses(self, rng: np.random.Generator, count: int) -> list[str]:
        # Identical responses carry no preference; a redraw keeps every record informative.
        responses: list[str] = []
        while len(responses) < count:
            response = self._response(rng)
            if response not in responses:
                responses.append(response)
        return responses

    def _prompt(self, rng: np.random.Generator) -> str:
        return " ".join([PROMPT_HEAD, *(PROMPT_WORDS[i] for i in rng.integers(0, len(PROMPT_WORDS), size=2))])

    def _sample_rewards(self, rng: np.random.Generator, count: int) -> np.ndarray:
        lengths = rng.integers(self.min_words, self.max_words + 1, size=count)
        words = rng.integers(0, self.vocab_size, size=(count, self.max_words))
        mask = np.arange(self.max_words) < lengths[:, None]
        return np.sum(np.where(mask, self.utilities[words], 0.0), axis=1)


def write_jsonl(records, path: str | os.PathLike) -> Path:
    """Writes records one JSON object a line (gzip-compressed if ``path`` ends in ``.gz``)."""
    path = Path(path)
    opener = gzip.open if path.name.endswith(".gz") else open
    with opener(path, "wt", encoding="utf-8") as handle:
        for record in records:
            handle.write(json.dumps(record, ensure_ascii=False) + "\n")
    return path


def _sigmoid(x: float) -> float:
    return float(0.5 * (1.0 + np.tanh(0.5 * x)))
