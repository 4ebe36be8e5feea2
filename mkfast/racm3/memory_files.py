"""The files of a saved :class:`~mkfast.racm3.memory.Memory`: written atomically, read consistently.

A memory directory holds ``memory.json`` (the index: format, size, and the name of
the tensors file) and ``embeddings-<version>.safetensors``. Guarantees:

- a save is atomic: everything is written inside a private staging folder
  ``.saving-<version>`` (safetensors' own temporary file included), the tensors file
  moves into place under a fresh name, and memory.json is replaced last with
  os.replace, the commit point. A save killed anywhere leaves the previous memory
  loadable, plus at most its staging folder and one unreferenced tensors file,
  which the next save removes;
- saves to one directory hold an exclusive lock (``.memory.lock``, flock, released
  by the OS when its holder dies): a second save waits, or fails clearly;
- a reader never sees a half-replaced memory: it reads the index, then the file the
  index names; when a concurrent save removed that file, it reads the index again;
- the index names a file inside its own directory, never a path elsewhere.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import uuid

import torch

METADATA_FILE = "memory.json"
TENSORS_PREFIX, TENSORS_SUFFIX = "embeddings-", ".safetensors"
STAGING_PREFIX = ".saving-"
LOCK_FILE = ".memory.lock"
FORMAT_VERSION = 1
# Re-reads of memory.json when saves replace the memory while it is being loaded.
LOAD_ATTEMPTS = 8
REQUIRED_KEYS = ("format_version", "tensors_file", "num_documents", "dim")


class MemoryLockedError(RuntimeError):
    """Another process (or thread) is saving a memory to the same directory."""


def fault_point(stage: str) -> None:
    """A named step of a save or load where tests inject a kill or a concurrent save; does nothing here."""


@contextlib.contextmanager
def save_lock(directory, wait: bool):
    """An exclusive flock on ``directory``/.memory.lock; the OS drops it when its holder dies."""
    import fcntl

    path = os.path.join(directory, LOCK_FILE)
    descriptor = os.open(path, os.O_CREAT | os.O_RDWR, 0o644)
    try:
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            raise MemoryLockedError(
                f"Memory.save: another save to {directory} is in progress ({path} is locked)"
            ) from None
        yield
    finally:
        os.close(descriptor)  # closing releases the lock


def write_memory(directory, tensors: dict[str, torch.Tensor], metadata: dict, *, wait: bool = True) -> None:
    """Save ``tensors`` and the index ``metadata`` (tensors_file and format_version added) atomically."""
    from safetensors.torch import save_file

    os.makedirs(directory, exist_ok=True)
    with save_lock(directory, wait):
        fault_point("locked")
        version = uuid.uuid4().hex[:12]
        tensors_name = f"{TENSORS_PREFIX}{version}{TENSORS_SUFFIX}"
        staging = os.path.join(directory, f"{STAGING_PREFIX}{version}")
        os.mkdir(staging)
        staged_tensors = os.path.join(staging, tensors_name)
        save_file(tensors, staged_tensors)
        _fsync(staged_tensors)
        fault_point("tensors_written")
        os.replace(staged_tensors, os.path.join(directory, tensors_name))
        fault_point("tensors_moved")
        staged_metadata = os.path.join(staging, METADATA_FILE)
        with open(staged_metadata, "w") as handle:
            json.dump(
                {"format_version": FORMAT_VERSION, "tensors_file": tensors_name, **metadata}, handle, indent=2
            )
            handle.flush()
            os.fsync(handle.fileno())
        fault_point("index_written")
        os.replace(staged_metadata, os.path.join(directory, METADATA_FILE))
        fault_point("index_replaced")
        # Only now may older files go: the previous save's tensors, and what killed saves left.
        # A reader that read the old memory.json just before finds its file gone and re-reads it.
        for name in os.listdir(directory):
            path = os.path.join(directory, name)
            if name.startswith(STAGING_PREFIX):
                shutil.rmtree(path, ignore_errors=True)
            elif name.startswith(TENSORS_PREFIX) and name != tensors_name:
                with contextlib.suppress(FileNotFoundError):
                    os.remove(path)


def read_memory(directory, device: str) -> tuple[dict[str, torch.Tensor], dict, str]:
    """(tensors, index, tensors path) of the memory saved last. Errors name the missing or damaged file."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    for _ in range(LOAD_ATTEMPTS):
        metadata = read_index(directory)
        fault_point("index_read")
        path = os.path.join(directory, metadata["tensors_file"])
        try:
            return load_file(path, device=device), metadata, path
        except (OSError, RuntimeError, SafetensorError) as error:
            # safetensors opens the file more than once (RuntimeError when it vanished in between):
            # if a save committed a newer memory.json and removed this file, read the index again.
            if read_index(directory)["tensors_file"] != metadata["tensors_file"]:
                continue
            if not os.path.exists(path):
                raise FileNotFoundError(
                    f"Memory.load: {path}, named by {METADATA_FILE}, does not exist"
                ) from None
            if isinstance(error, SafetensorError):
                raise ValueError(
                    f"Memory.load: {path} is not a readable safetensors file (truncated or damaged?): {error}"
                ) from error
            raise
    raise RuntimeError(f"Memory.load: {directory} was replaced {LOAD_ATTEMPTS} times while being read")


def read_index(directory) -> dict:
    """memory.json, checked: a JSON object with the required keys, this format, and a tensors file
    inside ``directory``."""
    path = os.path.join(directory, METADATA_FILE)
    if not os.path.exists(path):
        raise FileNotFoundError(f"Memory.load: {path} does not exist (not a saved memory?)")
    with open(path) as handle:
        text = handle.read()
    try:
        metadata = json.loads(text)
    except json.JSONDecodeError as error:
        raise ValueError(f"Memory.load: {path} is not valid JSON (truncated or damaged?): {error}") from error
    if not isinstance(metadata, dict):
        raise ValueError(f"Memory.load: {path} must hold a JSON object, got {type(metadata).__name__}")
    missing = [key for key in REQUIRED_KEYS if key not in metadata]
    if missing:
        raise ValueError(f"Memory.load: {path} lacks {missing}")
    if metadata["format_version"] != FORMAT_VERSION:
        raise ValueError(
            f"Memory.load: {path} has format_version {metadata['format_version']!r}, "
            f"this version reads {FORMAT_VERSION}"
        )
    name = metadata["tensors_file"]
    # A bare file name of this directory: an absolute path or "../x" would load another memory.
    if (
        not isinstance(name, str)
        or os.path.basename(name) != name
        or name in ("", ".", "..")
        or (os.altsep is not None and os.altsep in name)
    ):
        raise ValueError(
            f"Memory.load: tensors_file in {path} must be a file name inside {directory}, got {name!r}"
        )
    return metadata


def _fsync(path: str) -> None:
    with open(path, "rb") as handle:
        os.fsync(handle.fileno())
