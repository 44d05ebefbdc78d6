"""Record parsing and validation (jaxrm.data.records) and the readers (jaxrm.data.readers)."""

import gzip
import json
import math
import os
from pathlib import Path

import pytest

from jaxrm.data.readers import MAX_WARNINGS, read_records
from jaxrm.data.records import (
    RATING_LEVELS,
    DataError,
    DataWarning,
    Message,
    PairRecord,
    RankedRecord,
    TieRecord,
    parse_record,
)

HH_HARMLESS = Path(__file__).parents[2] / "shared/data/hh-harmless.jsonl.gz"
SOURCE = "data.jsonl:7"


def hh_rows():
    if not HH_HARMLESS.exists():
        pytest.skip(f"the hh-rlhf test data is not at {HH_HARMLESS}")
    with gzip.open(HH_HARMLESS, "rt", encoding="utf-8") as handle:
        return [json.loads(line) for line in handle]


def write_lines(path: Path, lines) -> Path:
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


# --- the three kinds ---------------------------------------------------------------------------------


def test_pairwise_record_with_every_optional_field():
    record = parse_record(
        {"prompt": "Q?", "chosen": "good", "rejected": "bad", "margin": 2, "rating": "better",
         "id": 12, "subset": "helpful", "true_rewards": [1.5, -0.5]},
        SOURCE,
    )
    assert record == PairRecord(
        prompt="Q?", chosen="good", rejected="bad", margin=2.0, rating="better", source=SOURCE,
        subset="helpful", true_rewards=(1.5, -0.5), id=12,
    )
    assert isinstance(record.margin, float)


def test_pairwise_record_minimal_and_null_fields_are_absent():
    record = parse_record({"chosen": "x", "rejected": "y", "margin": None, "rating": None, "prompt": None}, SOURCE)
    assert (record.prompt, record.margin, record.rating, record.subset, record.true_rewards) == (None,) * 5


def test_ranked_record_with_ranks_and_ties():
    record = parse_record({"prompt": "p", "responses": ["a", "b", "c"], "ranks": [0, 0, 1]}, SOURCE)
    assert isinstance(record, RankedRecord)
    assert record.responses == ("a", "b", "c") and record.ranks == (0, 0, 1) and record.scores is None


@pytest.mark.parametrize(
    ("scores", "ranks"),
    [([0.1, 0.9, 0.5], (2, 0, 1)), ([3, 3, 1, 5], (1, 1, 2, 0)), ([-1.0, -1.0], (0, 0))],
)
def test_scores_become_dense_ranks_higher_is_better(scores, ranks):
    record = parse_record({"prompt": "p", "responses": [f"r{i}" for i in range(len(scores))], "scores": scores}, SOURCE)
    assert record.ranks == ranks
    assert record.scores == tuple(float(s) for s in scores)


@pytest.mark.parametrize(("outcome", "expected"), [(1, 1), (0, 0), (-1, -1), ("a", 1), ("B", -1), ("tie", 0), (" Tie ", 0)])
def test_tie_record_outcomes(outcome, expected):
    record = parse_record({"prompt": "p", "a": "x", "b": "y", "outcome": outcome}, SOURCE)
    assert isinstance(record, TieRecord) and record.outcome == expected
    assert record.responses == ("x", "y")


@pytest.mark.parametrize(
    ("rating", "expected"),
    [
        ("significantly better", "significantly better"),
        ("Significantly_Better", "significantly better"),
        ("  slightly   better ", "slightly better"),
        ("BETTER", "better"),
        ("negligibly-better", "negligibly better"),
        ("unsure", "negligibly better"),
        ("Unsure", "negligibly better"),
        (3, "significantly better"),
        (2, "better"),
        (1, "slightly better"),
        (0, "negligibly better"),
    ],
)
def test_rating_normalisation(rating, expected):
    record = parse_record({"chosen": "x", "rejected": "y", "rating": rating}, SOURCE)
    assert record.rating == expected
    assert RATING_LEVELS.index(record.rating) == RATING_LEVELS.index(expected)


def test_rating_levels_are_weakest_first():
    assert RATING_LEVELS == ("negligibly better", "slightly better", "better", "significantly better")


def test_message_lists_with_an_explicit_prompt():
    record = parse_record(
        {
            "prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}],
            "chosen": [{"role": "assistant", "content": "Hello!"}],
            "rejected": "Go away.",
        },
        SOURCE,
    )
    assert record.prompt == (Message("system", "Be brief."), Message("user", "Hi"))
    assert record.chosen == (Message("assistant", "Hello!"),)
    assert record.rejected == "Go away."


