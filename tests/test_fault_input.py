"""Fault drills, bad input: every dirty record or config fails through ``jaxrm train`` / ``jaxrm eval`` with
exit code 2 and a message that names the file and line (or the config key) and says what to do; what can
be read (identical pairs, over-length text) is kept, warned about and counted in ``summary.json``.

Also the security drills: only safetensors, Orbax and safe YAML are read, and a run writes nothing
outside its run directory.
"""

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from jaxrm.cli import main

REPO = Path(__file__).resolve().parents[1]
#: The quickstart shrunk to seconds: a tiny model, 256 pairs, no evaluation during training.
TINY = [
    "train.steps=4", "train.batch_size=16", "data.synthetic.n_train=256", "data.synthetic.n_eval=64",
    "train.eval_every=0", "train.log_every=1", "train.progress=false", "model.config.hidden_size=32",
    "model.config.intermediate_size=64", "model.config.head_dim=8",
]
# Variables that would send caches outside HOME: a run must not need them to stay in its directory.
_REDIRECTS = ("XDG_CACHE_HOME", "XDG_CONFIG_HOME", "MPLCONFIGDIR", "HF_HOME", "TRANSFORMERS_CACHE",
              "HF_DATASETS_CACHE", "JAX_COMPILATION_CACHE_DIR", "TMPDIR")


