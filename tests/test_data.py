"""Token streams: tokenization, caching, .bin files, deterministic disjoint sampling."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

import lpdist.data
from lpdist.data import (
    ByteTokenizer,
    ShortStreamError,
    WindowSampler,
    atomic_write,
    default_corpus_files,
    load_corpus,
    read_token_file,
    text_files,
    write_token_file,
)

EOT = ByteTokenizer.eot_id


def make_text_dir(root: Path, seed: int = 0) -> list[bytes]:
    """Three UTF-8 text files (one non-ASCII), a hidden file and a binary file."""
    rng = np.random.default_rng(seed)
    texts = [
        " ".join(f"word{rng.integers(1000)}" for _ in range(400)).encode(),
        "naïve café ünïcode ✓ ".encode() * 50,
        bytes(rng.integers(32, 127, size=3000, dtype=np.uint8)),
    ]
    (root / "sub").mkdir(parents=True)
    (root / "b.txt").write_bytes(texts[0])
    (root / "sub" / "c.py").write_bytes(texts[2])
    (root / "a.md").write_bytes(texts[1])
    (root / ".hidden").write_bytes(b"not part of the corpus")
    (root / "blob.bin.dat").write_bytes(b"\x00\x01binary")
    return [texts[1], texts[0], texts[2]]  # sorted order: a.md, b.txt, sub/c.py


def test_byte_tokenizer_round_trip() -> None:
    text = "héllo wörld ∑ 🙂 tab\tnewline\n"
    ids = ByteTokenizer().encode(text.encode())
    assert list(ids) == list(text.encode())
    assert ByteTokenizer().decode([*ids, EOT]) == text


def test_text_files_are_sorted_and_skip_hidden_and_binary(tmp_path: Path) -> None:
    make_text_dir(tmp_path)
    assert [p.relative_to(tmp_path).as_posix() for p in text_files(tmp_path)] == ["a.md", "b.txt", "sub/c.py"]


def test_directory_corpus_is_files_in_order_with_end_of_text(tmp_path: Path) -> None:
    texts = make_text_dir(tmp_path / "corpus")
    corpus = load_corpus(tmp_path / "corpus", cache_dir=tmp_path / "cache", val_fraction=0.1)
    expected = np.concatenate([np.append(np.frombuffer(t, dtype=np.uint8).astype(np.int64), EOT) for t in texts])
    stream = np.concatenate([corpus.train, corpus.val]).astype(np.int64)
    np.testing.assert_array_equal(stream, expected)
    assert len(corpus.val) == int(len(expected) * 0.1)
    assert corpus.vocab_size == 257 and corpus.tokenizer == "byte"


def test_cache_is_reused_and_invalidated_by_a_changed_file(tmp_path: Path) -> None:
    make_text_dir(tmp_path / "corpus")
    load_corpus(tmp_path / "corpus", cache_dir=tmp_path / "cache")
    (cached,) = (tmp_path / "cache").glob("*.bin")
    before = cached.stat().st_mtime_ns
    load_corpus(tmp_path / "corpus", cache_dir=tmp_path / "cache")
    assert cached.stat().st_mtime_ns == before
    (tmp_path / "corpus" / "b.txt").write_bytes(b"changed text " * 100)
    corpus = load_corpus(tmp_path / "corpus", cache_dir=tmp_path / "cache", val_fraction=0.01)
    assert len(list((tmp_path / "cache").glob("*.bin"))) == 2
    assert b"changed text" in bytes(np.asarray(corpus.train[: 2000], dtype=np.uint8))


def test_fresh_cache_checks_the_token_ids_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Building the cache checks the ids as they are written and maps the file back without a
    second pass; a later load from the cache checks the file once. Both give the same stream."""
    checked = []
    check_token_ids = lpdist.data._check_token_ids

    def counting_check(tokens: np.ndarray, vocab_size: int, source: str) -> None:
        checked.append(source)
        check_token_ids(tokens, vocab_size, source)

    monkeypatch.setattr(lpdist.data, "_check_token_ids", counting_check)
    make_text_dir(tmp_path / "corpus")
    fresh = load_corpus(tmp_path / "corpus", cache_dir=tmp_path / "cache")
    assert checked == ["tokens"]
    cached = load_corpus(tmp_path / "corpus", cache_dir=tmp_path / "cache")
    (cached_file,) = (tmp_path / "cache").glob("*.bin")
    assert checked == ["tokens", str(cached_file)]
    for split in ("train", "val"):
        assert isinstance(getattr(fresh, split), np.memmap) and getattr(fresh, split).dtype == np.uint16
        np.testing.assert_array_equal(getattr(fresh, split), getattr(cached, split))
    assert fresh.vocab_size == cached.vocab_size == 257


