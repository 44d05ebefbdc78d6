"""Margin sources: label maps, score gaps, validation with file:line, the online confidence margin."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxrm.data.records import DataError, parse_record
from jaxrm.data.synthetic import SyntheticTask
from jaxrm.data.tokenize import tokenize_records
from jaxrm.margins import (
    LLAMA2_RATING_MARGINS,
    confidence_margins,
    example_margins,
    rating_margin_table,
    reference_margins,
)
from jaxrm.train.config import ConfigError, config_from_dict


@pytest.fixture(scope="module")
def tokenizer():
    return SyntheticTask(vocab_size=8).tokenizer()


def examples_of(objs, tokenizer):
    records = [parse_record(obj, f"pairs.jsonl:{line}") for line, obj in enumerate(objs, start=1)]
    return tokenize_records(records, tokenizer, max_length=32)[0]


def test_llama2_maps_match_table_27():
    np.testing.assert_allclose(rating_margin_table("small"), [0, 1 / 3, 2 / 3, 1], rtol=1e-6)
    np.testing.assert_allclose(rating_margin_table("large"), [0, 1, 2, 3])
    np.testing.assert_allclose(rating_margin_table([0, 0.5, 1, 4]), [0, 0.5, 1, 4])
    assert set(LLAMA2_RATING_MARGINS) == {"small", "large"}
    for bad in ([0, 1, 2], [0, -1, 2, 3], [0, float("nan"), 1, 2]):
        with pytest.raises(ValueError, match="4 finite margins"):
            rating_margin_table(bad)


def test_rating_margins_and_missing_rating_names_the_record(tokenizer):
    objs = [{"chosen": "w01", "rejected": "w02", "rating": rating}
            for rating in ("significantly better", "unsure", "slightly better", 2)]
    examples = examples_of(objs, tokenizer)
    np.testing.assert_allclose(example_margins(examples, "rating", rating_margins="large", scale=0.5),
                               [1.5, 0.0, 0.5, 1.0])
    examples = examples_of(objs + [{"chosen": "w01", "rejected": "w03"}], tokenizer)
    with pytest.raises(DataError, match=r"^pairs.jsonl:5: loss.margin=rating .* no 'rating'"):
        example_margins(examples, "rating")


def test_score_gap_margins(tokenizer):
    objs = [{"chosen": "w01", "rejected": "w02", "score_chosen": 9, "score_rejected": 6.5},
            {"responses": ["w03", "w04"], "scores": [1.0, 4.0]}]
    examples = examples_of(objs, tokenizer)
    # the ranked pair prefers its second response: the gap is best minus worst
    np.testing.assert_allclose(example_margins(examples[:1], "score_gap", scale=2.0), [5.0])
    np.testing.assert_allclose(example_margins(examples[1:], "score_gap"), [3.0])


def test_score_gap_validation_names_file_and_line(tokenizer):
    swapped = examples_of([{"chosen": "w01", "rejected": "w02", "score_chosen": 9, "score_rejected": 6},
                           {"chosen": "w01", "rejected": "w02", "score_chosen": 1, "score_rejected": 6}], tokenizer)
    with pytest.raises(DataError, match=r"^pairs.jsonl:2: loss.margin=score_gap gives margin -5.0"):
        example_margins(swapped, "score_gap")
    with pytest.raises(DataError, match=r"^pairs.jsonl:1: .*no per-response scores"):
        example_margins(examples_of([{"chosen": "w01", "rejected": "w02"}], tokenizer), "score_gap")
    with pytest.raises(DataError, match=r"pairs.jsonl:1: field 'score_chosen' needs 'score_rejected'"):
        parse_record({"chosen": "a", "rejected": "b", "score_chosen": 1}, "pairs.jsonl:1")
    with pytest.raises(DataError, match=r"must be a finite number"):
        parse_record({"chosen": "a", "rejected": "b", "score_chosen": 1, "score_rejected": float("nan")}, "p:1")


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -0.5])
def test_non_finite_or_negative_data_margins_fail(tokenizer, bad):
    examples = examples_of([{"chosen": "w01", "rejected": "w02", "margin": 1.0}] * 3, tokenizer)
    examples[1] = dataclasses.replace(examples[1], margin=bad)
    with pytest.raises(DataError, match=r"^pairs.jsonl:2: loss.margin=data gives margin"):
        example_margins(examples, "data")
    with pytest.raises(DataError, match="'margin' must be a finite number >= 0"):
        parse_record({"chosen": "a", "rejected": "b", "margin": bad}, "pairs.jsonl:7")


def test_confidence_and_none_margins_are_zero_on_the_host(tokenizer):
    examples = examples_of([{"chosen": "w01", "rejected": "w02", "margin": 2.0}], tokenizer)
    assert example_margins(examples, "confidence").tolist() == [0.0]
    assert example_margins(examples, "none").tolist() == [0.0]


def test_confidence_margin_formula_warmup_and_stop_gradient():
    chosen = jnp.array([3.0, 0.5, -2.0, 1e4, 0.0])
    rejected = jnp.array([1.0, 0.0, 1.0, -1e4, 0.0])
    gap = np.asarray(chosen - rejected, np.float64)
    expected = 2.0 * np.maximum(0.0, 2.0 / (1.0 + np.exp(-gap)) - 1.0)
    full = jax.jit(lambda c, r, t: confidence_margins(c, r, t, scale=2.0, warmup_steps=10))
    np.testing.assert_allclose(full(chosen, rejected, jnp.array(10)), expected, rtol=1e-6)
    np.testing.assert_allclose(full(chosen, rejected, jnp.array(25)), expected, rtol=1e-6)
    np.testing.assert_allclose(full(chosen, rejected, jnp.array(4)), 0.4 * expected, rtol=1e-6)
    assert float(jnp.max(full(chosen, rejected, jnp.array(0)))) == 0.0
    np.testing.assert_allclose(confidence_margins(chosen, rejected, jnp.array(0)), expected / 2, rtol=1e-6)
    grad = jax.grad(lambda c: jnp.sum(confidence_margins(c, rejected, jnp.array(10))))(chosen)
    assert np.all(np.asarray(grad) == 0.0)


def test_reference_margins_mean_clip_and_std():
    gaps = np.array([[1.0, -2.0, 5.0, 0.5], [3.0, 0.0, 5.0, 0.5]])
    margins, spread = reference_margins(gaps, max_margin=3.0)
    np.testing.assert_allclose(margins, [2.0, 0.0, 3.0, 0.5])
    np.testing.assert_allclose(spread, [1.0, 1.0, 0.0, 0.0])
    margins, _ = reference_margins(gaps, scale=2.0, max_margin=None)
    np.testing.assert_allclose(margins, [4.0, 0.0, 10.0, 1.0])
    with pytest.raises(ValueError, match="non-finite"):
        reference_margins(np.array([[np.nan]]))


def test_config_accepts_new_sources_and_rejects_misuse():
    base = {"model": {"path": "x"}}
    config = config_from_dict(base, ["loss.margin=confidence", "loss.confidence_warmup_steps=50",
                                     "loss.margin_scale=3"])
    assert (config.loss.margin, config.loss.confidence_warmup_steps, config.loss.margin_scale) == ("confidence", 50, 3.0)
    assert config_from_dict(base, ["loss.margin=score_gap"]).loss.margin == "score_gap"
    with pytest.raises(ConfigError, match="loss.margin must be one of"):
        config_from_dict(base, ["loss.margin=ratings"])
    with pytest.raises(ConfigError, match="applies to the pairwise losses"):
        config_from_dict(base, ["loss.margin=rating", "loss.name=plackett_luce"])
    with pytest.raises(ConfigError, match="confidence_warmup_steps must be >= 0"):
        config_from_dict(base, ["loss.confidence_warmup_steps=-1"])
    with pytest.raises(ConfigError, match="margin_scale"):
        config_from_dict(base, ["loss.margin_scale=-1"])
