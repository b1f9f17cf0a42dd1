"""scripts/build_corpus.py: which files, in which order, cut where."""

from __future__ import annotations

import hashlib
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
