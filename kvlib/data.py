"""The training corpus and a byte-level BPE tokenizer for the book's small model.

Corpus: the English fortune-cookie files Debian ships in `fortunes` and `fortunes-min`
(BSD licence, see kvlib/assets/CORPUS.md), cleaned and stored compressed in kvlib/assets, so
nothing is downloaded at training or test time. Documents (one fortune each) are split into
train and validation by a hash of their text: the split never depends on file order.

Tokenizer: byte-level BPE. Ids 0..255 are the raw bytes, 256 .. 256+M-1 the M learned merges
(each joins two earlier ids), and the last id is `<|endoftext|>`, which ends every document.
Text is first cut into pieces (words with their leading space, numbers, punctuation runs,
whitespace runs) and merges never cross a piece boundary. Any string round-trips:
decode(encode(s)) == s.

Shapes: `encode` returns a flat list of V-range ids; `encode_corpus` returns a 1-D int64
tensor of all documents, each followed by the end-of-text id.
"""

from __future__ import annotations

import hashlib
import json
import lzma
import numbers
import re
import zlib
from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from pathlib import Path

import torch

from kvlib.errors import (
    AssetError,
    KVLibIndexError,
    KVLibTypeError,
    KVLibValueError,
    MissingFileError,
)

DATA_DIR = Path(__file__).resolve().parent / "assets"
CORPUS_PATH = DATA_DIR / "fortunes.txt.xz"
TOKENIZER_PATH = DATA_DIR / "tokenizer.json"

DOC_SEPARATOR = "\n%\n"  # the fortune file format: documents separated by a line "%"
EOT = "<|endoftext|>"
VAL_PER_MILLE = 50  # documents whose hash falls below this (of 1000) are held out: 5 %

# Files of the Debian packages left out of the corpus: pictures made of characters, group
# stereotypes, and a file of non-English text.
EXCLUDED_FILES = ("ascii-art", "ethnic", "men-women", "translate-me")

# Pre-tokenization: contractions, words and numbers with one optional leading space, runs of
# other symbols, whitespace (a run of spaces keeps its last space for the next word).
PIECE_RE = re.compile(r"'(?:[sdmt]|ll|ve|re)| ?[A-Za-z]+| ?[0-9]+| ?[^\sA-Za-z0-9]+|\s+(?!\S)|\s+")


# ---- corpus --------------------------------------------------------------------------------


def build_corpus(source_dir: str | Path) -> list[str]:
    """Read Debian's fortune files (e.g. /usr/share/games/fortunes) into cleaned documents.

    Each `%`-separated entry becomes one document with trailing spaces stripped; entries that
    are empty or repeated are dropped. Files are read in sorted order.
    """
    source = Path(source_dir)
    if not source.is_dir():
        raise MissingFileError(
            f"{source} is not a directory; install Debian's fortune files first "
            "(apt-get install fortunes fortunes-min) or pass their directory"
        )
    files = sorted(
        p
        for p in source.iterdir()
        if p.is_file() and not p.is_symlink() and "." not in p.name and p.name not in EXCLUDED_FILES
    )
    if not files:
        raise MissingFileError(f"no fortune files (names without a dot) in {source}")
    docs: dict[str, None] = {}  # ordered set
    for path in files:
        text = path.read_text(encoding="utf-8")
        for entry in re.split(r"^%$", text, flags=re.MULTILINE):
            doc = "\n".join(line.rstrip() for line in entry.strip("\n").split("\n")).strip("\n")
            if doc.strip():
                docs[doc] = None
    return list(docs)


def save_corpus(docs: Sequence[str], path: str | Path = CORPUS_PATH) -> str:
    """Write documents xz-compressed in fortune format; return the text's sha256."""
    text = DOC_SEPARATOR.join(docs) + "\n"
    Path(path).write_bytes(lzma.compress(text.encode("utf-8"), preset=9 | lzma.PRESET_EXTREME))
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def read_json(path: str | Path, expected: str) -> object:
    """The JSON value in `path`; a file that does not parse raises AssetError naming it."""
    path = Path(path)
    if not path.is_file():
        raise MissingFileError(f"{path} is missing (expected {expected})")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise AssetError(path, expected, err) from err


def corpus_text(path: str | Path = CORPUS_PATH) -> str:
    """The shipped corpus, decompressed."""
    path = Path(path)
    if not path.is_file():
        raise MissingFileError(f"corpus file {path} is missing (rebuild: python -m kvlib.data)")
    try:
        return lzma.decompress(path.read_bytes()).decode("utf-8")
    except (lzma.LZMAError, EOFError, UnicodeDecodeError) as err:
        raise AssetError(path, "an xz-compressed UTF-8 corpus", err) from err


def corpus_sha256(path: str | Path = CORPUS_PATH) -> str:
    """sha256 of the decompressed corpus text (recorded with the trained weights)."""
    return hashlib.sha256(corpus_text(path).encode("utf-8")).hexdigest()


