"""scripts/build_corpus.py: which files, in which order, cut where."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest
from script_loader import load_script


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    root = tmp_path / "src"
    files = {"b.py": b"bee\n", "a/x.py": b"ex\n", "B.py": b"upper\n", ".hidden/h.py": b"hidden\n",
             "a/.h.py": b"hidden too\n", "big.py": b"x" * 50, "notes.txt": b"text\n", "a/y.py": b"why\n"}
    for name, data in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(data)
    return root


def test_files_in_bytewise_path_order_without_hidden_or_large_ones(tree: Path, tmp_path: Path) -> None:
    out = tmp_path / "corpus.txt"
    summary = load_script("scripts/build_corpus.py").main([str(tree), str(out), "--max-file-bytes", "20"])
    want = b"upper\n" + b"ex\n" + b"why\n" + b"bee\n"  # B.py < a/x.py < a/y.py < b.py bytewise
    assert out.read_bytes() == want
    assert summary == {"files": 4, "bytes": len(want), "sha256": hashlib.sha256(want).hexdigest()}


def test_output_is_cut_at_max_bytes(tree: Path, tmp_path: Path) -> None:
    out = tmp_path / "corpus.txt"
    summary = load_script("scripts/build_corpus.py").build_corpus(tree, out, max_bytes=8, max_file_bytes=20)
    assert out.read_bytes() == b"upper\nex" and summary["files"] == 2 and summary["bytes"] == 8


@pytest.mark.parametrize("argv", [["--max-bytes", "0"], ["--pattern", "*.rs"]])
def test_bad_arguments_are_rejected(tree: Path, tmp_path: Path, argv: list[str]) -> None:
    with pytest.raises(SystemExit):
        load_script("scripts/build_corpus.py").main([str(tree), str(tmp_path / "corpus.txt"), *argv])


def test_file_names_that_are_not_utf8_sort_bytewise(tmp_path: Path) -> None:
    """Linux file names are bytes: a Latin-1 name (not valid UTF-8) is read like any other, in
    the order ``LC_ALL=C sort`` gives (0x7a 'z' < 0xc3, UTF-8's 'é' < 0xe9, Latin-1's 'é')."""
    root = tmp_path / "src"
    root.mkdir()
    names = {b"caf\xe9.py": b"latin-1\n", "café.py".encode(): b"utf-8\n", b"cafz.py": b"z\n"}
    for name, data in names.items():
        with open(os.path.join(os.fsencode(root), name), "wb") as handle:
            handle.write(data)
    out = tmp_path / "corpus.txt"
    summary = load_script("scripts/build_corpus.py").build_corpus(root, out)
    assert out.read_bytes() == b"z\n" + b"utf-8\n" + b"latin-1\n" and summary["files"] == 3


@pytest.mark.parametrize("argv", [["--max-bytes", "0"], ["--pattern", "*.rs"]])
def test_a_failed_build_leaves_the_output_untouched(tree: Path, tmp_path: Path, argv: list[str]) -> None:
    """The corpus is written to a temporary file and renamed into place only when complete:
    a build that fails keeps the earlier file (no partial corpus to train on) and leaves no
    temporary file behind."""
    out = tmp_path / "out" / "corpus.txt"
    out.parent.mkdir()
    out.write_bytes(b"earlier corpus\n")
    with pytest.raises(SystemExit):
        load_script("scripts/build_corpus.py").main([str(tree), str(out), *argv])
    assert out.read_bytes() == b"earlier corpus\n" and list(out.parent.iterdir()) == [out]


def test_a_build_that_dies_part_way_leaves_no_partial_output(tree: Path, tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """A file that cannot be read after others were written: the error propagates and the
    output path does not exist (the partial file is removed)."""
    script = load_script("scripts/build_corpus.py")
    read_bytes = Path.read_bytes

    def unreadable_y(path: Path) -> bytes:
        if path.name == "y.py":
            raise PermissionError(13, "Permission denied", str(path))
        return read_bytes(path)

    monkeypatch.setattr(Path, "read_bytes", unreadable_y)
    out = tmp_path / "out" / "corpus.txt"
    out.parent.mkdir()
    with pytest.raises(PermissionError):
        script.build_corpus(tree, out, max_file_bytes=20)
    assert list(out.parent.iterdir()) == []