def test_single_text_file(tmp_path: Path) -> None:
    (tmp_path / "one.txt").write_text("abc" * 100)
    corpus = load_corpus(tmp_path / "one.txt", cache_dir=tmp_path / "cache", val_fraction=0.1)
    assert len(corpus.train) + len(corpus.val) == 301


@pytest.mark.parametrize("vocab_size, dtype", [(1000, "uint16"), (100_000, "uint32")])
def test_token_file_round_trip(tmp_path: Path, vocab_size: int, dtype: str) -> None:
    tokens = np.random.default_rng(1).integers(0, vocab_size, size=5000)
    write_token_file(tmp_path / "t.bin", tokens, vocab_size=vocab_size, tokenizer="custom")
    assert json.loads((tmp_path / "t.bin.json").read_text())["dtype"] == dtype
    assert (tmp_path / "t.bin").stat().st_size == 5000 * np.dtype(dtype).itemsize
    corpus = load_corpus(tmp_path / "t.bin", val_fraction=0.2)
    np.testing.assert_array_equal(np.concatenate([corpus.train, corpus.val]), tokens)
    assert (corpus.vocab_size, corpus.tokenizer, len(corpus.val)) == (vocab_size, "custom", 1000)


def test_bin_without_sidecar_uses_given_dtype(tmp_path: Path) -> None:
    tokens = np.random.default_rng(2).integers(0, 70_000, size=999).astype(np.uint32)
    (tmp_path / "raw.bin").write_bytes(tokens.tobytes())
    read, vocab_size, _ = read_token_file(tmp_path / "raw.bin", "uint32")
    np.testing.assert_array_equal(read, tokens)
    assert vocab_size == int(tokens.max()) + 1
    (tmp_path / "odd.bin").write_bytes(b"\x01\x02\x03")
    with pytest.raises(ValueError, match="whole number"):
        read_token_file(tmp_path / "odd.bin")
    with pytest.raises(ValueError, match="dtype"):
        read_token_file(tmp_path / "raw.bin", "int8")


@pytest.mark.parametrize(
    "tokens, vocab_size, error, message",
    [
        ([1, 2, 300], 257, ValueError, "outside the vocabulary"),
        ([5, -1, 7], 257, ValueError, "negative"),  # would wrap to 65535 in uint16
        ([5, -1, 7], 100_000, ValueError, "negative"),  # would wrap to 2**32 - 1 in uint32
        ([1.9, 2.5], 257, TypeError, "integer"),  # would be truncated to 1, 2
        ([1, 2], 0, ValueError, "vocab_size"),
    ],
)
def test_write_rejects_ids_outside_vocabulary(tmp_path: Path, tokens: list, vocab_size: int, error: type,
                                              message: str) -> None:
    with pytest.raises(error, match=message):
        write_token_file(tmp_path / "t.bin", np.array(tokens), vocab_size=vocab_size, tokenizer="byte")
    assert not (tmp_path / "t.bin").exists() and not (tmp_path / "t.bin.json").exists()


def test_read_rejects_ids_outside_the_sidecar_vocabulary(tmp_path: Path) -> None:
    """A sidecar that understates the vocabulary would send ids past the embedding table."""
    tokens = np.random.default_rng(3).integers(0, 257, size=1000).astype(np.uint16)
    tokens[617] = 900
    tokens.tofile(tmp_path / "bad.bin")
    (tmp_path / "bad.bin.json").write_text(json.dumps({"dtype": "uint16", "vocab_size": 257, "tokenizer": "byte"}))
    with pytest.raises(ValueError, match=r"bad\.bin holds token id 900.*vocabulary of size 257"):
        read_token_file(tmp_path / "bad.bin")
    with pytest.raises(ValueError, match="outside the vocabulary"):
        load_corpus(tmp_path / "bad.bin")
    (tmp_path / "bad.bin.json").write_text(json.dumps({"dtype": "uint16", "vocab_size": -3, "tokenizer": "byte"}))
    with pytest.raises(ValueError, match="vocab_size"):
        read_token_file(tmp_path / "bad.bin")


