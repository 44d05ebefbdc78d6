"""jaxrm.kernels.native: a kernel's library is rebuilt when its source or a header beside it changes, and reused
otherwise. Needs a C++ compiler (skipped without one)."""

import ctypes
import shutil

import pytest

from jaxrm.kernels import native

pytestmark = pytest.mark.skipif(not (shutil.which("c++") or shutil.which("g++")), reason="no C++ compiler")


def test_a_changed_header_builds_a_new_library(tmp_path, monkeypatch):
    sources, cache = tmp_path / "kernels", tmp_path / "cache"
    sources.mkdir()
    (sources / "value.h").write_text("inline int Value() { return 1; }\n")
    (sources / "kernel.cc").write_text('#include "value.h"\nextern "C" int jaxrm_value() { return Value(); }\n')
    monkeypatch.setattr(native, "HERE", sources)
    monkeypatch.setenv("JAXRM_CACHE_DIR", str(cache))
    first = native.build("kernel.cc", native.BASE_FLAGS)
    assert native.build("kernel.cc", native.BASE_FLAGS) == first  # cached
    (sources / "value.h").write_text("inline int Value() { return 2; }\n")
    second = native.build("kernel.cc", native.BASE_FLAGS)
    assert second != first and first.exists() and second.exists()
    assert ctypes.CDLL(str(first)).jaxrm_value() == 1 and ctypes.CDLL(str(second)).jaxrm_value() == 2