def test_identical_chosen_and_rejected_parse():
    record = parse_record({"prompt": "p", "chosen": "same", "rejected": "same"}, SOURCE)
    assert record.chosen == record.rejected == "same"


# --- the implicit (hh-rlhf) prompt ------------------------------------------------------------------------


def test_implicit_prompt_split_on_every_hh_harmless_line():
    rows = hh_rows()
    for line, row in enumerate(rows, start=1):
        record = parse_record(row, f"hh:{line}")
        assert record.prompt.endswith("\n\nAssistant:"), line
        assert record.prompt + record.chosen == row["chosen"], line
        assert record.prompt + record.rejected == row["rejected"], line
        # The split is at the last assistant turn the two share: no shared marker is left in the responses.
        shared = os.path.commonprefix([record.chosen, record.rejected])
        assert "\n\nAssistant:" not in shared, line


def test_implicit_prompt_split_of_strings_uses_the_last_shared_marker():
    prompt = "\n\nHuman: hi\n\nAssistant: hello\n\nHuman: and?\n\nAssistant:"
    record = parse_record({"chosen": prompt + " Sure.", "rejected": prompt + " Sure, later."}, SOURCE)
    assert record.prompt == prompt
    assert (record.chosen, record.rejected) == (" Sure.", " Sure, later.")


def test_no_shared_marker_leaves_the_prompt_empty():
    record = parse_record({"chosen": "The answer is 4.", "rejected": "The answer is 5."}, SOURCE)
    assert record.prompt is None and record.chosen == "The answer is 4."


def test_implicit_prompt_split_of_message_lists():
    user = {"role": "user", "content": "What is 2+2?"}
    record = parse_record(
        {"chosen": [user, {"role": "assistant", "content": "4"}],
         "rejected": [user, {"role": "assistant", "content": "5"}]},
        SOURCE,
    )
    assert record.prompt == (Message("user", "What is 2+2?"),)
    assert record.chosen == (Message("assistant", "4"),)
    assert record.rejected == (Message("assistant", "5"),)


def test_identical_message_lists_keep_their_last_message_as_the_response():
    conversation = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]
    record = parse_record({"chosen": conversation, "rejected": conversation}, SOURCE)
    assert record.prompt == (Message("user", "q"),)
    assert record.chosen == record.rejected == (Message("assistant", "a"),)


