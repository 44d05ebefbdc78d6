"""Builds and loads jaxrm's C++ kernels: each ``*.cc`` beside this file is compiled once per machine with the
system C++ compiler, cached under ``$JAXRM_CACHE_DIR`` (default ``~/.cache/jaxrm``), and its XLA FFI handlers
registered with JAX's CPU backend. Within `xla_only`, the layers that route work to these kernels trace XLA's own
operations instead.

Example:
    >>> from jaxrm.kernels import native, pairwise
    >>> library = native.load("pairwise.cc", pairwise.FLAGS, ("jaxrm_bradley_terry",), "the loss kernel")
    >>> library is None or hasattr(library, "jaxrm_bradley_terry")
    True
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import logging
import math
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import jax

HERE = Path(__file__).parent
BASE_FLAGS = ("-O3", "-std=c++17", "-ffp-contract=fast", "-shared", "-fPIC", "-pthread", "-Wno-psabi")

log = logging.getLogger(__name__)


def cache_dir() -> Path:
    return Path(os.environ.get("JAXRM_CACHE_DIR") or Path.home() / ".cache" / "jaxrm")


def build(source: str, flags: tuple[str, ...], compiler: str | None = None) -> Path:
    """Compiles ``source`` (a file beside this module) into a shared library, once per source text (with the
    ``*.h`` headers beside it), compiler, flags and XLA FFI headers, and returns its path.

    Raises:
      RuntimeError: no C++ compiler is found, or it fails (its output is in the message).
    """
    compiler = compiler or os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++")
    if not compiler:
        raise RuntimeError("no C++ compiler found (set CXX, or install g++)")
    path = HERE / source
    include = jax.ffi.include_dir()
    headers = b"".join(header.read_bytes() for header in sorted(HERE.glob("*.h")))  # what the sources include
    text = path.read_bytes() + headers + " ".join((compiler, include, *flags)).encode()
    key = hashlib.sha256(text).hexdigest()[:16]
    library = cache_dir() / "kernels" / f"{path.stem}-{key}.so"
    if library.exists():
        return library
    library.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=library.parent) as scratch:
        partial = Path(scratch) / library.name
        command = [compiler, *flags, f"-I{include}", str(path), "-o", str(partial)]
        completed = subprocess.run(command, capture_output=True, text=True)
        if completed.returncode:
            raise RuntimeError(f"{' '.join(command)} failed:\n{completed.stderr[-2000:]}")
        partial.replace(library)  # atomic: a process building at the same time finds one whole library
    return library


def load(source: str, flags: tuple[str, ...], targets: tuple[str, ...], what: str) -> ctypes.CDLL | None:
    """`build` ``source``, load it and register its FFI handlers ``targets`` for the CPU; None (with one
    warning naming ``what``) where it cannot be built or loaded."""
    try:
        library = ctypes.CDLL(str(build(source, flags)))
    except (RuntimeError, OSError) as error:
        log.warning("%s is off: %s", what, error)
        return None
    for target in targets:
        jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(getattr(library, target)), platform="cpu")
    return library


def items(x: jax.Array) -> jax.Array:
    """``x`` [..., M, N] as one batch axis of matrices [I, M, N], as the kernels' batched calls take them."""
    return x.reshape(math.prod(x.shape[:-2]), *x.shape[-2:])


_xla_only = False


def kernels_allowed() -> bool:
    """False within `xla_only`."""
    return not _xla_only


@contextlib.contextmanager
def xla_only():
    """Within it, jaxrm's layers trace XLA's own operations, not the kernels (for XLA's cost analysis, which
    counts no custom call, or an A/B). JAX caches traced differentiation rules, so its caches are cleared on
    entry and exit: what is traced inside is traced anew, and so is what is traced after."""
    global _xla_only
    jax.clear_caches()
    _xla_only = True
    try:
        yield
    finally:
        _xla_only = False
        jax.clear_caches()