def sandbox_env(sandbox: Path, devices: int = 2) -> dict:
    env = {key: value for key, value in os.environ.items() if key not in _REDIRECTS}
    env.update(HOME=str(sandbox / "home"), TMPDIR=str(sandbox / "tmp"), JAX_PLATFORMS="cpu",
               XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
               PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")])))
    return env


def tree(root: Path) -> set[str]:
    return {str(path.relative_to(root)) for path in root.rglob("*")}


@pytest.fixture(scope="module")
def sandbox(tmp_path_factory):
    """A real ``jaxrm train`` of the tiny quickstart, with HOME and TMPDIR inside the sandbox."""
    root = tmp_path_factory.mktemp("sandbox")
    for name in ("home", "tmp", "work"):
        (root / name).mkdir()
    before = tree(root)
    result = subprocess.run(
        [sys.executable, "-m", "jaxrm.cli", "train", str(REPO / "configs/quickstart.yaml"), *TINY,
         "output_dir=runs/base"],
        cwd=root / "work", env=sandbox_env(root), capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return root, before, tree(root)


@pytest.fixture(scope="module")
def base_run(sandbox):
    return sandbox[0] / "work/runs/base"


@pytest.fixture(scope="module")
def model_dir(base_run, tmp_path_factory):
    """The base run exported as a Hugging Face model directory (safetensors + tokenizer)."""
    out = tmp_path_factory.mktemp("exported") / "model"
    assert main(["export", str(base_run), "--out", str(out), "--checkpoint", "latest"]) == 0
    return out


@pytest.fixture
def file_config(tmp_path, model_dir):
    """A config that trains the exported model on a JSONL file; returns ``write(records) -> argv``."""
    config = tmp_path / "file.yaml"
    config.write_text(
        f"model:\n  path: {model_dir}\n"
        "data:\n  max_length: 32\n"
        "train:\n  batch_size: 8\n  steps: 2\n  eval_every: 0\n  log_every: 1\n  progress: false\n"
        f"output_dir: {tmp_path / 'run'}\n"
    )

    def write(lines: list, *overrides: str, name: str = "pairs.jsonl") -> tuple[list[str], Path]:
        data = tmp_path / name
        data.write_text("".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines))
        return ["train", str(config), f"data.train={data}", f"data.eval={data}", *overrides], data

    return write


GOOD = {"prompt": "w1 w2", "chosen": "w3 w4", "rejected": "w5"}


def run_cli(argv, capsys) -> tuple[int, str]:
    code = main(argv)
    return code, capsys.readouterr().err


# (name, the bad line written as line 2 after a good one, overrides, words the error must contain)
BAD_RECORDS = [
    ("malformed JSON", '{"chosen": "a", "rejected": ', (), ["not valid JSON"]),
    ("missing field", {"prompt": "p", "chosen": "a b"}, (), ["missing 'rejected'"]),
    ("unknown field", {**GOOD, "margn": 1}, (), ["unknown field 'margn'", "did you mean 'margin'",
                                                  "data.unknown_fields"]),
    ("non-string content", {"chosen": 5, "rejected": "b"}, (), ["field 'chosen' must be a string"]),
    ("non-string message content", {"chosen": [{"role": "assistant", "content": 3}], "rejected": "b"}, (),
     ["chosen[0].content must be a string"]),
    ("empty response", {"chosen": "  ", "rejected": "b"}, (), ["field 'chosen' is empty"]),
    ("NaN margin", '{"chosen": "a", "rejected": "b", "margin": NaN}', (), ["'margin' must be a finite number"]),
    ("inf margin", '{"chosen": "a", "rejected": "b", "margin": Infinity}', (), ["'margin' must be a finite number"]),
    ("negative margin", {"chosen": "a", "rejected": "b", "margin": -1}, (), ["'margin' must be a finite number",
                                                                            "swapped"]),
    ("margin beyond float32", {"chosen": "a", "rejected": "b", "margin": 1e39}, (), ["float32"]),
    ("ranks not a ranking", {"responses": ["a", "b", "c"], "ranks": [0, 2, 2]}, ("loss.name=plackett_luce",),
     ["skips a rank"]),
    ("ranks of another length", {"responses": ["a", "b", "c"], "ranks": [0, 1]}, ("loss.name=plackett_luce",),
     ["'ranks' must be a list of 3 integers"]),
    ("over-length text", {"prompt": "w1 " * 40, "chosen": "w2", "rejected": "w3"}, ("data.truncation=error",),
     ["max_length is 32", "truncation"]),
]


@pytest.mark.slow
@pytest.mark.parametrize("name, line, overrides, words", BAD_RECORDS, ids=[case[0] for case in BAD_RECORDS])
def test_bad_record_fails_naming_file_and_line(name, line, overrides, words, file_config, capsys):
    good = GOOD if "ranks" not in name else {"responses": ["a", "b", "c"], "ranks": [0, 1, 2]}
    argv, data = file_config([good, line], *overrides)
    code, err = run_cli(argv, capsys)
    assert code == 2, err
    assert f"{data}:2" in err, err
    for word in words:
        assert word in err, err


@pytest.mark.slow
def test_readable_oddities_are_kept_warned_and_counted(file_config, tmp_path, capsys):
    lines = [GOOD] * 14 + [
        {"prompt": "w1", "chosen": "w7 w8", "rejected": "w7 w8"},
        {"prompt": "w1 " * 40, "chosen": "w2", "rejected": "w3"},
    ]
    argv, data = file_config(lines)
    code, err = run_cli(argv, capsys)
    assert code == 0, err
    assert f"{data}:15: chosen and rejected are identical" in err
    assert f"{data}:16: truncated to max_length=32" in err
    summary = json.loads((tmp_path / "run/summary.json").read_text())
    assert summary["data"]["train"] == {"source": str(data), "records": 16, "truncated": 1, "identical_pairs": 1,
                                        "skipped": 0}


@pytest.mark.slow
def test_bad_eval_data_fails_naming_file_and_line(base_run, tmp_path, capsys):
    data = tmp_path / "eval.jsonl"
    data.write_text(json.dumps(GOOD) + "\n" + '{"chosen": "a", "rejected": "b", "margin": -2}\n')
    code, err = run_cli(["eval", str(base_run), "--data", str(data), "--checkpoint", "latest"], capsys)
    assert code == 2 and f"{data}:2: field 'margin'" in err, err


@pytest.mark.parametrize("override, words", [
    ("train.stepz=5", ["unknown config key 'train.stepz'", "did you mean train.steps"]),
    ("train.steps=many", ["train.steps must be an integer", "'many'"]),
    ("train.on_nonfinite=ignore", ["train.on_nonfinite must be one of stop, skip"]),
    ("train.learning_rate=inf", ["train.learning_rate must be a finite number >= 0", "inf"]),
])
def test_bad_config_fails_naming_the_key(override, words, capsys):
    code, err = run_cli(["train", str(REPO / "configs/quickstart.yaml"), override], capsys)
    assert code == 2, err
    for word in words:
        assert word in err, err


@pytest.mark.slow
def test_tokenizer_without_pad_or_eos_fails_naming_it(model_dir, file_config, tmp_path, capsys):
    broken = tmp_path / "no-pad-model"
    shutil.copytree(model_dir, broken)
    settings = json.loads((broken / "tokenizer_config.json").read_text())
    for key in ("pad_token", "eos_token"):
        settings[key] = None
    (broken / "tokenizer_config.json").write_text(json.dumps(settings))
    (broken / "special_tokens_map.json").unlink(missing_ok=True)
    argv, _ = file_config([GOOD, GOOD], f"model.path={broken}")
    code, err = run_cli(argv, capsys)
    assert code == 2, err
    assert "neither a pad token nor an end-of-sequence token" in err and str(broken) in err, err


@pytest.mark.slow
def test_checkpoint_of_another_model_fails_naming_the_parameter(base_run, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(base_run, run)
    config_before = (run / "config.yaml").read_text()
    code, err = run_cli(["train", str(run / "config.yaml"), f"output_dir={run}", "train.steps=8",
                         "model.config.hidden_size=48"], capsys)
    assert code == 2, err
    assert "params/backbone/embed_tokens/embedding has shape (" in err and ", 32) in the checkpoint" in err, err
    assert "use a new output_dir" in err
    assert (run / "config.yaml").read_text() == config_before, "a failed resume must not rewrite the run's config"


@pytest.mark.slow
def test_command_line_errors_have_no_traceback(base_run, sandbox, tmp_path):
    data = tmp_path / "bad.jsonl"
    data.write_text(json.dumps(GOOD) + "\n{oops\n")
    for argv, words in [
        (["eval", str(base_run), "--data", str(data)], f"{data}:2: not valid JSON"),
        (["train", str(REPO / "configs/quickstart.yaml"), "mesh.dta=2"], "unknown config key 'mesh.dta'"),
    ]:
        result = subprocess.run([sys.executable, "-m", "jaxrm.cli", *argv], env=sandbox_env(sandbox[0]),
                                capture_output=True, text=True, timeout=300)
        assert result.returncode == 2, result.stderr[-3000:]
        assert words in result.stderr and "Traceback" not in result.stderr, result.stderr[-3000:]


# Security.

UNSAFE = {
    "pickle": re.compile(r"\bimport (c?pickle|dill|joblib)\b|\bpickle\.loads?\(|allow_pickle\s*=\s*True"),
    "torch.load": re.compile(r"torch\.load\("),
    "remote code": re.compile(r"trust_remote_code\s*=\s*True"),
    "unsafe YAML": re.compile(r"yaml\.(load|unsafe_load|full_load)\("),
    "eval/exec": re.compile(r"(?<![\w.])(eval|exec)\("),
}


def test_package_never_unpickles_or_runs_remote_code():
    sources = sorted((REPO / "jaxrm").rglob("*.py"))
    assert sources
    found = [f"{path.relative_to(REPO)}:{number}: {what}: {line.strip()}"
             for path in sources
             for number, line in enumerate(path.read_text().splitlines(), start=1)
             for what, pattern in UNSAFE.items() if pattern.search(line)]
    assert not found, "\n".join(found)


@pytest.mark.slow
def test_a_run_writes_only_inside_its_output_dir(sandbox):
    root, before, after = sandbox
    # ``work/runs`` is created as the parent of the output_dir the user named.
    outside = sorted(path for path in after - before if path != "work/runs" and not path.startswith("work/runs/base"))
    assert not outside, f"the run wrote outside its output_dir: {outside[:20]}"
    assert "work/runs/base/checkpoints" in after and "work/runs/base/summary.json" in after
