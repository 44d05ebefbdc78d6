"""Local Hugging Face model directories: finding them, and reading and writing their safetensors weights.

Nothing here downloads, unpickles, or runs code from the directory: weights are read only from
``*.safetensors`` files (one file, several, or several named by ``model.safetensors.index.json``).
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from pathlib import Path

import jax
import numpy as np
from safetensors import safe_open
from safetensors.numpy import save_file

INDEX_FILE = "model.safetensors.index.json"
WEIGHTS_FILE = "model.safetensors"

# NumPy has no bfloat16 or float8; safetensors' NumPy reader rejects them, so these are read as JAX arrays
# on the host and viewed as ml_dtypes NumPy arrays.
_NON_NUMPY_DTYPES = frozenset({"BF16", "F8_E4M3", "F8_E5M2"})


def model_dir(path: str | Path) -> Path:
    """The directory ``path`` names; a FileNotFoundError saying how to download a Hub model otherwise."""
    directory = Path(path).expanduser()
    if directory.is_dir():
        return directory
    if directory.exists():
        raise NotADirectoryError(f"{str(path)!r} is a file; pass the Hugging Face model directory that contains it.")
    raise FileNotFoundError(
        f"No local directory {str(path)!r}. jaxrm does not download from the Hugging Face Hub: if this is a Hub "
        f"model name, download it first (`huggingface-cli download {path} --local-dir DIR`) and pass DIR."
    )


def read_model_type(directory: Path) -> str | None:
    """``model_type`` from ``config.json``, read as plain JSON so that unknown types fail in jaxrm's words."""
    config_file = directory / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"{directory} has no config.json; pass a Hugging Face model directory.")
    return json.loads(config_file.read_text()).get("model_type")


def _weight_files(directory: Path) -> dict[str, Path]:
    """Checkpoint key → the file that holds it."""
    index = directory / INDEX_FILE
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        missing = sorted({name for name in weight_map.values() if not (directory / name).is_file()})
        if missing:
            raise FileNotFoundError(f"{index} names weight files that are not in {directory}: {missing}.")
        return {key: directory / name for key, name in weight_map.items()}
    files = sorted(directory.glob("*.safetensors"))
    if not files:
        found = sorted(path.name for pattern in ("*.bin", "*.pt", "*.pth") for path in directory.glob(pattern))
        hint = f" It has {found}; jaxrm never unpickles weights, so convert them to safetensors first." if found else ""
        raise FileNotFoundError(f"{directory} has no *.safetensors weights.{hint}")
    owner = {}
    for file in files:
        with safe_open(file, framework="numpy") as handle:
            for key in handle.keys():
                if key in owner:
                    raise ValueError(f"Tensor {key!r} is in both {owner[key].name} and {file.name}; remove one file.")
                owner[key] = file
    return owner


def _host_device() -> jax.Device:
    try:
        return jax.devices("cpu")[0]
    except RuntimeError:  # JAX_PLATFORMS excludes the CPU backend
        return jax.devices()[0]


class SafetensorsCheckpoint(Mapping):
    """The tensors of a model directory as a read-only mapping of NumPy arrays, each read when asked for.

    bfloat16 and float8 tensors come back as `ml_dtypes` arrays.
    """

    def __init__(self, directory: str | Path):
        self.directory = Path(directory)
        self._files = _weight_files(self.directory)

    def __getitem__(self, key: str) -> np.ndarray:
        file = self._files[key]
        with safe_open(file, framework="numpy") as handle:
            if handle.get_slice(key).get_dtype() not in _NON_NUMPY_DTYPES:
                return handle.get_tensor(key)
        with jax.default_device(_host_device()), safe_open(file, framework="flax") as handle:
            return np.asarray(handle.get_tensor(key))

    def __iter__(self) -> Iterator[str]:
        return iter(self._files)

    def __len__(self) -> int:
        return len(self._files)


class RenamedKeys(Mapping):
    """A view of ``tensors`` under other keys: ``names`` maps a new key to the original one."""

    def __init__(self, tensors: Mapping[str, np.ndarray], names: Mapping[str, str]):
        self._tensors = tensors
        self._names = dict(names)

    def __getitem__(self, key: str) -> np.ndarray:
        return self._tensors[self._names[key]]

    def __iter__(self) -> Iterator[str]:
        return iter(self._names)

    def __len__(self) -> int:
        return len(self._names)


def save_safetensors(tensors: Mapping[str, np.ndarray], path: str | Path) -> None:
    """Writes one safetensors file with the ``format: pt`` metadata that transformers expects."""
    contiguous = {key: np.ascontiguousarray(value) for key, value in tensors.items()}
    save_file(contiguous, str(path), metadata={"format": "pt"})
