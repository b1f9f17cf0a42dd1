"""Token streams for pretraining: text files, text directories, pre-tokenized ``.bin`` files.

A corpus is one flat array of token ids (documents separated by an end-of-text token). Text
is tokenized once into a cached ``.bin`` (raw little-endian ``uint16`` or ``uint32``) with a
JSON sidecar ``<file>.json`` holding ``dtype``, ``vocab_size`` and ``tokenizer``; later runs
memory-map it. The default corpus is the Python standard library's own source tree (real
text on every machine with Python, no download), files in sorted order.

The last ``val_fraction`` of the stream is held out for validation. Training reads
non-overlapping windows of ``seq_len + 1`` tokens (inputs and shifted targets) in an order
that is a seeded permutation per epoch, so the sample with global index ``i`` is a pure
function of ``(seed, i)``. A step of a run with ``world_size`` ranks and per-rank batch ``B``
consumes the global indices ``[first, first + world_size * B)``; rank ``r`` takes
``[first + r * B, first + (r + 1) * B)``, so ranks read disjoint windows, and resuming from
the number of samples consumed continues the exact same stream, with any world size.

Tokenizers: ``"byte"`` (UTF-8 bytes 0..255 plus end-of-text 256; the default) or ``"bpe"``
(a byte-level BPE trained on the corpus with the optional ``tokenizers`` package). Either way
the end-of-text id appears only between documents, never for text inside one.
"""

from __future__ import annotations

import hashlib
import json
import os
import sysconfig
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Protocol

import numpy as np
import torch

__all__ = [
    "ByteTokenizer",
    "BPETokenizer",
    "Corpus",
    "ShortStreamError",
    "WindowSampler",
    "atomic_write",
    "bpe_tokenizer_path",
    "default_cache_dir",
    "default_corpus_files",
    "load_corpus",
    "read_token_file",
    "text_files",
    "write_token_file",
]

TOKENIZERS = ("byte", "bpe")
# Part of the cache key of BPE token streams. Change it whenever BPE training or encoding changes,
# so that streams cached by the earlier rule are rebuilt instead of reused.
_BPE_RULES = "documents decoded with U+FFFD replacement; no special tokens in document text"
# A file whose first 8 KiB hold a NUL byte is binary (the rule git uses).
_BINARY_PROBE_BYTES = 8192


class Tokenizer(Protocol):
    name: str
    vocab_size: int
    eot_id: int

    def encode(self, text: bytes) -> np.ndarray: ...

    def decode(self, ids: Iterable[int]) -> str: ...


class ByteTokenizer:
    """UTF-8 bytes as token ids 0..255, end-of-text 256: vocabulary 257, lossless."""

    name = "byte"
    vocab_size = 257
    eot_id = 256

    def encode(self, text: bytes) -> np.ndarray:
        return np.frombuffer(text, dtype=np.uint8).astype(np.uint16)

    def decode(self, ids: Iterable[int]) -> str:
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")


def _document_text(raw: bytes) -> str:
    """A file's text as the BPE sees it, in training and encoding alike: UTF-8 with every
    undecodable byte replaced by U+FFFD (the standard library holds Latin-1 files)."""
    return raw.decode("utf-8", errors="replace")