# --- validation -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("obj", "expected"),
    [
        ([1, 2], "must be a JSON object"),
        ("chosen", "must be a JSON object"),
        ({"foo": 1}, "not a preference record"),
        ({"chosen": "x"}, "looks like a pairwise record (it has 'chosen') but is missing 'rejected'"),
        ({"rejected": "x"}, "pairwise record (it has 'rejected') but is missing 'chosen'"),
        ({"prompt": "p", "responses": ["a", "b"]}, "looks like a ranked record (it has 'responses') but is missing 'ranks' or 'scores'"),
        ({"prompt": "p", "ranks": [0, 1]}, "looks like a ranked record (it has 'ranks') but is missing 'responses'"),
        ({"prompt": "p", "a": "x", "b": "y"}, "looks like a tie record (it has 'a', 'b') but is missing 'outcome'"),
        ({"chosen": "x", "rejected": "y", "a": "z"}, "mixes fields of different kinds"),
        ({"chosen": "x", "rejectd": "y"}, "unknown field 'rejectd' in a pairwise record (did you mean 'rejected'?)"),
        ({"chosen": "x", "rejected": "y", "margn": 1}, "unknown field 'margn' in a pairwise record (did you mean 'margin'?)"),
        ({"chosen": "x", "rejected": "y", "zzz": 1}, "unknown field 'zzz' in a pairwise record (valid fields: prompt, chosen"),
        ({"prompt": "p", "responses": ["a", "b"], "ranks": [0, 1], "margin": 1}, "unknown field 'margin' in a ranked record"),
        ({"chosen": 5, "rejected": "y"}, "field 'chosen' must be a string or a list of chat messages"),
        ({"prompt": 3, "chosen": "x", "rejected": "y"}, "field 'prompt' must be a string or a list of chat messages"),
        ({"chosen": "x", "rejected": ""}, "field 'rejected' is empty"),
        ({"chosen": " \n\t", "rejected": "y"}, "field 'chosen' is empty"),
        ({"chosen": [], "rejected": "y"}, "field 'chosen' is an empty message list"),
        ({"chosen": [{"role": "assistant", "content": "  "}], "rejected": "y"}, "field 'chosen' has only empty messages"),
        ({"chosen": ["hi"], "rejected": "y"}, "chosen[0] must be a message"),
        ({"chosen": [{"content": "hi"}], "rejected": "y"}, "chosen[0] has no 'role'"),
        ({"chosen": [{"role": "assistant"}], "rejected": "y"}, "chosen[0] has no 'content'"),
        ({"chosen": [{"role": "bot", "content": "hi"}], "rejected": "y"}, "chosen[0] has role 'bot'; use one of system, user, assistant, tool"),
        ({"chosen": [{"role": "assistant", "content": ["hi"]}], "rejected": "y"}, "chosen[0].content must be a string"),
        ({"chosen": [{"role": "assistant", "content": "hi", "nam": "x"}], "rejected": "y"}, "chosen[0]: unknown field 'nam' in a message"),
        ({"chosen": "x", "rejected": "y", "margin": -0.5}, "field 'margin' must be a finite number >= 0, got -0.5"),
        ({"chosen": "x", "rejected": "y", "margin": math.nan}, "field 'margin' must be a finite number >= 0, got nan"),
        ({"chosen": "x", "rejected": "y", "margin": math.inf}, "field 'margin' must be a finite number >= 0, got inf"),
        ({"chosen": "x", "rejected": "y", "margin": "1"}, "field 'margin' must be a finite number >= 0, got '1'"),
        ({"chosen": "x", "rejected": "y", "margin": True}, "field 'margin' must be a finite number >= 0, got True"),
        ({"chosen": "x", "rejected": "y", "rating": "much better"}, "field 'rating': 'much better' is not a Llama 2 rating"),
        ({"chosen": "x", "rejected": "y", "rating": 4}, "field 'rating': 4 is out of range"),
        ({"chosen": "x", "rejected": "y", "rating": -1}, "field 'rating': -1 is out of range"),
        ({"chosen": "x", "rejected": "y", "rating": 1.5}, "field 'rating': 1.5 is not a Llama 2 rating"),
        ({"prompt": "p", "responses": ["a", "b"], "ranks": [0, 2]}, "field 'ranks' [0, 2] skips a rank"),
        ({"prompt": "p", "responses": ["a", "b", "c"], "ranks": [1, 1, 2]}, "field 'ranks' [1, 1, 2] skips a rank"),
        ({"prompt": "p", "responses": ["a", "b", "c"], "ranks": [0, 1]}, "field 'ranks' must be a list of 3 integers"),
        ({"prompt": "p", "responses": ["a", "b"], "ranks": [0, -1]}, "ranks[1] must be an integer >= 0"),
        ({"prompt": "p", "responses": ["a", "b"], "ranks": [0, 1.0]}, "ranks[1] must be an integer >= 0"),
        ({"prompt": "p", "responses": ["a", "b"], "scores": [0.5, math.nan]}, "scores[1] must be a finite number"),
        ({"prompt": "p", "responses": ["a"], "ranks": [0]}, "field 'responses' has 1 response(s); a ranked record needs at least 2"),
        ({"prompt": "p", "responses": "ab", "ranks": [0, 1]}, "field 'responses' must be a list of responses"),
        ({"prompt": "p", "responses": ["a", ""], "ranks": [0, 1]}, "field 'responses[1]' is empty"),
        ({"prompt": "p", "a": "x", "b": "y", "outcome": 2}, "field 'outcome' must be 1 or \"a\""),
        ({"prompt": "p", "a": "x", "b": "y", "outcome": "draw"}, "field 'outcome' must be 1 or \"a\""),
        ({"prompt": "p", "a": "x", "b": "y", "outcome": True}, "field 'outcome' must be 1 or \"a\""),
        ({"chosen": "x", "rejected": "y", "true_rewards": [1.0]}, "field 'true_rewards' must be a list of 2 numbers, one per response"),
        ({"chosen": "x", "rejected": "y", "true_rewards": [1.0, math.inf]}, "true_rewards[1] must be a finite number"),
        ({"prompt": "p", "responses": ["a", "b", "c"], "ranks": [0, 1, 2], "true_rewards": [1, 2]}, "field 'true_rewards' must be a list of 3 numbers"),
        ({"chosen": "x", "rejected": "y", "subset": 3}, "field 'subset' must be a string"),
        ({"chosen": "x", "rejected": "y", "id": [1]}, "field 'id' must be a string or an integer"),
    ],
)
def test_validation_errors_name_the_source_and_the_problem(obj, expected):
    with pytest.raises(DataError) as error:
        parse_record(obj, SOURCE)
    message = str(error.value)
    assert message.startswith(SOURCE + ": "), message
    assert expected in message, message


