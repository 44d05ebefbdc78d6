"""Ensembles (mean / min / mean − λ·var) and the commands that use several models: eval, margins estimate."""

import json

import numpy as np
import pytest
from flax import nnx

from jaxrm.cli import main
from jaxrm.data.readers import read_records
from jaxrm.data.synthetic import SyntheticTask, write_jsonl
from jaxrm.ensemble import combine_rewards, member_disagreement
from jaxrm.evaluate import preference_metrics
from jaxrm.inference import evaluate_model, model_list, score_members
from jaxrm.margins import example_margins
from jaxrm.models import RewardModel
from jaxrm.train.config import ModelConfig
from jaxrm.train.run_dir import hf_config_for


def test_combine_rewards_against_numpy():
    rng = np.random.default_rng(0)
    members = rng.normal(size=(3, 5, 4)) + np.array([0.0, 5.0, -2.0])[:, None, None]
    members[:, 1, 3] = np.nan  # a short list's empty slot
    centred = members - np.nanmean(members.reshape(3, -1), axis=1)[:, None, None]
    np.testing.assert_allclose(combine_rewards(members, "mean"), centred.mean(0), rtol=1e-5)
    np.testing.assert_allclose(combine_rewards(members, "min"), centred.min(0), rtol=1e-5)
    np.testing.assert_allclose(combine_rewards(members, "uncertainty", penalty=0.5),
                               centred.mean(0) - 0.5 * centred.var(0), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(combine_rewards(members, "min", center=False), members.min(0), rtol=1e-5)
    assert np.isnan(combine_rewards(members, "mean")[1, 3])
    np.testing.assert_allclose(member_disagreement(members[:1]), np.where(np.isnan(members[0]), np.nan, 0.0))
    # centring never changes a gap under the mean
    gaps = combine_rewards(members, "mean")[:, 0] - combine_rewards(members, "mean")[:, 1]
    np.testing.assert_allclose(gaps, (members[:, :, 0] - members[:, :, 1]).mean(0), rtol=1e-5)
    with pytest.raises(ValueError, match="unknown ensemble method"):
        combine_rewards(members, "median")
    with pytest.raises(ValueError, match="penalty"):
        combine_rewards(members, "uncertainty", penalty=-1.0)


def test_model_list():
    assert model_list("a, b,") == ["a", "b"]
    assert model_list(["a"]) == ["a"]
    with pytest.raises(ValueError, match="no model"):
        model_list(" , ")


@pytest.fixture(scope="module")
def two_models_and_data(tmp_path_factory):
    """Two small random reward models (Hugging Face directories) and 24 synthetic rated pairs."""
    root = tmp_path_factory.mktemp("ensemble")
    task = SyntheticTask(vocab_size=16, max_words=6)
    tokenizer = task.tokenizer()
    config = {"model_type": "qwen3", "hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1,
              "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 8, "max_position_embeddings": 32}
    paths = []
    for seed in (0, 1):
        with nnx.use_eager_sharding(False):
            model = RewardModel.from_config(hf_config_for(ModelConfig(config=config), tokenizer), rngs=nnx.Rngs(seed))
        model.save_pretrained(root / f"model{seed}", tokenizer=tokenizer)
        paths.append(str(root / f"model{seed}"))
    records = task.pairs(24, seed=3, ratings=True)
    for i, record in enumerate(records):
        record["subset"] = ("hep-go", "donotanswer")[i % 2]
    data = write_jsonl(records, root / "pairs.jsonl")
    return paths, str(data), root


def test_ensemble_eval_and_plots(two_models_and_data, tmp_path):
    paths, data, _ = two_models_and_data
    members, examples, _, _ = score_members(paths, data, max_length=32)
    assert members.shape == (2, 24, 2)
    metrics = evaluate_model(",".join(paths), data, max_length=32, ensemble="min", plots_dir=tmp_path / "plots")
    expected = preference_metrics(combine_rewards(members, "min"), examples)
    assert metrics["accuracy"] == pytest.approx(expected["accuracy"])
    assert metrics["ece"] == pytest.approx(expected["ece"], abs=1e-6)
    assert metrics["ensemble"]["members"] == 2 and metrics["ensemble"]["method"] == "min"
    own = [np.mean(m[:, 0] > m[:, 1]) for m in members]
    assert metrics["ensemble"]["member_accuracy"] == pytest.approx(own)
    assert set(metrics["accuracy_by_section"]) == {"reasoning", "safety"}
    assert (tmp_path / "plots" / "reliability.png").is_file() and (tmp_path / "plots" / "rewards.png").is_file()


def test_cli_eval_json_writes_nothing_by_default(two_models_and_data, capsys, tmp_path, monkeypatch):
    paths, data, _ = two_models_and_data
    monkeypatch.chdir(tmp_path)
    assert main(["eval", paths[0], "--data", data, "--json", "--max-length", "32"]) == 0
    metrics = json.loads(capsys.readouterr().out)
    for key in ("accuracy", "loss", "mean_margin", "n_pairs", "ece", "share_gap_above_1", "accuracy_by_rating",
                "length_spearman", "accuracy_chosen_longer", "accuracy_by_subset", "spearman_true_reward"):
        assert key in metrics
    assert list(tmp_path.iterdir()) == []


def test_margins_estimate_writes_a_trainable_margin_column(two_models_and_data, tmp_path, capsys):
    paths, data, _ = two_models_and_data
    out = tmp_path / "with-margins.jsonl"
    assert main(["margins", "estimate", "--model", ",".join(paths), "--data", data, "--out", str(out),
                 "--max-length", "32", "--max-margin", "0.02", "--scale", "2"]) == 0
    assert "wrote 24 pairs with margins from 2 model(s)" in capsys.readouterr().err
    members, _, _, _ = score_members(paths, data, max_length=32)
    gaps = members[:, :, 0].astype(np.float64) - members[:, :, 1]
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    originals = [json.loads(line) for line in open(data)]
    assert [{k: v for k, v in line.items() if k not in ("margin", "margin_std")} for line in lines] == originals
    np.testing.assert_allclose([line["margin"] for line in lines], np.clip(2 * gaps.mean(0), 0, 0.02), rtol=1e-5)
    np.testing.assert_allclose([line["margin_std"] for line in lines], gaps.std(0), rtol=1e-4, atol=1e-7)
    records, _ = read_records(out)
    assert records[0].margin_std == pytest.approx(lines[0]["margin_std"])
    assert main(["margins", "estimate", "--model", paths[0], "--data", "synthetic", "--out", str(out)]) == 2
    assert "needs a file" in capsys.readouterr().err


def test_estimated_margins_reach_training_examples(two_models_and_data, tmp_path):
    from jaxrm.data.sources import load_examples
    from jaxrm.train.config import DataConfig

    paths, data, _ = two_models_and_data
    out = tmp_path / "m.jsonl"
    main(["margins", "estimate", "--model", paths[0], "--data", data, "--out", str(out), "--max-length", "32"])
    examples, _ = load_examples(str(out), DataConfig(max_length=32), SyntheticTask(vocab_size=16).tokenizer())
    margins = example_margins(examples, "data")
    assert np.all(margins >= 0) and np.all(margins <= 3.0)
    np.testing.assert_allclose(margins, [json.loads(line)["margin"] for line in out.read_text().splitlines()],
                               rtol=1e-6)
