"""``model.dtype: auto``: bfloat16 products where the hardware multiplies bfloat16, float32 elsewhere."""

import re
from pathlib import Path

import jax.numpy as jnp
import pytest

from jaxrm.host import cpu_flags
from jaxrm.models.layers import auto_compute_dtype
from jaxrm.train.config import config_from_dict
from jaxrm.train.run_dir import compute_dtype, model_options

ZEN3 = "processor\t: 0\nvendor_id\t: AuthenticAMD\nflags\t\t: fpu sse2 avx avx2 fma bmi2\nbogomips\t: 4890.80\n"
SAPPHIRE_RAPIDS = "processor\t: 0\nflags\t\t: avx2 avx512f avx512_bf16 amx_bf16 amx_tile\n"
GRAVITON3 = "processor\t: 0\nBogoMIPS\t: 2100.00\nFeatures\t: fp asimd sve bf16 i8mm\n"


def test_cpu_flags_reads_the_x86_and_the_arm_line():
    assert cpu_flags(ZEN3) == {"fpu", "sse2", "avx", "avx2", "fma", "bmi2"}
    assert "amx_tile" in cpu_flags(SAPPHIRE_RAPIDS)
    assert cpu_flags(GRAVITON3) == {"fp", "asimd", "sve", "bf16", "i8mm"}
    assert cpu_flags("processor\t: 0\n") == frozenset()


@pytest.mark.parametrize("cpuinfo, expected", [(ZEN3, "float32"), (SAPPHIRE_RAPIDS, "bfloat16"),
                                               (GRAVITON3, "bfloat16"), ("", "float32")])
def test_auto_is_bfloat16_only_with_bfloat16_products(cpuinfo, expected):
    assert auto_compute_dtype("cpu", cpu_flags(cpuinfo)) == expected
    assert auto_compute_dtype("gpu", cpu_flags(cpuinfo)) == auto_compute_dtype("tpu") == "bfloat16"


def test_auto_on_this_machine_follows_its_cpuinfo():
    text = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    words = set(re.findall(r"[a-z0-9_]+", text))
    expected = "bfloat16" if words & {"avx512_bf16", "amx_bf16", "bf16"} else "float32"
    assert auto_compute_dtype("cpu") == expected


def test_the_run_builds_its_model_in_the_resolved_dtype():
    auto = config_from_dict({"model": {"path": "x", "dtype": "auto"}}).model
    assert compute_dtype(auto) == auto_compute_dtype()
    assert model_options(auto)["dtype"] == jnp.dtype(auto_compute_dtype())
    explicit = config_from_dict({"model": {"path": "x", "dtype": "bfloat16"}}).model
    assert compute_dtype(explicit) == "bfloat16" and model_options(explicit)["dtype"] == jnp.bfloat16


@pytest.mark.parametrize("function", [cpu_flags, auto_compute_dtype])
def test_docstring_examples(function):
    import doctest

    runner = doctest.DocTestRunner()
    for test in doctest.DocTestFinder().find(function, globs={function.__name__: function}):
        runner.run(test)
    assert runner.summarize(verbose=False).attempted > 0 and runner.failures == 0
