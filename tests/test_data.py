"""The fortune corpus and the byte-level BPE tokenizer: round trips, references, misuse."""

import json
from collections import Counter

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from kvlib.data import (
    CORPUS_PATH,
    DATA_DIR,
    EOT,
    PIECE_RE,
    BPETokenizer,
    build_corpus,
    corpus_sha256,
    load_corpus,
    split_corpus,
    unigram_loss,
)


@pytest.fixture(scope="module")
def shipped():
    return BPETokenizer.load()


@pytest.fixture(scope="module")
def sample_docs():
    return load_corpus()[:300]


def reference_train(texts, vocab_size):
    """BPE the plain way: recount every pair of every piece before each merge."""
    pieces = Counter(p for t in texts for p in PIECE_RE.findall(t))
    words = {p: list(p.encode("utf-8")) for p in pieces}
    merges = []
    for new_id in range(256, vocab_size - 1):
        counts = Counter()
        for p, ids in words.items():
            for pair in zip(ids, ids[1:], strict=False):
                counts[pair] += pieces[p]
        if not counts:
            break
        best = max(counts, key=lambda q: (counts[q], -q[0], -q[1]))
        if counts[best] < 2:
            break
        merges.append(best)
        for p, ids in words.items():
            out, i = [], 0
            while i < len(ids):
                if i < len(ids) - 1 and (ids[i], ids[i + 1]) == best:
                    out.append(new_id)
                    i += 2
                else:
                    out.append(ids[i])
                    i += 1
            words[p] = out
    return merges


def reference_encode(tokenizer, text):
    """Apply every merge in the order it was learned, over each whole piece."""
    ids = []
    for piece in PIECE_RE.findall(text):
        p = list(piece.encode("utf-8"))
        for rank, pair in enumerate(tokenizer.merges):
            out, i = [], 0
            while i < len(p):
                if i < len(p) - 1 and (p[i], p[i + 1]) == pair:
                    out.append(256 + rank)
                    i += 2
                else:
                    out.append(p[i])
                    i += 1
            p = out
        ids += p
    return ids


# ---- tokenizer -------------------------------------------------------------------------------


@settings(max_examples=300, deadline=None)
@given(st.text())
def test_round_trip_arbitrary_strings(s):
    tok = BPETokenizer.load()
    ids = tok.encode(s)
    assert tok.decode(ids) == s, f"decode(encode({s!r})) = {tok.decode(ids)!r}"
    assert all(0 <= i < tok.eot_id for i in ids)


# Python strings may hold lone surrogates (not encodable as strict UTF-8); they round-trip too.
SURROGATE_TEXT = st.text(
    alphabet=st.one_of(
        st.characters(min_codepoint=0xD800, max_codepoint=0xDFFF, categories=["Cs"]),
        st.characters(max_codepoint=0x7F),
    )
)


@settings(max_examples=200, deadline=None)
@given(SURROGATE_TEXT)
def test_round_trip_with_surrogates(s):
    tok = BPETokenizer.load()
    assert tok.decode(tok.encode(s)) == s, f"{s!r} does not round-trip"


def test_lone_surrogate_round_trip(shipped):
    s = "a\ud800 b\udfff"
    assert shipped.decode(shipped.encode(s)) == s


@given(st.text())
def test_pieces_cover_the_text(s):
    assert "".join(PIECE_RE.findall(s)) == s


def test_end_of_text_id(shipped):
    ids = shipped.encode("Hello, world.", eot=True)
    assert ids[-1] == shipped.eot_id == shipped.vocab_size - 1
    assert shipped.decode(ids) == "Hello, world." + EOT
    # The literal text "<|endoftext|>" is plain bytes, never the special id.
    assert shipped.eot_id not in shipped.encode(EOT)


def test_merges_compress_english(shipped, sample_docs):
    text = "\n".join(sample_docs)
    n_ids = len(shipped.encode(text))
    n_bytes = len(text.encode("utf-8"))
    assert n_ids < 0.6 * n_bytes, f"{n_ids} ids for {n_bytes} bytes: the merges do not compress"


def test_training_matches_reference(sample_docs):
    fast = BPETokenizer.train(sample_docs, 300).merges
    slow = reference_train(sample_docs, 300)
    first_diff = next((i for i, (a, b) in enumerate(zip(fast, slow, strict=False)) if a != b), None)
    assert fast == slow, f"merges differ from the reference at index {first_diff}"
    assert len(fast) == 300 - 257


def test_training_is_deterministic(sample_docs):
    a = BPETokenizer.train(sample_docs, 280).merges
    b = BPETokenizer.train(list(sample_docs), 280).merges
    assert a == b


def test_first_merge_is_most_frequent_pair():
    tok = BPETokenizer.train(["ab ab ab cd"], 258)
    assert tok.merges == [(ord("a"), ord("b"))]
    assert tok.encode("ab") == [256]
    assert tok.vocab_size == 258


def test_encode_matches_reference(shipped, sample_docs):
    for doc in sample_docs[:40]:
        got, want = shipped.encode(doc), reference_encode(shipped, doc)
        assert got == want, f"encode differs from applying merges in order on {doc[:60]!r}"