class BPETokenizer:
    """Byte-level BPE (Sennrich et al. 2016; GPT-2 style) from the ``tokenizers`` package.

    ``train`` learns a vocabulary of ``vocab_size`` on the corpus documents; ``<|endoftext|>``
    is id 0. Document text never encodes to it: the literal text ``<|endoftext|>`` in a file is
    encoded as ordinary text, so the id marks only the boundaries placed between documents.
    """

    name = "bpe"
    eot_token = "<|endoftext|>"

    def __init__(self, tokenizer: object) -> None:
        self._tokenizer = tokenizer
        self._tokenizer.encode_special_tokens = True  # no end-of-text id from document text
        self.vocab_size = tokenizer.get_vocab_size()
        self.eot_id = tokenizer.token_to_id(self.eot_token)

    @classmethod
    def train(cls, files: list[Path], vocab_size: int) -> "BPETokenizer":
        """Learn the merges from ``files``, each one document decoded by ``_document_text``."""
        tokenizers = _import_tokenizers()
        tokenizer = tokenizers.Tokenizer(tokenizers.models.BPE())
        tokenizer.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
        tokenizer.decoder = tokenizers.decoders.ByteLevel()
        trainer = tokenizers.trainers.BpeTrainer(
            vocab_size=vocab_size,
            special_tokens=[cls.eot_token],
            initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
        documents = (_document_text(file.read_bytes()) for file in files)
        tokenizer.train_from_iterator(documents, trainer, length=len(files))
        return cls(tokenizer)

    @classmethod
    def load(cls, path: Path) -> "BPETokenizer":
        return cls(_import_tokenizers().Tokenizer.from_file(str(path)))

    def to_json(self) -> str:
        return self._tokenizer.to_str()

    def encode(self, text: bytes) -> np.ndarray:
        ids = self._tokenizer.encode(_document_text(text)).ids
        return np.asarray(ids, dtype=np.uint32)

    def decode(self, ids: Iterable[int]) -> str:
        """The text of ``ids``; the end-of-text id is dropped (as ``ByteTokenizer`` does)."""
        return self._tokenizer.decode(list(ids))


def _import_tokenizers():
    try:
        import tokenizers
    except ImportError as exc:
        raise ValueError("tokenizer='bpe' needs the optional 'tokenizers' package (pip install tokenizers)") from exc
    if not hasattr(tokenizers.Tokenizer, "encode_special_tokens"):
        raise ValueError(f"tokenizer='bpe' needs tokenizers >= 0.15.1 (found {tokenizers.__version__}): "
                         "pip install -U tokenizers")
    return tokenizers


def default_cache_dir() -> Path:
    """``$LPDIST_CACHE``, else ``~/.cache/lpdist``."""
    return Path(os.environ.get("LPDIST_CACHE", Path.home() / ".cache" / "lpdist"))


def text_files(root: Path) -> list[Path]:
    """Regular, non-hidden, non-binary files under ``root``, sorted by relative path."""
    files = []
    for path in sorted(root.rglob("*")):
        relative = path.relative_to(root)
        if any(part.startswith(".") for part in relative.parts) or not path.is_file():
            continue
        with path.open("rb") as handle:
            if b"\0" not in handle.read(_BINARY_PROBE_BYTES):
                files.append(path)
    return files


def default_corpus_files() -> tuple[Path, list[Path]]:
    """The standard library's ``.py`` files (no third-party ``site-packages``), sorted."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in root.rglob("*.py") if "site-packages" not in p.relative_to(root).parts)
    if not files:
        raise ValueError(f"no Python source files found in the standard library at {root}; pass data= explicitly")
    return root, files


def _check_vocab_size(vocab_size: object, name: str) -> int:
    """``vocab_size`` as an int, refused (as ``name``) unless it is a positive int."""
    if isinstance(vocab_size, bool) or not isinstance(vocab_size, (int, np.integer)) or vocab_size <= 0:
        raise ValueError(f"{name} must be a positive int, got {vocab_size!r}")
    return int(vocab_size)


def _check_token_ids(tokens: np.ndarray, vocab_size: int, source: str) -> None:
    """Every id of ``tokens`` (an integer array) in ``[0, vocab_size)``. One vectorised pass for
    unsigned ids (about 15 ms per 100M uint16 tokens in memory); signed ids take a second one."""
    if not tokens.size:
        return
    if np.issubdtype(tokens.dtype, np.signedinteger) and int(tokens.min()) < 0:
        raise ValueError(f"{source} holds a negative token id {int(tokens.min())}")
    largest = int(tokens.max())
    if largest >= vocab_size:
        raise ValueError(f"{source} holds token id {largest}, outside the vocabulary of size {vocab_size}")


def write_token_file(path: Path, tokens: np.ndarray, *, vocab_size: int, tokenizer: str) -> None:
    """Write ``tokens`` as a raw ``.bin`` (uint16 if the vocabulary fits, else uint32) and
    its JSON sidecar, each atomically (temporary file, then rename; sidecar last).

    ``tokens`` must be integer ids in ``[0, vocab_size)``; anything else is refused before a
    byte is written (a cast would wrap negative ids and truncate fractional ones).
    """
    vocab_size = _check_vocab_size(vocab_size, "vocab_size")
    tokens = np.asarray(tokens)
    if not np.issubdtype(tokens.dtype, np.integer):
        raise TypeError(f"tokens must be integer token ids, got dtype {tokens.dtype}")
    _check_token_ids(tokens, vocab_size, "tokens")
    dtype = np.uint16 if vocab_size <= 2**16 else np.uint32
    atomic_write(path, tokens.astype(dtype).tobytes())
    meta = {"dtype": np.dtype(dtype).name, "vocab_size": vocab_size, "tokenizer": tokenizer, "n_tokens": int(tokens.size)}
    atomic_write(_sidecar(path), json.dumps(meta, indent=1).encode())


def read_token_file(path: Path, dtype: str | None = None) -> tuple[np.ndarray, int, str]:
    """Memory-map a ``.bin`` token file: returns ``(tokens, vocab_size, tokenizer name)``.

    The dtype comes from the sidecar, else ``dtype``, else ``uint16`` (the nanoGPT
    convention); without a sidecar the vocabulary is ``max(tokens) + 1``. Every id is checked
    against the sidecar's vocabulary (one pass over the file), so no id outside the model's
    embedding table reaches a batch.
    """
    path = Path(path)
    tokens, meta = _map_token_file(path, dtype)
    if "vocab_size" in meta:
        vocab_size = _check_vocab_size(meta["vocab_size"], f"vocab_size in {_sidecar(path)}")
        _check_token_ids(tokens, vocab_size, str(path))
    else:
        vocab_size = int(tokens.max()) + 1
    return tokens, vocab_size, meta.get("tokenizer", "unknown")


def _map_token_file(path: Path, dtype: str | None) -> tuple[np.memmap, dict]:
    """The ``.bin`` token file ``path`` memory-mapped, and its sidecar's entries (``{}``
    without one), after checking the dtype (the sidecar's, else ``dtype``, else ``uint16``)
    and that the file holds a whole, non-zero number of tokens. Reads no token id."""
    meta = json.loads(_sidecar(path).read_text()) if _sidecar(path).exists() else {}
    dtype = meta.get("dtype", dtype or "uint16")
    if dtype not in ("uint16", "uint32"):
        raise ValueError(f"token file dtype must be 'uint16' or 'uint32', got {dtype!r}")
    size = path.stat().st_size
    if size == 0:
        raise ValueError(f"token file {path} is empty: a corpus needs at least one token")
    if size % np.dtype(dtype).itemsize:
        raise ValueError(f"{path} has {size} bytes, not a whole number of {dtype} tokens")
    return np.memmap(path, dtype=dtype, mode="r"), meta


@dataclass
class Corpus:
    """A tokenized corpus split into a training stream and a held-out tail."""

    train: np.ndarray
    val: np.ndarray
    vocab_size: int
    tokenizer: str
    source: str


def load_corpus(
    data: str | os.PathLike | None = None,
    *,
    tokenizer: str = "byte",
    bpe_vocab_size: int = 32000,
    cache_dir: str | os.PathLike | None = None,
    val_fraction: float = 0.005,
    dtype: str | None = None,
) -> Corpus:
    """Load ``data``: ``None`` (the standard library source), a text file, a directory of
    text files, or a pre-tokenized ``.bin`` (``dtype`` when it has no sidecar).

    Text is tokenized once into ``cache_dir`` (default ``default_cache_dir()``), keyed by
    the tokenizer and the files' names, sizes and modification times. Safe to call from
    several processes at once (each cache file appears by an atomic rename).
    """
    if tokenizer not in TOKENIZERS:
        raise ValueError(f"tokenizer must be one of {TOKENIZERS}, got {tokenizer!r}")
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    if data is not None and str(data).endswith(".bin"):
        tokens, vocab_size, tokenizer_name = read_token_file(Path(data), dtype)
        source = str(data)
    else:
        root, files = _text_sources(data)
        cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
        tokens, vocab_size = _cached_tokens(root, files, tokenizer, bpe_vocab_size, cache)
        tokenizer_name, source = tokenizer, str(root if data is None else data)
    split = len(tokens) - max(1, int(len(tokens) * val_fraction))
    return Corpus(tokens[:split], tokens[split:], vocab_size, tokenizer_name, source)


def _text_sources(data: str | os.PathLike | None) -> tuple[Path, list[Path]]:
    if data is None:
        return default_corpus_files()
    path = Path(data)
    if path.is_file():
        return path.parent, [path]
    if path.is_dir():
        files = text_files(path)
        if not files:
            raise ValueError(f"data directory {path} holds no text files")
        return path, files
    raise ValueError(f"data must be a text file, a directory of text files or a .bin token file; {path} does not exist")


def _cached_tokens(root: Path, files: list[Path], tokenizer: str, bpe_vocab_size: int, cache: Path) -> tuple[np.ndarray, int]:
    rules = f":{_BPE_RULES}" if tokenizer == "bpe" else ""
    fingerprint = hashlib.sha256(f"{tokenizer}:{bpe_vocab_size}{rules}".encode())
    for file in files:
        stat = file.stat()
        fingerprint.update(f"{file.relative_to(root)}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    bin_path = cache / f"{root.name or 'corpus'}-{tokenizer}-{fingerprint.hexdigest()[:16]}.bin"
    if not _sidecar(bin_path).exists():
        return _build_token_cache(bin_path, files, tokenizer, bpe_vocab_size)
    tokens, vocab_size, _ = read_token_file(bin_path)
    return tokens, vocab_size


def _build_token_cache(bin_path: Path, files: list[Path], tokenizer: str, bpe_vocab_size: int) -> tuple[np.ndarray, int]:
    """Tokenize ``files`` (each followed by end-of-text) into the token file ``bin_path`` and
    memory-map it: ``(tokens, vocab_size)``. ``write_token_file`` checks every id against the
    vocabulary, so mapping the file back reads no id again (``read_token_file`` would)."""
    bin_path.parent.mkdir(parents=True, exist_ok=True)
    encoder = _make_tokenizer(tokenizer, files, bpe_vocab_size, bin_path)
    pieces = []
    for file in files:
        pieces.append(encoder.encode(file.read_bytes()))
        pieces.append(np.array([encoder.eot_id], dtype=pieces[-1].dtype))
    write_token_file(bin_path, np.concatenate(pieces), vocab_size=encoder.vocab_size, tokenizer=tokenizer)
    tokens, _ = _map_token_file(bin_path, None)
    return tokens, encoder.vocab_size


def _make_tokenizer(name: str, files: list[Path], bpe_vocab_size: int, bin_path: Path) -> Tokenizer:
    if name == "byte":
        return ByteTokenizer()
    bpe = BPETokenizer.train(files, bpe_vocab_size)
    atomic_write(bpe_tokenizer_path(bin_path), bpe.to_json().encode())
    return bpe


def bpe_tokenizer_path(bin_path: Path) -> Path:
    """Where the BPE tokenizer learned for a cached ``.bin`` is kept (``BPETokenizer.load``)."""
    return bin_path.with_suffix(".tokenizer.json")


def _sidecar(path: Path) -> Path:
    return path.with_name(path.name + ".json")


def atomic_write(path: Path, payload: bytes) -> None:
    """Replace ``path`` by a file holding ``payload`` (mode 0644) in one step: a temporary file in
    the same directory is written, flushed to disk and renamed over ``path``, so a reader or a
    crash sees the old file or the whole new one, never a partial write."""
    handle = tempfile.NamedTemporaryFile(dir=path.parent, prefix=f".{path.name}.", delete=False)
    try:
        with handle:
            handle.write(payload)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(handle.name, 0o644)
        os.replace(handle.name, path)
    except BaseException:
        Path(handle.name).unlink(missing_ok=True)
        raise


class ShortStreamError(ValueError):
    """A token stream shorter than one window of ``seq_len + 1`` tokens, refused by ``WindowSampler``."""


class WindowSampler:
    """Batches of ``seq_len + 1``-token windows from one token stream.

    Window ``w`` is ``tokens[w * seq_len : w * seq_len + seq_len + 1]`` (consecutive windows
    share one token: the last target of one is the first input of the next). Global sample
    ``i`` is window ``order_e[i mod W]`` of epoch ``e = i // W``, with ``order_e`` a
    permutation seeded by ``(seed, e)`` (``shuffle=False``: the identity, for validation).
    A stream shorter than one window is refused with ``ShortStreamError``.
    """

    def __init__(self, tokens: np.ndarray, seq_len: int, *, seed: int = 0, shuffle: bool = True) -> None:
        if isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len <= 0:
            raise ValueError(f"seq_len must be a positive int, got {seq_len!r}")
        # The epoch permutations come from np.random.SeedSequence([seed, epoch]): non-negative ints only.
        if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
            raise ValueError(f"seed must be a non-negative int, got {seed!r}")
        if not isinstance(tokens, np.ndarray) or tokens.ndim != 1 or not np.issubdtype(tokens.dtype, np.integer):
            raise TypeError(f"tokens must be a 1-D integer numpy array, got "
                            f"{getattr(tokens, 'dtype', type(tokens).__name__)} {getattr(tokens, 'shape', '')}")
        self.n_windows = (len(tokens) - 1) // seq_len
        if self.n_windows < 1:
            raise ShortStreamError(f"a stream of {len(tokens)} tokens holds no window of seq_len + 1 = {seq_len + 1} tokens")
        self.tokens = tokens
        self.seq_len = seq_len
        self.seed = seed
        self.shuffle = shuffle
        self._order_epoch = -1
        self._order = np.arange(self.n_windows)

    def _window_order(self, epoch: int) -> np.ndarray:
        if self.shuffle and epoch != self._order_epoch:
            rng = np.random.default_rng(np.random.SeedSequence([self.seed, epoch]))
            self._order = rng.permutation(self.n_windows)
            self._order_epoch = epoch
        return self._order

    def sample(self, index: int) -> np.ndarray:
        """The ``seq_len + 1`` tokens of global sample ``index``."""
        if index < 0:
            raise ValueError(f"sample index must be non-negative, got {index}")
        epoch, position = divmod(index, self.n_windows)
        start = int(self._window_order(epoch)[position]) * self.seq_len
        return np.asarray(self.tokens[start : start + self.seq_len + 1], dtype=np.int64)

    def batch(
        self, first_sample: int, rank: int, batch_size: int, device: torch.device | str = "cpu"
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(inputs, targets)``, each int64 [batch_size, seq_len], for ``rank``'s share of
        the global batch starting at sample ``first_sample``."""
        if rank < 0 or batch_size <= 0:
            raise ValueError(f"rank must be >= 0 and batch_size > 0, got rank={rank}, batch_size={batch_size}")
        first = first_sample + rank * batch_size
        windows = torch.from_numpy(np.stack([self.sample(first + b) for b in range(batch_size)]))
        windows = windows.to(device, non_blocking=True)
        return windows[:, :-1], windows[:, 1:]
