"""Checkpoints: exact round trip, atomicity under a crash, corruption and mismatch errors,
and refusal to unpickle anything but DCP metadata. (Multi-rank resharding is exercised by
tests/test_example.py, which resumes 2-rank FSDP2 runs with 1 and 2 ranks.)"""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from lpdist import checkpoint
from lpdist.checkpoint import CheckpointError
from lpdist.models import Llama, preset


def trained_model(seed: int = 0, steps: int = 2) -> tuple[Llama, torch.optim.AdamW]:
    torch.manual_seed(seed)
    model = Llama(preset("tiny"))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.95))
    for _ in range(steps):
        tokens = torch.randint(0, 512, (2, 17))
        loss = F.cross_entropy(model(tokens[:, :-1]).flatten(0, 1), tokens[:, 1:].flatten())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model, optimizer


def fresh_model(seed: int = 99) -> tuple[Llama, torch.optim.AdamW]:
    torch.manual_seed(seed)
    model = Llama(preset("tiny"))
    return model, torch.optim.AdamW(model.parameters(), lr=5e-2)


def assert_same_state(a: tuple[Llama, torch.optim.AdamW], b: tuple[Llama, torch.optim.AdamW]) -> None:
    for (name, x), y in zip(a[0].state_dict().items(), b[0].state_dict().values()):
        assert torch.equal(x, y), name
    state_a, state_b = a[1].state_dict(), b[1].state_dict()
    assert state_a["param_groups"] == state_b["param_groups"]
    for index, entry in state_a["state"].items():
        for key, value in entry.items():
            assert torch.equal(value, state_b["state"][index][key]), (index, key)


def test_round_trip_restores_model_optimizer_rng_and_meta(tmp_path: Path) -> None:
    saved = trained_model()
    checkpoint.save(tmp_path, 7, *saved, meta={"samples_seen": 56, "model": "tiny"})
    after_save = torch.rand(5)
    restored = fresh_model()
    record = checkpoint.load(tmp_path, *restored, expect={"model": "tiny"})
    assert torch.equal(torch.rand(5), after_save)  # RNG continues where the save left it
    assert (record["step"], record["world_size"], record["meta"]["samples_seen"]) == (7, 1, 56)
    assert_same_state(saved, restored)
    # The restored pair keeps training identically to the original.
    tokens = torch.randint(0, 512, (2, 17))
    for model, optimizer in (saved, restored):
        optimizer.zero_grad()
        F.cross_entropy(model(tokens[:, :-1]).flatten(0, 1), tokens[:, 1:].flatten()).backward()
        optimizer.step()
    assert_same_state(saved, restored)


def test_latest_marker_and_pruning(tmp_path: Path) -> None:
    assert checkpoint.latest(tmp_path) is None
    model, optimizer = trained_model(steps=1)
    for step in (1, 2, 3):
        checkpoint.save(tmp_path, step, model, optimizer, keep=2)
    assert checkpoint.latest(tmp_path) == tmp_path / "step_00000003"
    assert sorted(p.name for p in tmp_path.glob("step_*")) == ["step_00000002", "step_00000003"]