def test_empty_token_file_is_refused_naming_it(tmp_path: Path) -> None:
    write_token_file(tmp_path / "empty.bin", np.zeros(0, np.uint16), vocab_size=257, tokenizer="byte")
    with pytest.raises(ValueError, match=r"empty\.bin is empty"):
        load_corpus(tmp_path / "empty.bin")


@pytest.mark.parametrize(
    "kwargs, message",
    [({"tokenizer": "word"}, "tokenizer"), ({"val_fraction": 1.5}, "val_fraction"), ({"data": "/no/such/path"}, "does not exist")],
)
def test_bad_arguments(tmp_path: Path, kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        load_corpus(**{"data": tmp_path, **kwargs})


def test_sampler_windows_are_shifted_slices_and_an_epoch_is_a_permutation() -> None:
    tokens = np.arange(1001) % 50_000
    sampler = WindowSampler(tokens, seq_len=10, seed=3)
    assert sampler.n_windows == 100
    starts = []
    for index in range(100):
        window = sampler.sample(index)
        np.testing.assert_array_equal(window, tokens[window[0] : window[0] + 11])
        starts.append(int(window[0]))
    assert sorted(starts) == list(range(0, 1000, 10))
    assert starts != sorted(starts)  # shuffled
    second_epoch = [int(sampler.sample(100 + i)[0]) for i in range(100)]
    assert sorted(second_epoch) == sorted(starts) and second_epoch != starts
    inputs, targets = sampler.batch(0, rank=0, batch_size=4)
    assert inputs.shape == targets.shape == (4, 10)
    np.testing.assert_array_equal(inputs[:, 1:].numpy(), targets[:, :-1].numpy())


def test_batches_are_pure_functions_disjoint_across_ranks_and_world_size_independent() -> None:
    tokens = np.random.default_rng(4).integers(0, 257, size=20_000)

    def global_stream(world_size: int, batch_size: int, steps: int) -> list[tuple[int, ...]]:
        sampler = WindowSampler(tokens, seq_len=16, seed=7)
        rows = []
        for step in range(steps):
            for rank in range(world_size):
                inputs, _ = sampler.batch(step * world_size * batch_size, rank, batch_size)
                rows.extend(tuple(row.tolist()) for row in inputs)
        return rows

    two_ranks = global_stream(2, 3, 4)
    assert len(set(two_ranks)) == len(two_ranks) == 24  # disjoint windows
    assert global_stream(3, 2, 4) == two_ranks  # same global stream at another world size
    fresh = WindowSampler(tokens, seq_len=16, seed=7).batch(6 * 3, 1, 3)[0]
    assert [tuple(r.tolist()) for r in fresh] == two_ranks[21:24]  # resume from any step
    other_seed = WindowSampler(tokens, seq_len=16, seed=8).batch(0, 0, 3)[0]
    assert [tuple(r.tolist()) for r in other_seed] != two_ranks[:3]


def test_validation_sampler_is_in_order() -> None:
    tokens = np.arange(101)
    sampler = WindowSampler(tokens, seq_len=10, shuffle=False)
    assert [int(sampler.sample(i)[0]) for i in range(12)] == [0, 10, 20, 30, 40, 50, 60, 70, 80, 90, 0, 10]


def test_sampler_rejects_short_streams_and_bad_arguments() -> None:
    with pytest.raises(ShortStreamError, match="no window"):
        WindowSampler(np.arange(10), seq_len=10)
    with pytest.raises(ValueError, match="seq_len"):
        WindowSampler(np.arange(10), seq_len=0)
    with pytest.raises(ValueError, match="batch_size"):
        WindowSampler(np.arange(100), seq_len=4).batch(0, 0, 0)
    for seed in (-1, 1.5, True, "0"):  # numpy's SeedSequence takes only non-negative ints
        with pytest.raises(ValueError, match="seed"):
            WindowSampler(np.arange(100), seq_len=4, seed=seed)
    assert WindowSampler(np.arange(100), seq_len=4, seed=np.int64(2**40)).batch(0, 0, 2)[0].shape == (2, 4)


def test_default_corpus_is_the_standard_library(tmp_path: Path) -> None:
    root, files = default_corpus_files()
    assert files == sorted(files) and all(f.suffix == ".py" for f in files)
    assert root / "os.py" in files and not any("site-packages" in f.parts for f in files)
    corpus = load_corpus(cache_dir=tmp_path)
    head = files[0].read_bytes()[:1000]
    np.testing.assert_array_equal(np.asarray(corpus.train[: len(head)]), np.frombuffer(head, dtype=np.uint8))
    total = sum(f.stat().st_size for f in files) + len(files)
    assert len(corpus.train) + len(corpus.val) == total


def bpe_documents(corpus_dir: Path, cache_dir: Path, vocab_size: int) -> tuple[object, list[list[int]]]:
    """Load ``corpus_dir`` with the BPE tokenizer; return the learned tokenizer and the token
    stream cut at its end-of-text ids (one list of ids per document)."""
    pytest.importorskip("tokenizers", reason="optional dependency 'tokenizers' is not installed")
    from lpdist.data import BPETokenizer, bpe_tokenizer_path

    corpus = load_corpus(corpus_dir, tokenizer="bpe", bpe_vocab_size=vocab_size, cache_dir=cache_dir)
    assert corpus.tokenizer == "bpe" and 256 < corpus.vocab_size <= vocab_size
    (cached,) = cache_dir.glob("*.bin")
    bpe = BPETokenizer.load(bpe_tokenizer_path(cached))
    stream = np.concatenate([corpus.train, corpus.val])
    documents, start = [], 0
    for end in np.flatnonzero(stream == bpe.eot_id):
        documents.append(stream[start:end].tolist())
        start = end + 1
    assert start == len(stream)  # the last document ends with end-of-text too
    return bpe, documents


def test_bpe_tokenizer_trains_on_the_corpus(tmp_path: Path) -> None:
    texts = make_text_dir(tmp_path / "corpus")
    bpe, documents = bpe_documents(tmp_path / "corpus", tmp_path / "cache", 400)
    assert [bpe.decode(doc) for doc in documents] == [t.decode() for t in texts]
    assert sum(map(len, documents)) < 0.8 * sum(map(len, texts))  # merges make fewer tokens than bytes


def test_bpe_reads_files_that_are_not_utf8(tmp_path: Path) -> None:
    """Training and encoding both replace undecodable bytes with U+FFFD (the standard library,
    the default corpus, holds Latin-1 files)."""
    latin1 = "caf\xe9 na\xefve r\xe9sum\xe9, d\xe9j\xe0 vu\n".encode("latin-1") * 20
    utf8 = " ".join(f"word{i % 37}" for i in range(300)).encode()
    (tmp_path / "corpus").mkdir()
    (tmp_path / "corpus" / "a.txt").write_bytes(latin1)
    (tmp_path / "corpus" / "b.txt").write_bytes(utf8)
    bpe, documents = bpe_documents(tmp_path / "corpus", tmp_path / "cache", 320)
    assert [bpe.decode(doc) for doc in documents] == [latin1.decode("utf-8", errors="replace"), utf8.decode()]


def test_bpe_document_text_never_yields_end_of_text(tmp_path: Path) -> None:
    """The literal text of the end-of-text token inside a file is ordinary text, not a
    document boundary."""
    text = "documents are joined with <|endoftext|> between them; <|endoftext|>!\n" * 30
    (tmp_path / "corpus").mkdir()
    (tmp_path / "corpus" / "a.txt").write_text(text)
    (tmp_path / "corpus" / "b.txt").write_text("a second document " * 20)
    bpe, documents = bpe_documents(tmp_path / "corpus", tmp_path / "cache", 300)
    assert len(documents) == 2
    assert bpe.decode(documents[0]) == text


def test_atomic_write_replaces_the_file_whole_with_mode_0644(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Used by the token cache and the checkpoint markers: the payload is synced to disk before
    the rename, the file is readable by all, and no temporary file is left behind."""
    synced = []
    real_fsync = lpdist.data.os.fsync
    monkeypatch.setattr(lpdist.data.os, "fsync", lambda fd: (synced.append(fd), real_fsync(fd)))
    path = tmp_path / "latest"
    path.write_text("old\n")
    atomic_write(path, b"step_00000002\n")
    assert path.read_bytes() == b"step_00000002\n" and len(synced) == 1
    assert path.stat().st_mode & 0o777 == 0o644
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest"]
