"""Atomic, resharding training checkpoints through ``torch.distributed.checkpoint`` (DCP).

A checkpoint root holds one directory per saved step plus a ``latest`` marker::

    root/step_00000100/   .metadata, __<rank>_0.distcp (DCP), rng/rank_00000.pt, meta.json
    root/latest           "step_00000100"

Model and optimizer state go through ``get_model_state_dict`` / ``get_optimizer_state_dict``
(fully-qualified names, DTensor shards for FSDP2), so a checkpoint written with one world
size or wrapper (FSDP2, DDP, none) loads into another. Each rank also stores its RNG states;
``meta.json`` holds the step, the world size, the caller's JSON metadata (e.g. the data
position) and the size of every file.

Atomicity: every rank writes into ``root/.tmp-step_N``; after all ranks are done, rank 0
writes ``meta.json``, renames the directory to ``step_N`` and only then replaces ``latest``
(write to a temporary file, then ``os.replace``). A crash at any point leaves ``latest``
naming the previous complete checkpoint. Re-saving an existing step first moves the old
``step_N`` aside to ``root/.old-step_N`` (deleted once the new one is in place); while only
the aside copy exists, ``latest`` resolves to it. The next ``save`` clears what a crash left
(staging directories, marker temporaries) and moves an orphaned aside copy back.

Safety: loading never unpickles arbitrary objects. DCP's ``.metadata`` is read with an
unpickler that only admits DCP's own metadata classes and torch sizes/dtypes; non-tensor
entries and RNG files go through ``torch.load(weights_only=True)``. A missing, truncated or
mismatched checkpoint raises ``CheckpointError`` (a ``ValueError``) naming what is wrong.
"""

from __future__ import annotations