def test_crash_during_save_keeps_previous_checkpoint(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    first = trained_model(steps=1)
    checkpoint.save(tmp_path, 1, *first)
    second = trained_model(seed=1, steps=3)
    real_save = checkpoint.dcp.save

    def save_then_die(state, checkpoint_id):
        real_save(state, checkpoint_id=checkpoint_id)
        raise KeyboardInterrupt("killed mid-save")

    monkeypatch.setattr(checkpoint.dcp, "save", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        checkpoint.save(tmp_path, 2, *second)
    assert checkpoint.latest(tmp_path) == tmp_path / "step_00000001"
    restored = fresh_model()
    assert checkpoint.load(tmp_path, *restored)["step"] == 1
    assert_same_state(first, restored)
    monkeypatch.setattr(checkpoint.dcp, "save", real_save)
    checkpoint.save(tmp_path, 2, *second)  # the leftover staging directory is cleaned up
    assert not list(tmp_path.glob(".tmp-*"))
    assert checkpoint.load(tmp_path, *fresh_model())["step"] == 2


def test_truncated_or_missing_files_are_reported(tmp_path: Path) -> None:
    directory = checkpoint.save(tmp_path, 4, *trained_model(steps=1))
    (data_file,) = directory.glob("*.distcp")
    payload = data_file.read_bytes()
    data_file.write_bytes(payload[: len(payload) // 2])
    with pytest.raises(CheckpointError, match="corrupted.*distcp"):
        checkpoint.load(tmp_path, *fresh_model())
    data_file.unlink()
    with pytest.raises(CheckpointError, match="missing"):
        checkpoint.load(tmp_path, *fresh_model())
    (directory / "meta.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="meta.json is corrupted"):
        checkpoint.load(tmp_path, *fresh_model())
    (tmp_path / "latest").write_text("step_00000009\n")
    with pytest.raises(CheckpointError, match="does not exist"):
        checkpoint.load(tmp_path, *fresh_model())


def test_empty_root_is_reported(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="no checkpoint"):
        checkpoint.load(tmp_path, *fresh_model())


def test_mismatched_metadata_and_shapes_are_reported(tmp_path: Path) -> None:
    checkpoint.save(tmp_path, 3, *trained_model(steps=1), meta={"recipe": "bf16"})
    with pytest.raises(CheckpointError, match="recipe: saved 'bf16', now 'fp8'"):
        checkpoint.load(tmp_path, *fresh_model(), expect={"recipe": "fp8"})
    wider = Llama(preset("tiny", ffn_dim=256))
    with pytest.raises(CheckpointError, match="cannot load"):
        checkpoint.load(tmp_path, wider, torch.optim.AdamW(wider.parameters()))


class _RunsCode:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_metadata_with_foreign_globals_is_refused_without_running_them(tmp_path: Path) -> None:
    directory = checkpoint.save(tmp_path, 1, *trained_model(steps=1))
    marker = tmp_path / "code-ran"
    (directory / ".metadata").write_bytes(pickle.dumps(_RunsCode(marker)))
    record = json.loads((directory / "meta.json").read_text())  # a consistent forgery
    record["files"][".metadata"] = (directory / ".metadata").stat().st_size
    (directory / "meta.json").write_text(json.dumps(record))
    with pytest.raises(CheckpointError, match="not allowed"):
        checkpoint.load(tmp_path, *fresh_model())
    assert not marker.exists()


def test_bad_arguments(tmp_path: Path) -> None:
    model, optimizer = fresh_model()
    with pytest.raises(ValueError, match="step"):
        checkpoint.save(tmp_path, -1, model, optimizer)
    with pytest.raises(ValueError, match="keep"):
        checkpoint.save(tmp_path, 1, model, optimizer, keep=0)


def test_crash_while_resaving_a_step_keeps_its_previous_copy(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A re-save of an existing step killed right before its staging directory is renamed into
    place: the previous checkpoint of that step stays loadable, and the next save puts it back."""
    first = trained_model(steps=1)
    checkpoint.save(tmp_path, 5, *first, meta={"saved": "first"})
    real_replace = checkpoint.os.replace

    def die_before_renaming_staging(src, dst):
        if Path(src).name.startswith(".tmp-step_"):
            raise KeyboardInterrupt("killed before the rename")
        real_replace(src, dst)

    monkeypatch.setattr(checkpoint.os, "replace", die_before_renaming_staging)
    with pytest.raises(KeyboardInterrupt):
        checkpoint.save(tmp_path, 5, *trained_model(seed=1, steps=3), meta={"saved": "second"})
    monkeypatch.setattr(checkpoint.os, "replace", real_replace)
    restored = fresh_model()
    assert checkpoint.load(tmp_path, *restored)["meta"] == {"saved": "first"}
    assert_same_state(first, restored)
    checkpoint.save(tmp_path, 6, *trained_model(seed=2, steps=1))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest", "step_00000005", "step_00000006"]
    assert checkpoint.read_meta(tmp_path / "step_00000005")["meta"] == {"saved": "first"}


_VALID_RECORD = {"format": 1, "step": 4, "world_size": 1, "meta": {}, "files": {}}


@pytest.mark.parametrize("content,match", [
    pytest.param("[]", "JSON object.*list", id="list"),
    pytest.param("null", "JSON object.*NoneType", id="null"),
    pytest.param(json.dumps({"format": 1}), "'step' is missing", id="format-only"),
    *[pytest.param(json.dumps({k: v for k, v in _VALID_RECORD.items() if k != field}), f"'{field}' is missing",
                   id=f"no-{field}") for field in ("step", "world_size", "meta", "files")],
    pytest.param(json.dumps({**_VALID_RECORD, "files": []}), "'files' must be", id="files-list"),
    pytest.param(json.dumps({**_VALID_RECORD, "files": {".metadata": "12"}}), "'files' must be", id="size-str"),
    pytest.param(json.dumps({**_VALID_RECORD, "files": {".metadata": -1}}), "'files' must be", id="size-negative"),
    pytest.param(json.dumps({**_VALID_RECORD, "meta": []}), "'meta' must be", id="meta-list"),
    pytest.param(json.dumps({**_VALID_RECORD, "step": True}), "'step' must be", id="step-bool"),
    pytest.param(json.dumps({**_VALID_RECORD, "world_size": 0}), "'world_size' must be", id="world-size-0"),
    pytest.param("[" * 100_000, "meta.json is corrupted", id="nested-too-deep"),
    pytest.param(b"\xff\xfe{}", "meta.json is corrupted", id="not-utf8"),
])
def test_malformed_meta_record_is_a_clear_error(tmp_path: Path, content: str | bytes, match: str) -> None:
    directory = checkpoint.save(tmp_path, 4, *trained_model(steps=1))
    meta_file = directory / "meta.json"
    meta_file.write_bytes(content if isinstance(content, bytes) else content.encode())
    with pytest.raises(CheckpointError, match=match):
        checkpoint.load(tmp_path, *fresh_model(), expect={"recipe": "bf16"})


def test_save_refuses_a_meta_that_is_not_a_dict(tmp_path: Path) -> None:
    with pytest.raises(TypeError, match="meta must be a dict.*list"):
        checkpoint.save(tmp_path / "ckpt", 1, *fresh_model(), meta=["samples_seen", 10])
    assert not (tmp_path / "ckpt").exists()
