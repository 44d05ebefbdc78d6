"""jaxrm.host: the console command restarts once with glibc malloc tuned, keeping what the user set."""

import json
import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest

from jaxrm.host import ADDED_KEY, MALLOC_SETTINGS, tuned_environment, untuned_environment

linux_glibc = pytest.mark.skipif(not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc",
                                 reason="the malloc settings are glibc's")


def _untuned_process_environment() -> dict[str, str]:
    """This process's environment without the malloc settings, their switch or virtual CPU devices: one in which
    `tuned_environment` tunes, for child processes."""
    return {k: v for k, v in os.environ.items()
            if k not in MALLOC_SETTINGS and k not in ("JAXRM_TUNE_MALLOC", "XLA_FLAGS")}


@linux_glibc
def test_tuned_environment_adds_the_settings_and_keeps_the_users():
    environ = tuned_environment({"PATH": "/bin", "MALLOC_ARENA_MAX": "4"})
    assert environ["PATH"] == "/bin"
    assert environ["MALLOC_ARENA_MAX"] == "4"  # the user's value wins
    assert environ["MALLOC_MMAP_MAX_"] == "0" and int(environ["MALLOC_TRIM_THRESHOLD_"]) >= 2**32
    assert environ["GLIBC_TUNABLES"] == "glibc.malloc.hugetlb=1"
    assert tuned_environment({"GLIBC_TUNABLES": "glibc.malloc.tcache_count=0"})["GLIBC_TUNABLES"] == \
        "glibc.malloc.tcache_count=0"


@linux_glibc
def test_untuned_environment_takes_away_only_what_jaxrm_added():
    user = {"PATH": "/bin", "MALLOC_ARENA_MAX": "4"}
    tuned = tuned_environment(user)
    assert tuned[ADDED_KEY] == "MALLOC_MMAP_MAX_,MALLOC_TRIM_THRESHOLD_,GLIBC_TUNABLES"
    assert untuned_environment(tuned) == user
    assert untuned_environment(user) == user


@linux_glibc
def test_no_restart_when_tuned_already_or_switched_off():
    assert tuned_environment({**MALLOC_SETTINGS, "PATH": "/bin"}) is None  # the restarted process: no loop
    assert tuned_environment({"JAXRM_TUNE_MALLOC": "0"}) is None
    # several virtual CPU devices fragment one shared arena: left at glibc's defaults
    assert tuned_environment({"XLA_FLAGS": "--xla_force_host_platform_device_count=8"}) is None
    assert tuned_environment({"XLA_FLAGS": "--xla_force_host_platform_device_count=1"}) is not None


@linux_glibc
def test_reexec_restarts_the_module_with_the_settings_and_the_same_pid(tmp_path):
    (tmp_path / "show_environment.py").write_text(
        "import json, os\n"
        "print(json.dumps({'pid': os.getpid(), **{k: os.environ.get(k) for k in "
        + repr(sorted(MALLOC_SETTINGS)) + "}}))\n"
    )
    script = ("import os, sys; print(os.getpid(), flush=True); from jaxrm.host import reexec; "
              "reexec('show_environment', ['--flag']); print('not restarted')")
    environ = _untuned_process_environment()
    environ["PYTHONPATH"] = os.pathsep.join([str(tmp_path), *sys.path])
    lines = subprocess.run([sys.executable, "-c", script], env=environ, capture_output=True, text=True,
                           check=True).stdout.splitlines()
    shown = json.loads(lines[1])
    assert int(lines[0]) == shown.pop("pid")
    assert shown == MALLOC_SETTINGS


def _glibc_version() -> tuple[int, ...]:
    library, version = platform.libc_ver()
    return tuple(int(part) for part in version.split(".")[:2]) if library == "glibc" and version else (0,)


def _transparent_huge_pages() -> str:
    try:
        setting = Path("/sys/kernel/mm/transparent_hugepage/enabled").read_text()
    except OSError:
        return "never"
    return setting.split("[")[1].split("]")[0] if "[" in setting else "never"


@linux_glibc
@pytest.mark.skipif(_glibc_version() < (2, 35),
                    reason="glibc.malloc.hugetlb came with glibc 2.35")
@pytest.mark.skipif(_transparent_huge_pages() != "madvise",
                    reason="huge pages only on request where THP is in madvise mode")
def test_the_tuned_heap_sits_on_huge_pages():
    """A 256 MiB buffer from malloc, written once: on transparent huge pages under the tuned environment,
    on 4 KiB pages under glibc's defaults (THP in madvise mode gives huge pages only to those who ask;
    NumPy asks for its own arrays, hence plain malloc here)."""
    probe = ("import ctypes; libc = ctypes.CDLL(None); libc.malloc.restype = ctypes.c_void_p; "
             "ctypes.memset(libc.malloc(2**28), 1, 2**28); "
             "print(next(int(line.split()[1]) for line in open('/proc/self/smaps_rollup') "
             "if line.startswith('AnonHugePages:')))")
    plain = _untuned_process_environment()

    def huge_kib(environ):
        return int(subprocess.run([sys.executable, "-c", probe], env=environ, capture_output=True, text=True,
                                  check=True).stdout)

    assert huge_kib(tuned_environment(plain)) >= 128 * 1024  # at least half the buffer
    assert huge_kib(plain) == 0


@linux_glibc
def test_trim_heap_returns_the_tuned_heaps_free_memory():
    """Under the tuned settings a freed 256 MiB malloc buffer stays resident (that is their point);
    `trim_heap` gives it back."""
    probe = ("import ctypes; from jaxrm.host import trim_heap; libc = ctypes.CDLL(None); "
             "libc.malloc.restype = ctypes.c_void_p; libc.free.argtypes = [ctypes.c_void_p]; "
             "rss = lambda: int(open('/proc/self/statm').read().split()[1]) * 4096 // 2**20; "
             "p = libc.malloc(2**28); ctypes.memset(p, 1, 2**28); held = rss(); libc.free(p); freed = rss(); "
             "trimmed = trim_heap(); print(held, freed, rss(), trimmed)")
    environ = tuned_environment(_untuned_process_environment())
    held, freed, after, trimmed = subprocess.run([sys.executable, "-c", probe], env=environ, capture_output=True,
                                                 text=True, check=True).stdout.split()
    assert trimmed == "True"
    assert int(freed) > int(held) - 16 and int(after) < int(held) - 200  # MiB resident


def test_the_restart_happens_before_jax_is_imported():
    """`console_main` imports `jaxrm.host` and may restart: nothing heavy may load before that (it would
    be loaded twice), and `jaxrm.losses` alone stays free of the model and training stack."""
    probe = ("import sys, jaxrm.host; heavy = {'jax', 'flax', 'transformers'} & set(sys.modules); "
             "import jaxrm.losses; late = {'flax', 'transformers', 'optax'} & set(sys.modules); "
             "import jaxrm; print(sorted(heavy), sorted(late), jaxrm.losses is sys.modules['jaxrm.losses'])")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["[]", "[]", "True"]