def test_save_load_round_trip(tmp_path, sample_docs):
    tok = BPETokenizer.train(sample_docs, 300)
    tok.save(tmp_path / "tok.json")
    again = BPETokenizer.load(tmp_path / "tok.json")
    assert again.merges == tok.merges
    assert again.encode(sample_docs[0]) == tok.encode(sample_docs[0])


def test_encode_corpus_layout(shipped):
    ids = shipped.encode_corpus(["one", "two"])
    assert ids.dtype == torch.long and ids.ndim == 1
    assert (ids == shipped.eot_id).sum() == 2 and ids[-1] == shipped.eot_id
    assert shipped.decode(ids) == "one" + EOT + "two" + EOT


# ---- tokenizer misuse -------------------------------------------------------------------------


def test_vocab_size_too_small():
    with pytest.raises(ValueError, match="vocab_size must be an int >= 257"):
        BPETokenizer.train(["abc"], 100)


def test_encode_needs_str(shipped):
    with pytest.raises(TypeError, match="encode expects a str, got bytes"):
        shipped.encode(b"abc")


def test_decode_rejects_unknown_id(shipped):
    with pytest.raises(IndexError, match=r"token id 99999 is outside the vocabulary \[0, "):
        shipped.decode([1, 99999])


def test_decode_rejects_2d_tensor(shipped):
    with pytest.raises(ValueError, match=r"1-D sequence of ids, got shape \(2, 2\)"):
        shipped.decode(torch.zeros(2, 2, dtype=torch.long))


def test_decode_invalid_utf8_is_replaced(shipped):
    assert shipped.decode([0xFF, ord("a")]) == "\ufffda"


def test_merge_referring_to_future_id():
    with pytest.raises(ValueError, match="merge 0 = .* refers to an id that does not exist yet"):
        BPETokenizer([(256, 97)])


def test_load_rejects_other_files(tmp_path):
    (tmp_path / "x.json").write_text(json.dumps({"type": "wordpiece"}))
    with pytest.raises(ValueError, match="not a byte-bpe tokenizer file"):
        BPETokenizer.load(tmp_path / "x.json")
    (tmp_path / "y.json").write_text(json.dumps({"type": "byte-bpe", "pieces": "x", "merges": []}))
    with pytest.raises(ValueError, match="another pre-tokenization pattern"):
        BPETokenizer.load(tmp_path / "y.json")


# ---- corpus ------------------------------------------------------------------------------------


def test_corpus_size_and_licence_note():
    text_bytes = len("\n%\n".join(load_corpus()).encode("utf-8"))
    assert 1_000_000 <= text_bytes <= 5_000_000, f"corpus has {text_bytes} bytes"
    assert CORPUS_PATH.stat().st_size <= 2_000_000
    note = (DATA_DIR / "CORPUS.md").read_text()
    assert "BSD" in note and corpus_sha256() in note


def test_split_is_disjoint_and_held_out():
    docs = load_corpus()
    train, val = split_corpus(docs)
    assert len(train) + len(val) == len(docs)
    assert not set(train) & set(val)
    frac = len(val) / len(docs)
    assert 0.03 < frac < 0.07, f"validation fraction {frac:.3f}, expected about 0.05"
    # The split depends on the text only, not on the order.
    assert split_corpus(reversed(docs))[1] == val[::-1]


def test_build_corpus_reads_fortune_files(tmp_path):
    (tmp_path / "wisdom").write_text(
        "First  \nfortune.\n%\nSecond.\n%\n\n%\nFirst  \nfortune.\n%\n"
    )
    (tmp_path / "wisdom.dat").write_bytes(b"\x00\x01")  # index files are skipped
    (tmp_path / "ethnic").write_text("left out\n%\n")
    assert build_corpus(tmp_path) == ["First\nfortune.", "Second."]


def test_build_corpus_missing_dir(tmp_path):
    with pytest.raises(FileNotFoundError, match="apt-get install fortunes"):
        build_corpus(tmp_path / "nope")


def test_unigram_baseline_matches_counts():
    train = torch.tensor([0, 0, 1, 2])
    val = torch.tensor([0, 1])
    # add-one counts over V=4: [3, 2, 2, 1] / 8
    want = -(torch.log(torch.tensor(3 / 8)) + torch.log(torch.tensor(2 / 8))) / 2
    got = unigram_loss(train, val, 4)
    assert abs(got - float(want)) < 1e-6, f"max diff {abs(got - float(want))}"


def test_decode_refuses_ids_that_are_not_integers():
    tok = BPETokenizer.load()
    with pytest.raises(TypeError, match="token ids must be integers, got 1.5"):
        tok.decode([1.5, 2.0])
    with pytest.raises(TypeError, match="torch.float32 tensor"):
        tok.decode(torch.tensor([1.0, 2.0]))
    with pytest.raises(TypeError, match="token ids must be integers, got True"):
        tok.decode([True])
    assert tok.decode(torch.tensor([72, 105])) == tok.decode([72, 105])


def test_a_truncated_corpus_names_the_file(tmp_path):
    from kvlib.data import AssetError, corpus_text

    damaged = tmp_path / "corpus.txt.xz"
    damaged.write_bytes(CORPUS_PATH.read_bytes()[:1000])
    with pytest.raises(AssetError, match="xz-compressed UTF-8 corpus") as info:
        corpus_text(damaged)
    assert str(damaged) in str(info.value)
