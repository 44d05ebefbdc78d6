"""The run config: YAML + dotted overrides, unknown keys and wrong types named."""

import pytest

from jaxrm.train.config import ConfigError, config_from_dict, load_config


def test_overrides_are_typed_and_nested():
    config = config_from_dict({"model": {"path": "x"}}, ["train.steps=7", "train.learning_rate=1e-3",
                                                          "data.buckets=[32, 64]", "data.max_length=64",
                                                          "mesh.fsdp=2", "loss.name=hinge"])
    assert config.train.steps == 7
    assert config.train.learning_rate == pytest.approx(1e-3)
    assert config.data.buckets == [32, 64]
    assert config.mesh.fsdp == 2
    assert config.loss.name == "hinge"


def test_int_accepted_for_float():
    config = config_from_dict({"model": {"path": "x"}, "train": {"learning_rate": 1}})
    assert isinstance(config.train.learning_rate, float)


@pytest.mark.parametrize("override, fragment", [
    ("train.stpes=3", "did you mean train.steps"),
    ("trian.steps=3", "did you mean train"),
    ("loss.margn=data", "loss.margin"),
])
def test_unknown_key_names_nearest(override, fragment):
    with pytest.raises(ConfigError, match="unknown config key") as error:
        config_from_dict({"model": {"path": "x"}}, [override])
    assert fragment in str(error.value)


@pytest.mark.parametrize("override, key", [
    ("train.steps=ten", "train.steps"),
    ("train.steps=1.5", "train.steps"),
    ("model.remat=3", "model.remat"),
    ("data.buckets=7", "data.buckets"),
    ("train.learning_rate=fast", "train.learning_rate"),
])
def test_wrong_type_names_key(override, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        config_from_dict({"model": {"path": "x"}}, [override])


@pytest.mark.parametrize("override, key", [
    ("loss.name=mse", "loss.name"),
    ("train.batch_size=0", "train.batch_size"),
    ("train.grad_accum_steps=3", "train.grad_accum_steps"),
    ("data.truncation=middle", "data.truncation"),
    ("model.dtype=bf16", "model.dtype"),
    ("data.sequences_per_row=0", "data.sequences_per_row"),
    ("data.length_group_batches=16", "data.balance_group_batches"),  # excludes the default balancing
])
def test_invalid_values(override, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        config_from_dict({"model": {"path": "x"}}, [override])


def test_yaml_file_errors_name_file(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("train:\n  steps: [1\n")
    with pytest.raises(ConfigError, match="bad.yaml"):
        load_config(path)
    path.write_text("train:\n  steps: 3\n  bogus: 1\nmodel:\n  path: x\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml: unknown config key 'train\.bogus'"):
        load_config(path)


def test_yaml_is_loaded_safely(tmp_path):
    path = tmp_path / "evil.yaml"
    path.write_text("output_dir: !!python/object/apply:os.system ['echo pwned']\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(path)


def test_repository_configs_load():
    from pathlib import Path

    for path in sorted((Path(__file__).parents[1] / "configs").glob("*.yaml")):
        load_config(path)