import io
import json
import os
import pickle
import reprlib
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint import CheckpointException, FileSystemReader
from torch.distributed.checkpoint._traverse import set_element
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta
from torch.distributed.checkpoint.planner import ReadItem
from torch.distributed.checkpoint.state_dict import (
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from .data import atomic_write

__all__ = ["CheckpointError", "save", "load", "latest", "read_meta"]

FORMAT_VERSION = 1
LATEST_MARKER = "latest"
META_FILE = "meta.json"
RNG_DIR = "rng"
STAGING_PREFIX = ".tmp-"
ASIDE_PREFIX = ".old-"


class CheckpointError(ValueError):
    """A checkpoint is missing, incomplete, corrupted or does not fit the model."""


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def _step_dir_name(step: int) -> str:
    return f"step_{step:08d}"


def _aside_path(final: Path) -> Path:
    """Where a re-save moves the existing checkpoint ``final`` while its replacement goes in."""
    return final.with_name(ASIDE_PREFIX + final.name)


def _rng_path(directory: Path, rank: int) -> Path:
    return directory / RNG_DIR / f"rank_{rank:05d}.pt"


def _rng_state() -> dict[str, torch.Tensor]:
    state = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _training_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    return {"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, optimizer)}


def save(
    root: str | os.PathLike,
    step: int,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    *,
    meta: dict[str, Any] | None = None,
    keep: int = 2,
) -> Path:
    """Save model, optimizer and RNG state as ``root/step_<step>`` (collective: call on
    every rank). ``meta`` must be JSON-serialisable. Keeps the newest ``keep`` checkpoints.
    Returns the checkpoint directory."""
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise ValueError(f"step must be a non-negative int, got {step!r}")
    if isinstance(keep, bool) or not isinstance(keep, int) or keep < 1:
        raise ValueError(f"keep must be an int >= 1, got {keep!r}")
    _check_training_objects(model, optimizer)
    if meta is None:
        meta = {}
    if not isinstance(meta, dict):
        raise TypeError(f"meta must be a dict (a JSON object), got {type(meta).__name__}")
    root = Path(root)
    name = _step_dir_name(step)
    staging, final = root / (STAGING_PREFIX + name), root / name
    try:
        payload = json.dumps(
            {"format": FORMAT_VERSION, "step": step, "world_size": _world_size(), "meta": meta}, indent=1
        )
    except (TypeError, ValueError) as exc:
        raise TypeError(f"meta must be a JSON-serialisable dict: {exc}") from None
    rank = _rank()
    if rank == 0:
        root.mkdir(parents=True, exist_ok=True)
        _clear_interrupted_saves(root)
        staging.mkdir()
    _barrier()

    dcp.save(_training_state(model, optimizer), checkpoint_id=staging)
    _rng_path(staging, rank).parent.mkdir(exist_ok=True)
    torch.save(_rng_state(), _rng_path(staging, rank))
    _barrier()

    if rank == 0:
        record = json.loads(payload)
        record["files"] = {
            str(p.relative_to(staging)): p.stat().st_size for p in sorted(staging.rglob("*")) if p.is_file()
        }
        atomic_write(staging / META_FILE, json.dumps(record, indent=1).encode())
        _move_into_place(staging, final)
        atomic_write(root / LATEST_MARKER, (name + "\n").encode())
        _prune(root, keep, protect=name)
    _barrier()
    return final


def _check_training_objects(model: Any, optimizer: Any) -> None:
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")


def _move_into_place(staging: Path, final: Path) -> None:
    """Rename the complete ``staging`` directory to ``final``. An existing ``final`` (a re-save
    of its step) is moved aside, not deleted, before the rename and deleted after it, so that
    at every point either ``final`` or its aside copy is a complete checkpoint."""
    aside = _aside_path(final)
    if final.exists():
        os.replace(final, aside)
    os.replace(staging, final)
    if aside.exists():
        shutil.rmtree(aside)


def _clear_interrupted_saves(root: Path) -> None:
    """Undo what a save killed part-way left under ``root``: staging directories and ``latest``
    temporaries are deleted; an aside copy is deleted when its replacement made it into place,
    else moved back."""
    for stale in root.glob(STAGING_PREFIX + "step_*"):
        shutil.rmtree(stale)
    for stale in root.glob(f".{LATEST_MARKER}.*"):
        stale.unlink()
    for aside in root.glob(ASIDE_PREFIX + "step_*"):
        final = root / aside.name.removeprefix(ASIDE_PREFIX)
        if final.exists():
            shutil.rmtree(aside)
        else:
            os.replace(aside, final)


def _prune(root: Path, keep: int, protect: str) -> None:
    checkpoints = sorted(p for p in root.glob("step_*") if p.is_dir())
    for old in checkpoints[:-keep]:
        if old.name != protect:
            shutil.rmtree(old)


def latest(root: str | os.PathLike) -> Path | None:
    """The directory named by ``root/latest``, or None when nothing was saved there yet.
    When a re-save of that step was interrupted between moving the old directory aside and
    renaming the new one into place, the old directory's aside copy."""
    marker = Path(root) / LATEST_MARKER
    if not marker.exists():
        return None
    directory = Path(root) / marker.read_text().strip()
    for candidate in (directory, _aside_path(directory)):
        if candidate.is_dir():
            return candidate
    raise CheckpointError(f"{marker} names {directory.name!r}, which does not exist")


def read_meta(directory: str | os.PathLike) -> dict[str, Any]:
    """The ``meta.json`` record of a checkpoint directory, after checking that every file
    it lists is present with the recorded size."""
    directory = Path(directory)
    meta_path = directory / META_FILE
    try:
        record = json.loads(meta_path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{directory} is not a complete checkpoint: {META_FILE} is missing") from None
    except (ValueError, RecursionError) as exc:  # bad JSON, bad UTF-8, nesting too deep
        raise CheckpointError(f"{meta_path} is corrupted: {type(exc).__name__}: {exc}") from None
    _check_record(record, meta_path)
    for relative, size in record["files"].items():
        path = directory / relative
        if not path.is_file():
            raise CheckpointError(f"checkpoint {directory} is corrupted: {relative} is missing")
        if path.stat().st_size != size:
            raise CheckpointError(
                f"checkpoint {directory} is corrupted: {relative} has {path.stat().st_size} bytes, expected {size}"
            )
    return record


def _is_int_at_least(value: Any, minimum: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= minimum


# Every field of a meta.json record after "format": a test of its value and what it must be.
_RECORD_FIELDS: dict[str, tuple[Callable[[Any], bool], str]] = {
    "step": (lambda value: _is_int_at_least(value, 0), "an int >= 0"),
    "world_size": (lambda value: _is_int_at_least(value, 1), "an int >= 1"),
    "meta": (lambda value: isinstance(value, dict), "a JSON object"),
    "files": (
        lambda value: isinstance(value, dict) and all(_is_int_at_least(size, 0) for size in value.values()),
        "a JSON object mapping file names to sizes (ints >= 0)",
    ),
}


def _check_record(record: Any, path: Path) -> None:
    """Raise ``CheckpointError`` unless ``record`` (the parsed ``path``) is a JSON object of
    this format version with every field of ``_RECORD_FIELDS`` present and well typed."""
    if not isinstance(record, dict):
        raise CheckpointError(f"{path} is corrupted: expected a JSON object, got {type(record).__name__}")
    if record.get("format") != FORMAT_VERSION:
        raise CheckpointError(
            f"{path.parent} has checkpoint format {record.get('format')!r}, expected {FORMAT_VERSION}"
        )
    for field, (is_valid, allowed) in _RECORD_FIELDS.items():
        if field not in record:
            raise CheckpointError(f"{path} is corrupted: {field!r} is missing")
        if not is_valid(record[field]):
            got = reprlib.repr(record[field])
            raise CheckpointError(f"{path} is corrupted: {field!r} must be {allowed}, got {got}")


def load(
    root: str | os.PathLike,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    *,
    expect: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Restore the latest checkpoint under ``root`` into ``model`` and ``optimizer``
    (collective). ``expect``: metadata entries that must equal the saved ones (e.g. the
    model config). RNG states are restored when the world size is unchanged.
    Returns the ``meta.json`` record (``step``, ``world_size``, ``meta``)."""
    _check_training_objects(model, optimizer)
    directory = latest(root)
    if directory is None:
        raise CheckpointError(f"no checkpoint under {root} ({LATEST_MARKER} marker not found)")
    record = read_meta(directory)
    mismatched = {
        key: (record["meta"].get(key), value) for key, value in (expect or {}).items() if record["meta"].get(key) != value
    }
    if mismatched:
        details = "; ".join(f"{key}: saved {saved!r}, now {now!r}" for key, (saved, now) in mismatched.items())
        raise CheckpointError(f"checkpoint {directory} does not match this run: {details}")

    reader = _SafeFileSystemReader(directory)
    reader.read_metadata()  # refuses unsafe or corrupted metadata with its own clear message
    state = _training_state(model, optimizer)
    try:
        dcp.load(state, storage_reader=reader, planner=_SafeLoadPlanner())
    except (Exception, CheckpointException) as exc:  # CheckpointException carries the per-rank failures
        raise CheckpointError(f"cannot load {directory} into this model/optimizer: {exc}") from exc
    set_model_state_dict(model, state["model"])
    set_optimizer_state_dict(model, optimizer, state["optim"])

    rng_file = _rng_path(directory, _rank())
    if record["world_size"] == _world_size() and rng_file.exists():
        rng = torch.load(rng_file, weights_only=True)
        torch.set_rng_state(rng["cpu"])
        if "cuda" in rng and torch.cuda.is_available():
            torch.cuda.set_rng_state(rng["cuda"])
    return record


# DCP metadata is a pickle of these dataclasses and enums, torch sizes/dtypes/layouts, the
# checkpoint path and builtin containers.
_SAFE_METADATA_MODULES = (
    "torch.distributed.checkpoint.metadata",
    "torch.distributed.checkpoint.filesystem",
    "torch.distributed.checkpoint.planner",
    "torch.distributed.checkpoint._extension",
)
_SAFE_GLOBALS = {
    ("collections", "OrderedDict"),
    ("builtins", "set"),
    ("builtins", "frozenset"),
    ("pathlib", "PosixPath"),
    ("pathlib", "WindowsPath"),
    ("torch", "Size"),
    ("torch.serialization", "_get_layout"),
}


class _MetadataUnpickler(pickle.Unpickler):
    """Admits DCP metadata classes, ``_SAFE_GLOBALS`` and torch dtype/layout/memory-format
    constants; any other global (a function, an arbitrary class) is refused."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _SAFE_GLOBALS:
            return super().find_class(module, name)
        if module in _SAFE_METADATA_MODULES:
            found = super().find_class(module, name)
            if isinstance(found, type):
                return found
        if module == "torch" and isinstance(getattr(torch, name, None), (torch.dtype, torch.layout, torch.memory_format)):
            return getattr(torch, name)
        raise CheckpointError(f"checkpoint metadata refers to {module}.{name}, which is not allowed to be loaded")


class _SafeFileSystemReader(FileSystemReader):
    """``FileSystemReader`` whose metadata is read by ``_MetadataUnpickler``."""

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        path = self._get_metadata_path(kwargs.get("rank"))
        try:
            # Read whole first: a corrupted length field then cannot make a file read allocate it.
            content = Path(path).read_bytes()
        except FileNotFoundError:
            raise CheckpointError(f"checkpoint metadata {path} is missing") from None
        try:
            metadata = _MetadataUnpickler(io.BytesIO(content)).load()
        except CheckpointError:
            raise
        except Exception as exc:  # corrupted pickles raise many kinds (OverflowError, MemoryError, ...)
            raise CheckpointError(f"checkpoint metadata {path} is corrupted: {type(exc).__name__}: {exc}") from exc
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


class _SafeLoadPlanner(DefaultLoadPlanner):
    """``DefaultLoadPlanner`` that reads non-tensor entries with ``weights_only=True``."""

    def load_bytes(self, read_item: ReadItem, value: io.BytesIO) -> None:
        loaded = torch.load(value, weights_only=True)
        if self.flatten_state_dict:
            set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn], loaded)
        else:
            self.state_dict[read_item.dest_index.fqn] = loaded