def load_corpus(path: str | Path = CORPUS_PATH) -> list[str]:
    """All documents of the shipped corpus, in stored order."""
    return corpus_text(path).rstrip("\n").split(DOC_SEPARATOR)


def is_validation(doc: str) -> bool:
    """Whether a document belongs to the held-out split (a hash of its text decides)."""
    return zlib.crc32(doc.encode("utf-8")) % 1000 < VAL_PER_MILLE


def split_corpus(docs: Iterable[str]) -> tuple[list[str], list[str]]:
    """(train, validation) documents; about 5 % go to validation."""
    train, val = [], []
    for doc in docs:
        (val if is_validation(doc) else train).append(doc)
    return train, val


# ---- tokenizer -----------------------------------------------------------------------------


def _merge(ids: list[int], pair: tuple[int, int], new_id: int) -> list[int]:
    """Replace every non-overlapping occurrence of `pair` (left to right) by `new_id`."""
    out, i, n = [], 0, len(ids)
    while i < n:
        if i < n - 1 and ids[i] == pair[0] and ids[i + 1] == pair[1]:
            out.append(new_id)
            i += 2
        else:
            out.append(ids[i])
            i += 1
    return out


class BPETokenizer:
    """Byte-level BPE: 256 byte ids, then one id per merge, then `<|endoftext|>`."""

    def __init__(self, merges: Sequence[tuple[int, int]]) -> None:
        vocab = [bytes([i]) for i in range(256)]
        for n, pair in enumerate(merges):
            if len(pair) != 2:
                raise KVLibValueError(f"merge {n} must be a pair of ids, got {pair!r}")
            a, b = (int(x) for x in pair)
            if not (0 <= a < 256 + n and 0 <= b < 256 + n):
                raise KVLibValueError(
                    f"merge {n} = {pair!r} refers to an id that does not exist yet "
                    f"(ids 0..{256 + n - 1} are defined before it)"
                )
            vocab.append(vocab[a] + vocab[b])
        self.merges: list[tuple[int, int]] = [(int(a), int(b)) for a, b in merges]
        self.ranks = {pair: 256 + n for n, pair in enumerate(self.merges)}  # pair -> new id
        self.vocab: list[bytes] = vocab  # id -> bytes (without the end-of-text id)
        self.eot_id: int = len(vocab)
        self._cache: dict[str, list[int]] = {}

    @property
    def vocab_size(self) -> int:
        """V: bytes + merges + the end-of-text id."""
        return self.eot_id + 1

    def __repr__(self) -> str:
        return f"BPETokenizer(vocab_size={self.vocab_size}, merges={len(self.merges)})"

    # ---- training ----------------------------------------------------------------------------
    @classmethod
    def train(cls, texts: Iterable[str], vocab_size: int) -> BPETokenizer:
        """Learn `vocab_size - 257` merges from texts, most frequent adjacent pair first.

        Ties break towards the smaller pair of ids, so training is deterministic. Pair counts
        are updated incrementally: each merge touches only the pieces containing its pair.
        """
        if not isinstance(vocab_size, int) or vocab_size < 257:
            raise KVLibValueError(
                f"vocab_size must be an int >= 257 (256 bytes + end-of-text), got {vocab_size!r}"
            )
        piece_counts: Counter[str] = Counter()
        for text in texts:
            piece_counts.update(PIECE_RE.findall(text))
        words = [list(p.encode("utf-8", "surrogatepass")) for p in piece_counts]
        counts = list(piece_counts.values())
        pair_counts: Counter[tuple[int, int]] = Counter()
        where: defaultdict[tuple[int, int], set[int]] = defaultdict(set)
        for w, (ids, c) in enumerate(zip(words, counts, strict=True)):
            for pair in zip(ids, ids[1:], strict=False):
                pair_counts[pair] += c
                where[pair].add(w)
        merges: list[tuple[int, int]] = []
        for new_id in range(256, vocab_size - 1):
            if not pair_counts:
                break
            best = max(pair_counts, key=lambda p: (pair_counts[p], -p[0], -p[1]))
            if pair_counts[best] < 2:
                break
            merges.append(best)
            for w in where.pop(best):
                ids = words[w]
                merged = _merge(ids, best, new_id)
                if len(merged) == len(ids):
                    continue  # stale index entry
                c = counts[w]
                for pair in zip(ids, ids[1:], strict=False):
                    pair_counts[pair] -= c
                    if pair_counts[pair] <= 0:
                        del pair_counts[pair]
                for pair in zip(merged, merged[1:], strict=False):
                    pair_counts[pair] += c
                    where[pair].add(w)
                words[w] = merged
            pair_counts.pop(best, None)
        return cls(merges)

    # ---- encode / decode ---------------------------------------------------------------------
    def _encode_piece(self, piece: str) -> list[int]:
        ids = self._cache.get(piece)
        if ids is not None:
            return ids
        ids = list(piece.encode("utf-8", "surrogatepass"))
        while len(ids) > 1:
            # Apply the earliest-learned merge present, as training did.
            pair = min(zip(ids, ids[1:], strict=False), key=lambda p: self.ranks.get(p, 1 << 30))
            if pair not in self.ranks:
                break
            ids = _merge(ids, pair, self.ranks[pair])
        if len(self._cache) < 200_000:
            self._cache[piece] = ids
        return ids

    def encode(self, text: str, *, eot: bool = False) -> list[int]:
        """Token ids of `text` (the text `<|endoftext|>` is encoded as plain bytes); with
        eot=True the end-of-text id is appended."""
        if not isinstance(text, str):
            raise KVLibTypeError(f"encode expects a str, got {type(text).__name__}")
        ids = [i for piece in PIECE_RE.findall(text) for i in self._encode_piece(piece)]
        if eot:
            ids.append(self.eot_id)
        return ids

    def decode(self, ids: Iterable[int] | torch.Tensor) -> str:
        """Text of token ids; the end-of-text id becomes `<|endoftext|>`. Byte sequences that
        are not valid UTF-8 (possible for arbitrary ids) decode with replacement characters."""
        if isinstance(ids, torch.Tensor):
            if ids.ndim > 1:
                raise KVLibValueError(
                    f"decode takes a 1-D sequence of ids, got shape {tuple(ids.shape)}"
                )
            if ids.dtype.is_floating_point or ids.dtype == torch.bool:
                raise KVLibTypeError(f"token ids must be integers, got a {ids.dtype} tensor")
            ids = ids.tolist()
        parts, buf = [], bytearray()
        for i in ids:
            if not isinstance(i, numbers.Integral) or isinstance(i, bool):
                raise KVLibTypeError(f"token ids must be integers, got {i!r}")
            i = int(i)
            if i == self.eot_id:
                parts.append(buf.decode("utf-8", "surrogatepass" if _valid(buf) else "replace"))
                parts.append(EOT)
                buf = bytearray()
            elif 0 <= i < self.eot_id:
                buf += self.vocab[i]
            else:
                raise KVLibIndexError(
                    f"token id {i} is outside the vocabulary [0, {self.vocab_size})"
                )
        parts.append(buf.decode("utf-8", "surrogatepass" if _valid(buf) else "replace"))
        return "".join(parts)

    def encode_corpus(self, docs: Iterable[str]) -> torch.Tensor:
        """All documents as one 1-D int64 tensor, each followed by the end-of-text id."""
        ids: list[int] = []
        for doc in docs:
            ids.extend(self.encode(doc, eot=True))
        return torch.tensor(ids, dtype=torch.long)  # (N,)

    # ---- files -------------------------------------------------------------------------------
    def to_dict(self) -> dict:
        return {"type": "byte-bpe", "pieces": PIECE_RE.pattern, "merges": self.merges}

    def save(self, path: str | Path) -> None:
        """Write the merges as JSON (no pickle)."""
        Path(path).write_text(json.dumps(self.to_dict(), separators=(",", ":")) + "\n")

    @classmethod
    def load(cls, path: str | Path = TOKENIZER_PATH) -> BPETokenizer:
        """Read a tokenizer written by `save`."""
        data = read_json(path, "a tokenizer written by BPETokenizer.save")
        if not isinstance(data, dict) or data.get("type") != "byte-bpe" or "merges" not in data:
            raise KVLibValueError(
                f"{path} is not a byte-bpe tokenizer file (expected type 'byte-bpe')"
            )
        if data.get("pieces") != PIECE_RE.pattern:
            raise KVLibValueError(
                f"{path} was trained with another pre-tokenization pattern "
                f"({data.get('pieces')!r}); this kvlib uses {PIECE_RE.pattern!r}"
            )
        return cls([tuple(p) for p in data["merges"]])


