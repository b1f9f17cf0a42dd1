"""Concatenate the text files of a source tree into one corpus file, reproducibly.

    python scripts/build_corpus.py "$(python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')" \
        /tmp/corpus.txt --pattern '*.py' --max-bytes 250e6

Files matching ``--pattern`` under ROOT (recursively, hidden paths skipped) that are no larger
than ``--max-file-bytes`` are read in sorted relative-path order (bytewise, like ``LC_ALL=C
sort``) and written back to back; the output stops at ``--max-bytes``. The same tree gives the
same bytes, so every recipe of a loss-parity study (and every machine with the same packages)
trains on the same text: the script prints the file count, byte count and SHA-256 to compare.
The corpus is written to a temporary file next to the output and renamed into place once
complete, so a build that fails part way leaves no partial corpus (an earlier one stays).
Pass the output to ``examples/pretrain_llama.py --data`` (byte tokens: one token per byte).
"""

from __future__ import annotations

import argparse
import hashlib
import os
import sys
from pathlib import Path


def corpus_files(root: Path, pattern: str, max_file_bytes: int) -> list[Path]:
    """Regular files under ``root`` matching ``pattern``, at most ``max_file_bytes`` each, no
    hidden path component, sorted by their relative path's bytes (file names are bytes on
    Linux and need not be valid UTF-8: ``os.fsencode`` gives them back as stored)."""
    files = [path for path in root.rglob(pattern)
             if path.is_file() and not any(part.startswith(".") for part in path.relative_to(root).parts)
             and path.stat().st_size <= max_file_bytes]
    return sorted(files, key=lambda path: os.fsencode(path.relative_to(root)))


def build_corpus(root: Path, out: Path, *, pattern: str = "*.py", max_bytes: int = 250_000_000,
                 max_file_bytes: int = 1_000_000) -> dict:
    """Write the concatenation of ``corpus_files(root, ...)`` to ``out``, cut at ``max_bytes``
    (through a temporary file renamed to ``out`` on success; on any error ``out`` is left as
    it was). Returns ``{"files", "bytes", "sha256"}`` of what was written."""
    if max_bytes <= 0 or max_file_bytes <= 0:
        raise ValueError(f"max_bytes and max_file_bytes must be positive, got {max_bytes}, {max_file_bytes}")
    if not root.is_dir():
        raise ValueError(f"root must be a directory, got {root}")
    files = corpus_files(root, pattern, max_file_bytes)
    digest, written, used = hashlib.sha256(), 0, 0
    partial = out.with_name(f".{out.name}.partial")
    try:
        with partial.open("wb") as sink:
            for path in files:
                data = path.read_bytes()[:max_bytes - written]
                sink.write(data)
                digest.update(data)
                written += len(data)
                used += 1
                if written == max_bytes:
                    break
        if written == 0:
            raise ValueError(f"no non-empty file under {root} matches {pattern!r}")
        partial.replace(out)
    finally:
        partial.unlink(missing_ok=True)
    return {"files": used, "bytes": written, "sha256": digest.hexdigest()}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("root", type=Path)
    parser.add_argument("out", type=Path)
    parser.add_argument("--pattern", default="*.py", help="file name pattern (glob), default '*.py'")
    parser.add_argument("--max-bytes", type=float, default=250e6, help="corpus size cap (e.g. 250e6)")
    parser.add_argument("--max-file-bytes", type=float, default=1e6, help="skip larger files (generated code, data)")
    args = parser.parse_args(argv)
    try:
        summary = build_corpus(args.root, args.out, pattern=args.pattern, max_bytes=int(args.max_bytes),
                               max_file_bytes=int(args.max_file_bytes))
    except ValueError as error:
        parser.error(str(error))
    print(f"{args.out}: {summary['files']} files, {summary['bytes']:,} bytes, sha256 {summary['sha256']}")
    return summary


if __name__ == "__main__":
    main(sys.argv[1:])