def test_unknown_field_policies():
    obj = {"chosen": "x", "rejected": "y", "score_gap": 3}
    with pytest.raises(DataError, match="unknown_fields='warn' or 'ignore'"):
        parse_record(obj, SOURCE)
    collected = []
    record = parse_record(obj, SOURCE, unknown_fields="warn", warnings=collected)
    assert record.chosen == "x"
    assert collected == [f"{SOURCE}: unknown field 'score_gap' in a pairwise record (valid fields: "
                         "prompt, chosen, rejected, margin, margin_std, rating, score_chosen, score_rejected, id, "
                         "subset, true_rewards); ignored"]
    with pytest.warns(DataWarning, match="score_gap"):
        parse_record(obj, SOURCE, unknown_fields="warn")
    collected = []
    parse_record(obj, SOURCE, unknown_fields="ignore", warnings=collected)
    assert collected == []
    with pytest.raises(ValueError, match="unknown_fields must be"):
        parse_record(obj, SOURCE, unknown_fields="skip")


# --- readers ---------------------------------------------------------------------------------------------

PAIRS = [
    {"prompt": "Q1", "chosen": "a1", "rejected": "b1", "margin": 1.0},
    {"prompt": "Q2", "chosen": "a2", "rejected": "b2", "margin": 0.5},
    {"prompt": "Q3", "chosen": "a3", "rejected": "b3", "margin": 0.0},
]


def test_read_jsonl_skips_blank_lines_and_names_lines(tmp_path):
    path = write_lines(tmp_path / "pairs.jsonl", [json.dumps(PAIRS[0]), "", "  ", json.dumps(PAIRS[1])])
    records, report = read_records(path)
    assert [r.chosen for r in records] == ["a1", "a2"]
    assert [r.source for r in records] == [f"{path}:1", f"{path}:4"]
    assert (report.n_records, report.n_identical_pairs, report.warnings, report.kinds) == (2, 0, [], {"pairwise": 2})


def test_read_jsonl_gz_and_limit(tmp_path):
    path = tmp_path / "pairs.jsonl.gz"
    with gzip.open(path, "wt", encoding="utf-8") as handle:
        for row in PAIRS:
            handle.write(json.dumps(row) + "\n")
    records, report = read_records(str(path))
    assert [r.margin for r in records] == [1.0, 0.5, 0.0]
    records, report = read_records(path, limit=2)
    assert report.n_records == 2 and records[-1].source == f"{path}:2"


def test_read_json_array(tmp_path):
    path = tmp_path / "pairs.json"
    path.write_text(json.dumps(PAIRS, indent=2))
    records, _ = read_records(path)
    assert [r.source for r in records] == [f"{path}[0]", f"{path}[1]", f"{path}[2]"]


def test_read_parquet(tmp_path):
    pyarrow = pytest.importorskip("pyarrow")
    import pyarrow.parquet

    rows = PAIRS + [{"prompt": [{"role": "user", "content": "hi"}], "chosen": "yo", "rejected": "no", "margin": None}]
    rows[:3] = [dict(row, prompt=[{"role": "user", "content": row["prompt"]}]) for row in rows[:3]]
    path = tmp_path / "pairs.parquet"
    pyarrow.parquet.write_table(pyarrow.Table.from_pylist(rows), path)
    records, report = read_records(path)
    assert report.n_records == 4
    assert records[0].prompt == (Message("user", "Q1"),)
    assert records[3].margin is None and records[3].source == f"{path}[3]"


def test_read_datasets_directories(tmp_path):
    datasets = pytest.importorskip("datasets")
    columns = {key: [row[key] for row in PAIRS] for key in PAIRS[0]}
    dataset = datasets.Dataset.from_dict(columns)
    dataset.save_to_disk(str(tmp_path / "single"))
    records, report = read_records(tmp_path / "single")
    assert [r.margin for r in records] == [1.0, 0.5, 0.0]
    assert records[1].source == f"{tmp_path / 'single'}[1]"

    datasets.DatasetDict({"train": dataset, "test": dataset.select([2])}).save_to_disk(str(tmp_path / "splits"))
    records, _ = read_records(tmp_path / "splits", split="test")
    assert [r.chosen for r in records] == ["a3"]
    with pytest.raises(DataError, match=r"has no split 'validation'; its splits are train, test"):
        read_records(tmp_path / "splits", split="validation")


