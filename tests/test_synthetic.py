"""The ground-truth synthetic source (jaxrm.data.synthetic) and the rank statistics (jaxrm.data.stats)."""

import math

import numpy as np
import pytest

from jaxrm.data.readers import read_records
from jaxrm.data.records import RATING_LEVELS, PairRecord, RankedRecord, TieRecord, parse_record
from jaxrm.data.stats import rankdata, spearman
from jaxrm.data.synthetic import SyntheticTask, write_jsonl
from jaxrm.data.tokenize import tokenize_records

N = 4000


def sigmoid(x):
    return 1.0 / (1.0 + np.exp(-np.asarray(x, dtype=np.float64)))


@pytest.fixture(scope="module")
def task():
    return SyntheticTask(seed=3)


@pytest.fixture(scope="module")
def rated_pairs(task):
    return task.pairs(N, seed=11, ratings=True)


def test_task_vocabulary_and_utilities_are_seeded():
    task = SyntheticTask(vocab_size=12, seed=5)
    assert task.words[:3] == ["w00", "w01", "w02"] and len(task.words) == 12
    np.testing.assert_array_equal(task.utilities, SyntheticTask(vocab_size=12, seed=5).utilities)
    assert not np.allclose(task.utilities, SyntheticTask(vocab_size=12, seed=6).utilities)
    np.testing.assert_allclose(SyntheticTask(vocab_size=12, seed=5, reward_scale=2.0).utilities, 2 * task.utilities)
    assert SyntheticTask(vocab_size=150).words[-1] == "w149"


def test_true_reward_is_the_sum_of_word_utilities(task):
    u = task.utilities
    assert task.true_reward("w00 w01 w01") == pytest.approx(u[0] + 2 * u[1])
    assert task.true_reward("rate: p1 p2 w05") == pytest.approx(u[5])
    assert task.true_reward("") == 0.0


def test_sampling_is_deterministic_per_seed(task):
    assert task.pairs(50, seed=1, ratings=True) == task.pairs(50, seed=1, ratings=True)
    assert task.pairs(50, seed=1) != task.pairs(50, seed=2)
    assert task.rankings(20, 4, seed=1) == task.rankings(20, 4, seed=1)
    assert task.ties(20, seed=1) == task.ties(20, seed=1)
    assert SyntheticTask(seed=3).rating_thresholds == task.rating_thresholds


def test_pair_records_are_consistent(task, rated_pairs):
    for record in rated_pairs[:200]:
        assert set(record) == {"prompt", "chosen", "rejected", "true_rewards", "rating"}
        assert record["chosen"] != record["rejected"]
        assert record["true_rewards"] == [task.true_reward(record["chosen"]), task.true_reward(record["rejected"])]
        assert task.min_words <= len(record["chosen"].split()) <= task.max_words
        assert record["prompt"].startswith("rate: ")
    assert "prompt" not in task.pairs(3, seed=0, prompt=False)[0]


def test_bradley_terry_preference_frequency(rated_pairs):
    gaps = np.array([r["true_rewards"][0] - r["true_rewards"][1] for r in rated_pairs])
    p_higher = sigmoid(np.abs(gaps))
    expected = p_higher.mean()
    observed = np.mean(gaps > 0)
    standard_error = np.sqrt(np.sum(p_higher * (1 - p_higher))) / N
    assert abs(observed - expected) < 4 * standard_error, (observed, expected, standard_error)
    # Neither always-the-better nor a coin flip: the labels are noisy but informative.
    assert 0.6 < observed < 0.95