def _valid(buf: bytes | bytearray) -> bool:
    try:
        bytes(buf).decode("utf-8", "surrogatepass")
    except UnicodeDecodeError:
        return False
    return True


def unigram_loss(train_ids: torch.Tensor, val_ids: torch.Tensor, vocab_size: int) -> float:
    """Cross-entropy (nats/token) on `val_ids` of the add-one unigram model of `train_ids`:
    the baseline a model must beat by using context."""
    counts = torch.bincount(train_ids, minlength=vocab_size).double() + 1.0  # (V,)
    logp = torch.log(counts / counts.sum())  # (V,) float64
    return float(-logp[val_ids].mean())


def main() -> None:
    """Rebuild kvlib/assets/fortunes.txt.xz from Debian's fortune files."""
    import argparse

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("--source", default="/usr/share/games/fortunes")
    parser.add_argument("--out", default=str(CORPUS_PATH))
    args = parser.parse_args()
    docs = build_corpus(args.source)
    digest = save_corpus(docs, args.out)
    train, val = split_corpus(docs)
    size = Path(args.out).stat().st_size
    print(f"{len(docs)} documents ({len(train)} train, {len(val)} validation)")
    print(f"wrote {args.out}: {size} bytes, text sha256 {digest}")


if __name__ == "__main__":
    main()
