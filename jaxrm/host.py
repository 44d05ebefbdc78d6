"""The host CPU as XLA:CPU sees it: its instruction-set flags (`cpu_flags`), and process-level settings --
glibc malloc tuned so a step's buffers are reused, not re-faulted, and sit on huge pages.

XLA:CPU takes a step's temporary buffers (about 3.5 GiB for the MiniLM train step at 32 × 256 tokens)
from ``malloc`` and frees them when the step ends. glibc serves every allocation above its mmap
threshold (at most 32 MiB) with a fresh ``mmap`` and unmaps it on ``free``, and trims freed heap memory,
so each step page-faults its whole working set in again: measured on 2 cores, 6.5 M page faults and
20 s of kernel time over 8 MiniLM steps, and a step at 32 × 256 tokens costing 2.7× one at 16 × 256.
With one arena, no mmap-ed chunks and no trimming, the next step reuses the same memory: 0.7 M faults,
and the 32 × 256 step drops from 5.4 s to 3.6 s. The price: the process keeps the memory of its largest
step until it exits, which a training job holds anyway.

``glibc.malloc.hugetlb=1`` (glibc 2.35 on; older versions ignore it) has malloc ask the kernel for
transparent huge pages on its heap (where THP is in ``madvise`` mode, the common default), so a pass
over large arrays walks one page table entry per 2 MiB instead of per 4 KiB. Measured on an AMD EPYC
Zen 4 (2 cores), 10⁷ pairs: the Bradley–Terry kernel with its derivatives 6.2 → 4.2 ms (240 MB
through it), the sum of its 40 MB of losses 1.9 → 1.0 ms; the MiniLM train step 3.04 → 2.96 s and
its compilation 7.5 → 5.9 s, at the same peak memory.

Not with several virtual CPU devices (``--xla_force_host_platform_device_count``, a testing setup):
their steps run concurrently in one process, one shared arena fragments, and the resident memory of
the 8-device Qwen3-50M benchmark grew past 24 GiB where glibc's defaults stay at 12.5 GiB.

glibc reads these settings once, when the process starts, hence `tuned_environment` + `reexec` for the
console command; a library user sets the same variables before starting Python. Nothing happens on
other platforms or C libraries, or when ``JAXRM_TUNE_MALLOC=0``; variables the user set are kept as
they are (a ``GLIBC_TUNABLES`` of their own replaces jaxrm's).
"""

from __future__ import annotations

import ctypes
import os
import platform
import re
import sys
from pathlib import Path

MALLOC_SETTINGS = {
    "MALLOC_ARENA_MAX": "1",  # every thread allocates from one heap, so freed buffers are found again
    "MALLOC_MMAP_MAX_": "0",  # large buffers come from the heap, not from fresh mmaps unmapped on free
    "MALLOC_TRIM_THRESHOLD_": str(2**40),  # freed memory stays mapped for the next step
    "GLIBC_TUNABLES": "glibc.malloc.hugetlb=1",  # the heap in 2 MiB transparent huge pages (glibc >= 2.35)
}


#: Names the settings jaxrm added itself (not the user), so `untuned_environment` can take them away.
ADDED_KEY = "JAXRM_TUNED_MALLOC"


def tuned_environment(environ: dict[str, str] | None = None) -> dict[str, str] | None:
    """The environment to restart the process with, or None when nothing needs changing here."""
    environ = dict(os.environ if environ is None else environ)
    if environ.get("JAXRM_TUNE_MALLOC", "1") == "0" or not sys.platform.startswith("linux"):
        return None
    if platform.libc_ver()[0] != "glibc" or all(key in environ for key in MALLOC_SETTINGS):
        return None
    if virtual_cpu_devices(environ) > 1:
        return None
    added = [key for key in MALLOC_SETTINGS if key not in environ]
    return {**MALLOC_SETTINGS, **environ, ADDED_KEY: ",".join(added)}


def virtual_cpu_devices(environ: dict[str, str]) -> int:
    """How many CPU devices ``environ`` asks XLA for (``--xla_force_host_platform_device_count``)."""
    match = re.search(r"--xla_force_host_platform_device_count=(\d+)", environ.get("XLA_FLAGS", ""))
    return int(match.group(1)) if match else 1


def untuned_environment(environ: dict[str, str] | None = None) -> dict[str, str]:
    """``environ`` without the settings jaxrm added: for child processes that are not jaxrm (a peer
    benchmark's PyTorch side), which should run as the user would run them."""
    environ = dict(os.environ if environ is None else environ)
    for key in environ.pop(ADDED_KEY, "").split(","):
        environ.pop(key, None)
    return environ


def trim_heap() -> bool:
    """Hands the free memory of the C heap back to the OS (glibc's ``malloc_trim(0)``), which the tuned
    settings otherwise keep mapped for the next step: for one process that runs unrelated workloads one after
    another (the loss benchmark's cases), whose heaps would otherwise pile up. The loss benchmark at 10⁷ lists
    grew past 24 GiB without it, each case's growth kept for the next. Returns whether there was a glibc
    heap to trim.
    """
    if not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc":
        return False
    ctypes.CDLL(None).malloc_trim(0)
    return True


def cpu_flags(cpuinfo: str | None = None) -> frozenset[str]:
    """The instruction-set extensions Linux reports for the CPU: the ``flags`` line of ``/proc/cpuinfo`` on
    x86 (``avx2``, ``avx512_bf16``, ``amx_tile``, ...), ``Features`` on Arm (``asimd``, ``bf16``, ...); empty
    where there is no such file.

    Example:
        >>> sorted(cpu_flags("processor : 0\\nflags : fpu avx2 fma\\n"))
        ['avx2', 'fma', 'fpu']
    """
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            return frozenset()
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            return frozenset(value.split())
    return frozenset()


def reexec(module: str, argv: list[str]) -> None:
    """Replaces the process with ``python -m module *argv`` under `tuned_environment`, when it differs.

    The process keeps its PID (signals and job schedulers see the same process); returns only when no
    restart is needed or possible.
    """
    environ = tuned_environment()
    if environ is None:
        return
    try:
        os.execve(sys.executable, [sys.executable, "-m", module, *argv], environ)
    except OSError:
        return  # no interpreter to restart (embedded Python): run untuned