def test_ratings_fill_all_four_levels_and_follow_the_gap(task, rated_pairs):
    levels = [RATING_LEVELS.index(r["rating"]) for r in rated_pairs]
    counts = np.bincount(levels, minlength=4)
    assert np.all(counts > N // 8), counts
    gaps = np.array([abs(r["true_rewards"][0] - r["true_rewards"][1]) for r in rated_pairs])
    mean_gaps = [gaps[np.array(levels) == level].mean() for level in range(4)]
    assert mean_gaps == sorted(mean_gaps)
    low, mid, high = task.rating_thresholds
    assert task.rating(low / 2) == "negligibly better" and task.rating(-(high + 1)) == "significantly better"


def test_plackett_luce_rankings(task):
    records = task.rankings(2000, 4, seed=5)
    first_is_best = []
    p_best = []
    for record in records:
        rewards = np.array(record["true_rewards"])
        assert sorted(record["ranks"]) == [0, 1, 2, 3]
        assert len(set(record["responses"])) == 4
        np.testing.assert_allclose(rewards, [task.true_reward(text) for text in record["responses"]])
        top = int(np.argmax(rewards))
        first_is_best.append(record["ranks"][top] == 0)
        p_best.append(np.exp(rewards[top]) / np.exp(rewards).sum())
    p_best = np.array(p_best)
    standard_error = np.sqrt(np.sum(p_best * (1 - p_best))) / len(records)
    assert abs(np.mean(first_is_best) - p_best.mean()) < 4 * standard_error


def test_rao_kupper_ties(task):
    log_theta = 0.5
    records = task.ties(N, seed=9, log_theta=log_theta)
    gaps = np.array([r["true_rewards"][0] - r["true_rewards"][1] for r in records])
    outcomes = np.array([r["outcome"] for r in records])
    p_tie = 1 - sigmoid(gaps - log_theta) - sigmoid(-gaps - log_theta)
    standard_error = np.sqrt(np.sum(p_tie * (1 - p_tie))) / N
    assert abs(np.mean(outcomes == 0) - p_tie.mean()) < 4 * standard_error
    p_a = sigmoid(gaps - log_theta)
    assert abs(np.mean(outcomes == 1) - p_a.mean()) < 4 * np.sqrt(np.sum(p_a * (1 - p_a))) / N
    with pytest.raises(ValueError, match="log_theta must be a finite number >= 0"):
        task.ties(1, seed=0, log_theta=-1.0)


def test_records_parse_and_read_without_warnings(task, tmp_path):
    batches = {
        "pairs.jsonl": task.pairs(100, seed=1, ratings=True),
        "plain.jsonl": task.pairs(100, seed=2, prompt=False),
        "rankings.jsonl.gz": task.rankings(100, 3, seed=3),
        "ties.jsonl": task.ties(100, seed=4),
    }
    kinds = {"pairs.jsonl": PairRecord, "plain.jsonl": PairRecord, "rankings.jsonl.gz": RankedRecord, "ties.jsonl": TieRecord}
    for name, records in batches.items():
        collected = []
        parsed = [parse_record(obj, f"{name}:{i}", warnings=collected) for i, obj in enumerate(records)]
        assert collected == [] and all(isinstance(record, kinds[name]) for record in parsed)
        read, report = read_records(write_jsonl(records, tmp_path / name))
        assert report.n_records == 100 and report.n_warnings == 0 and report.n_identical_pairs == 0
        assert [r.true_rewards for r in read] == [r.true_rewards for r in parsed]
    assert all(record.prompt is None for record in read_records(tmp_path / "plain.jsonl")[0])


def test_tokenizer_round_trip(task):
    tokenizer = task.tokenizer()
    assert tokenizer.convert_ids_to_tokens([0, 1, 2, 3]) == ["[PAD]", "[UNK]", "[BOS]", "[EOS]"]
    assert (tokenizer.pad_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id) == (0, 2, 3)
    assert len(tokenizer) == 4 + 1 + 8 + task.vocab_size
    record = task.pairs(1, seed=4)[0]
    text = record["prompt"] + " " + record["chosen"]
    ids = tokenizer(text)["input_ids"]
    assert ids[0] == tokenizer.bos_token_id and ids[-1] == tokenizer.eos_token_id
    assert tokenizer.unk_token_id not in ids and len(ids) == len(text.split()) + 2
    assert tokenizer.decode(ids, skip_special_tokens=True) == text
    assert tokenizer.convert_ids_to_tokens(ids[1:-1]) == text.split()


def test_tokenized_synthetic_pairs_carry_true_rewards(task):
    tokenizer = task.tokenizer()
    records = [parse_record(obj, f"s[{i}]") for i, obj in enumerate(task.pairs(20, seed=6, ratings=True))]
    examples, report = tokenize_records(records, tokenizer, max_length=64)
    assert report.n_truncated == 0 and not report.special_tokens.eos_appended
    for record, example in zip(records, examples):
        chosen = tokenizer.convert_ids_to_tokens(example.sequences[0].tolist())
        assert chosen == ["[BOS]"] + record.prompt.split() + record.chosen.split() + ["[EOS]"]
        np.testing.assert_allclose(example.true_rewards, record.true_rewards, rtol=1e-6)
        assert example.rating == RATING_LEVELS.index(record.rating)


# --- spearman -----------------------------------------------------------------------------------------------


def test_rankdata_averages_ties():
    assert rankdata([10, 30, 20, 20]).tolist() == [1.0, 4.0, 2.5, 2.5]
    assert rankdata([5, 5, 5]).tolist() == [2.0, 2.0, 2.0]
    assert rankdata([3.0, -1.0, 2.0]).tolist() == [3.0, 1.0, 2.0]


@pytest.mark.parametrize(
    ("x", "y", "expected"),
    [
        ([1, 2, 3, 4, 5], [2, 4, 6, 8, 100], 1.0),  # monotone, not linear
        ([1, 2, 3, 4, 5], [5, 4, 3, 2, 1], -1.0),
        # Average ranks [1, 2.5, 2.5, 4] against [1, 2, 3, 4]: 4.5 / sqrt(4.5 * 5) = sqrt(0.9).
        ([1, 2, 2, 3], [1, 2, 3, 4], math.sqrt(0.9)),
        # Ranks [1,2,3,4] vs [2,1,4,3]: 1 - 6 * sum(d^2) / (n (n^2 - 1)) = 1 - 6 * 4 / 60 = 0.6.
        ([1, 2, 3, 4], [20, 10, 40, 30], 0.6),
    ],
)
def test_spearman_hand_cases(x, y, expected):
    assert spearman(x, y) == pytest.approx(expected, abs=1e-12)
    assert spearman(y, x) == pytest.approx(expected, abs=1e-12)


def test_spearman_undefined_and_invalid_inputs():
    assert math.isnan(spearman([1, 1, 1], [1, 2, 3]))
    assert math.isnan(spearman([1], [2]))
    with pytest.raises(ValueError, match="same length"):
        spearman([1, 2], [1, 2, 3])
    with pytest.raises(ValueError, match="finite"):
        spearman([1, float("nan")], [1, 2])


def test_spearman_of_true_rewards_against_a_noisy_copy(task):
    rewards = np.array([task.true_reward(r["chosen"]) for r in task.pairs(500, seed=8)])
    noisy = rewards + np.random.default_rng(0).normal(scale=0.5, size=rewards.shape)
    assert 0.8 < spearman(noisy, rewards) < 1.0
    assert spearman(-rewards, rewards) == pytest.approx(-1.0)