def test_read_a_directory_of_data_files(tmp_path, monkeypatch):
    datasets = pytest.importorskip("datasets")
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "cache"))
    (tmp_path / "files").mkdir()
    write_lines(tmp_path / "files" / "train.jsonl", [json.dumps(row) for row in PAIRS])
    write_lines(tmp_path / "files" / "test.jsonl", [json.dumps(PAIRS[0])])
    records, _ = read_records(tmp_path / "files")
    assert [r.chosen for r in records] == ["a1", "a2", "a3"]
    records, _ = read_records(tmp_path / "files", split="test")
    assert [r.chosen for r in records] == ["a1"]


def test_malformed_json_line_names_file_and_line(tmp_path):
    path = write_lines(tmp_path / "bad.jsonl", [json.dumps(PAIRS[0]), json.dumps(PAIRS[1]), '{"chosen": "x", "rejected": '])
    with pytest.raises(DataError) as error:
        read_records(path)
    assert str(error.value).startswith(f"{path}:3: not valid JSON (")


def test_bad_record_in_a_file_names_file_and_line(tmp_path):
    path = write_lines(tmp_path / "bad.jsonl", [json.dumps(PAIRS[0]), json.dumps({"chosen": "x", "rejected": "y", "margin": -1})])
    with pytest.raises(DataError, match=rf"^{path}:2: field 'margin' must be a finite number >= 0"):
        read_records(path)


def test_missing_empty_and_unsupported_sources(tmp_path):
    with pytest.raises(DataError, match=r"nope\.jsonl: no such file or directory"):
        read_records(tmp_path / "nope.jsonl")
    with pytest.raises(DataError, match=r"empty\.jsonl: contains no records"):
        read_records(write_lines(tmp_path / "empty.jsonl", ["", ""]))
    with pytest.raises(DataError, match=r"data\.csv: unsupported file type"):
        read_records(write_lines(tmp_path / "data.csv", ["chosen,rejected"]))
    with pytest.raises(DataError, match=r"bad\.parquet: not a readable Parquet file"):
        read_records(write_lines(tmp_path / "bad.parquet", ["not parquet"]))


def test_hub_name_without_a_local_copy_fails_offline():
    pytest.importorskip("datasets")
    name = "jaxrm-test-org/surely-not-a-cached-dataset"
    with pytest.raises(DataError) as error:
        read_records(name)
    message = str(error.value)
    assert message.startswith(f"{name}: not a local file or directory")
    assert "available offline" in message and "save_to_disk" in message and "pass the local path" in message


def test_reader_counts_identical_pairs_and_caps_warnings(tmp_path):
    lines = [json.dumps({"prompt": "p", "chosen": f"same {i}", "rejected": f"same {i}"}) for i in range(MAX_WARNINGS + 5)]
    path = write_lines(tmp_path / "same.jsonl", [json.dumps(PAIRS[0])] + lines)
    records, report = read_records(path)
    assert report.n_records == MAX_WARNINGS + 6
    assert report.n_identical_pairs == report.n_warnings == MAX_WARNINGS + 5
    assert len(report.warnings) == MAX_WARNINGS + 1
    assert report.warnings[0].startswith(f"{path}:2: chosen and rejected are identical")
    assert report.warnings[-1] == "... and 5 more warning(s) like these"


def test_reader_collects_unknown_field_warnings(tmp_path):
    path = write_lines(tmp_path / "extra.jsonl", [json.dumps(dict(PAIRS[0], annotator="ann-3"))])
    with pytest.raises(DataError, match=rf"^{path}:1: unknown field 'annotator'"):
        read_records(path)
    records, report = read_records(path, unknown_fields="warn")
    assert report.n_warnings == 1 and report.warnings[0].startswith(f"{path}:1: unknown field 'annotator'")
    records, report = read_records(path, unknown_fields="ignore")
    assert report.n_warnings == 0 and records[0].chosen == "a1"


def test_read_the_real_hh_harmless_file():
    rows = hh_rows()
    records, report = read_records(HH_HARMLESS)
    assert report.n_records == len(records) == len(rows) == 2085
    assert report.kinds == {"pairwise": 2085}
    assert all(record.prompt.endswith("\n\nAssistant:") for record in records)
    assert records[9].source == f"{HH_HARMLESS}:10"
    # Independent counts on the raw text: identical sides, and sides whose last turn is blank.
    identical = sum(row["chosen"] == row["rejected"] for row in rows)
    blank = sum(
        any(not side[side.rfind("\n\nAssistant:") + len("\n\nAssistant:"):].strip() for side in (row["chosen"], row["rejected"]))
        for row in rows
    )
    assert report.n_identical_pairs == identical
    assert report.n_empty_responses == blank == 4
    assert report.n_warnings == identical + blank
