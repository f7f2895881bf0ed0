"""kvlib.export: a kvlib Llama as a Hugging Face checkpoint, read back by transformers."""

import subprocess
import sys

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import kvlib.export as export_module
from kvlib.config import ModelConfig
from kvlib.data import DATA_DIR, EOT, BPETokenizer, load_corpus, read_json, split_corpus
from kvlib.errors import KVLibTypeError, KVLibValueError, WeightLoadError
from kvlib.export import export, hf_pattern, main
from kvlib.hf import convert_state_dict, to_hf_state_dict
from kvlib.pretrained import load_pretrained
from kvlib.transformer import Transformer

transformers = pytest.importorskip("transformers")

ATOL = 1e-5  # as tests/test_hf.py, per unit of the largest logit


@pytest.fixture(scope="module")
def book():
    return load_pretrained()


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """The book's model exported by the command line."""
    out = tmp_path_factory.mktemp("export") / "book"
    main([str(out)])
    return out


@pytest.fixture(scope="module")
def hf_tokenizer(folder):
    return transformers.AutoTokenizer.from_pretrained(folder)


def random_model(tie: bool, seed: int = 0) -> Transformer:
    config = ModelConfig(
        vocab_size=96, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=80,
        max_seq_len=64, rope_theta=500.0, norm_eps=1e-6, tie_embeddings=tie,
    )  # fmt: skip
    torch.manual_seed(seed)
    model = Transformer(config).eval()
    with torch.no_grad():  # larger weights than the default init: peaky, varied logits
        for p in model.parameters():
            p.normal_(0.0, 0.2) if p.ndim == 2 else p.uniform_(0.5, 1.5)
    return model


def assert_same_logits(model: Transformer, folder, tokens: torch.Tensor) -> None:
    hf = transformers.AutoModelForCausalLM.from_pretrained(folder, attn_implementation="eager")
    with torch.no_grad():
        ref, ours = hf(tokens).logits, model(tokens)
    scale = max(1.0, ours.abs().max().item())
    diff = (ref - ours).abs().max().item()
    assert diff < ATOL * scale, f"max |logit diff| vs HF = {diff:.3g} (largest logit {scale:.3g})"


# ---- weights and config ------------------------------------------------------------------


def test_the_book_model_gives_the_same_logits_in_transformers(book, folder):
    model, tokenizer = book
    text = split_corpus(load_corpus())[1][0]
    tokens = torch.tensor([tokenizer.encode(text, eot=True)[:64]])  # (1, T)
    assert_same_logits(model, folder, tokens)


@pytest.mark.parametrize("tie", [False, True], ids=["untied", "tied"])
def test_a_random_gqa_model_gives_the_same_logits_in_transformers(tmp_path, tie):
    model = random_model(tie)
    export(model, tmp_path / "m")
    hf_config = transformers.AutoConfig.from_pretrained(tmp_path / "m")
    assert hf_config.tie_word_embeddings is tie
    assert (hf_config.num_key_value_heads, hf_config.bos_token_id) == (2, None)
    tokens = torch.randint(0, 96, (2, 40), generator=torch.Generator().manual_seed(1))  # (B, T)
    assert_same_logits(model, tmp_path / "m", tokens)


def test_the_config_names_the_end_of_text_token_and_the_weights_dtype(folder, book):
    hf_config = transformers.AutoConfig.from_pretrained(folder)
    eot = book[1].eot_id
    assert eot == read_json(DATA_DIR / "config.json", "the book's config")["eot_id"]
    assert (hf_config.bos_token_id, hf_config.eos_token_id) == (eot, eot)
    assert hf_config.dtype == torch.float32
    generation = transformers.GenerationConfig.from_pretrained(folder)
    assert (generation.bos_token_id, generation.eos_token_id) == (eot, eot)


def test_to_hf_state_dict_is_the_inverse_of_convert_state_dict():
    for tie in (False, True):
        model = random_model(tie)
        state = model.state_dict()
        back = convert_state_dict(to_hf_state_dict(state, model.config), model.config)
        expected = {k: v for k, v in state.items() if not (tie and k == "output.weight")}
        assert back.keys() == expected.keys()
        assert all(back[k] is expected[k] for k in back)


def test_to_hf_state_dict_rejects_a_state_dict_of_another_model():
    model = random_model(False)
    state = model.state_dict()
    del state["layers.1.mlp.w2.weight"]
    with pytest.raises(WeightLoadError, match="missing kvlib weights.*layers.1.mlp.w2"):
        to_hf_state_dict(state, model.config)


# ---- tokenizer -----------------------------------------------------------------------------

EDGE_CASES = [
    "",
    " ",
    "a",
    "don't it's we'll they're I've I'd 'tis",
    "DON'T It'S",
    "emoji 😀👍🏽 and a family 👨‍👩‍👧",
    "日本語のテキスト、中文文本。",
    "combining: e\u0301 a\u0308 n\u0303\u0323",
    "RTL: שלום עולם مرحبا",
    "control \x00\x01\x07\x1b[0m\x7f",
    "file separators \x1c\x1d\x1e\x1f and next line \x85 nbsp \xa0 ideographic \u3000 end",
    "line one\r\nline two\r\n",
    "many   spaces    then\n\n\n\nnewlines  \n  \t\t tabs\t",
    "trailing spaces   ",
    "12345678901234567890 3.14159 1,000,000",
    EOT,
    f"before{EOT}after {EOT}",
    "<|endoftext|",
    "punctuation!!! ?!... ---- ((( )))",
    "\u2028\u2029 separators",
]


def test_the_held_out_corpus_encodes_and_decodes_identically(book, hf_tokenizer):
    tokenizer = book[1]
    docs = split_corpus(load_corpus())[1]
    for i, doc in enumerate(docs):
        ids = tokenizer.encode(doc)
        theirs = hf_tokenizer.encode(doc)
        assert theirs == ids, f"document {i}: first ids differ: {theirs[:12]} vs {ids[:12]}"
        assert hf_tokenizer.decode(ids) == doc, f"document {i} decodes to other text"


@pytest.mark.parametrize("text", EDGE_CASES)
def test_edge_cases_encode_and_decode_identically(book, hf_tokenizer, text):
    tokenizer = book[1]
    ids = tokenizer.encode(text)
    assert hf_tokenizer.encode(text) == ids
    assert hf_tokenizer.decode(ids) == tokenizer.decode(ids) == text


def test_the_end_of_text_id_is_a_special_token_never_read_from_text(book, hf_tokenizer):
    tokenizer = book[1]
    eot = tokenizer.eot_id
    assert hf_tokenizer.eos_token_id == eot and hf_tokenizer.bos_token_id == eot
    assert eot not in hf_tokenizer.encode(EOT)
    ids = tokenizer.encode("one", eot=True) + tokenizer.encode("two")
    assert hf_tokenizer.decode(ids) == tokenizer.decode(ids) == f"one{EOT}two"
    assert hf_tokenizer.decode(ids, skip_special_tokens=True) == "onetwo"
    assert len(hf_tokenizer) == tokenizer.vocab_size


def test_every_whitespace_character_is_cut_the_same_way(book, hf_tokenizer):
    tokenizer = book[1]
    spaces = export_module._whitespace()
    assert len(spaces) > 20
    for c in spaces:
        for text in (f"a{c}{c}b", f"x {c} y", f"{c}  z", f"1{c}", f"  {c}  w", f"a  {c}{c}  ."):
            assert hf_tokenizer.encode(text) == tokenizer.encode(text), f"{c!r} in {text!r}"


@pytest.mark.parametrize(
    "ids",
    [[0xF0, 0x9F], [0xF0, 0x9F, 0x98], [0xE6, 0x97], [0xC3], [0x80, 0x80], [0xFF, 0x41], [0xF0]],
)
def test_partial_utf8_sequences_decode_with_the_same_replacement_characters(
    book, hf_tokenizer, ids
):
    tokenizer = book[1]
    eot = tokenizer.eot_id
    for seq in (ids, [65, *ids, 66], [*ids, eot, *ids], [*ids, 32, 0x41]):
        assert hf_tokenizer.decode(seq) == tokenizer.decode(seq), f"ids {seq}"


# Letters, digits, space runs, contractions and punctuation in proportion, plus any Unicode
# character (no lone surrogates: `tokenizers` takes valid Unicode only).
TEXT = st.lists(
    st.one_of(
        st.sampled_from([*'aeiostETAN0123456789.,!?-"()\n\t\r', " ", "  ", "   ", "'s", "'ll"]),
        st.characters(codec="utf-8"),
    ),
    max_size=40,
).map("".join)


@settings(max_examples=300, deadline=None)
@given(text=TEXT)
def test_random_text_encodes_and_decodes_identically(book, hf_tokenizer, text):
    tokenizer = book[1]
    ids = tokenizer.encode(text)
    assert hf_tokenizer.encode(text) == ids
    assert hf_tokenizer.decode(ids) == text


@settings(max_examples=300, deadline=None)
@given(ids=st.lists(st.integers(0, 1023), max_size=12))
def test_random_ids_decode_identically(book, hf_tokenizer, ids):
    tokenizer = book[1]
    ours = tokenizer.decode(ids)
    if any(0xD800 <= ord(c) < 0xE000 for c in ours):
        return  # kvlib reads ED A0..BF .. as a surrogate; Unicode text has none (see the module)
    assert hf_tokenizer.decode(ids) == ours


def test_the_pattern_spells_out_every_whitespace_character():
    pattern = hf_pattern()
    assert "\\s" not in pattern and "\\S" not in pattern
    assert all(c in pattern for c in export_module._whitespace())


def test_a_tokenizer_that_merges_differently_is_caught(book, hf_tokenizer):
    """The comparison can fail: kvlib with one merge dropped disagrees with the export."""
    tokenizer = book[1]
    fewer = BPETokenizer(tokenizer.merges[:-1])
    text = " ".join(split_corpus(load_corpus())[1])
    assert fewer.encode(text) != hf_tokenizer.encode(text)


# ---- the folder ----------------------------------------------------------------------------


def test_the_folder_holds_the_files_transformers_reads(folder):
    names = sorted(p.name for p in folder.iterdir())
    assert names == [
        "config.json",
        "generation_config.json",
        "model.safetensors",
        "special_tokens_map.json",
        "tokenizer.json",
        "tokenizer_config.json",
    ]
    assert not [p for p in folder.parent.iterdir() if p.name.startswith(".")]  # no temp left


def test_a_non_empty_folder_is_kept_unless_overwrite(tmp_path):
    model = random_model(False)
    out = tmp_path / "m"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(KVLibValueError, match="is not empty; expected a new or empty folder"):
        export(model, out)
    assert [p.name for p in out.iterdir()] == ["notes.txt"]
    export(model, out, overwrite=True)
    assert not (out / "notes.txt").exists() and (out / "model.safetensors").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]


def test_a_failed_overwrite_keeps_the_old_folder(tmp_path, monkeypatch):
    out = tmp_path / "m"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    rename, calls = export_module.os.rename, []

    def refuse_the_new_folder(src, dst):  # the old folder moves aside, the new one fails
        calls.append(src)
        if len(calls) == 2:
            raise OSError("no room")
        rename(src, dst)

    monkeypatch.setattr(export_module.os, "rename", refuse_the_new_folder)
    with pytest.raises(OSError, match="no room"):
        export(random_model(False), out, overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]
    assert (out / "notes.txt").read_text() == "mine"


def test_an_empty_folder_is_used(tmp_path):
    (tmp_path / "m").mkdir()
    export(random_model(True), tmp_path / "m")
    assert (tmp_path / "m" / "config.json").is_file()


def test_a_failed_export_leaves_nothing(tmp_path, monkeypatch):
    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(export_module, "tokenizer_json", broken)
    model, tokenizer = load_pretrained()
    with pytest.raises(OSError, match="disk full"):
        export(model, tmp_path / "m", tokenizer)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        (dict(model="not a model"), KVLibTypeError, "model must be a kvlib Transformer, got str"),
        (dict(tokenizer="t"), KVLibTypeError, "tokenizer must be a kvlib BPETokenizer or None"),
        (dict(tokenizer=BPETokenizer([])), KVLibValueError, "has 257 ids but the model's"),
        (dict(eot_id=96), KVLibValueError, r"eot_id must be an int in \[0, 95\], got 96"),
        (dict(eot_id=True), KVLibTypeError, "eot_id must be an int"),
        (dict(dtype=torch.int8), KVLibTypeError, "dtype must be one of"),
        (dict(overwrite=1), KVLibTypeError, "overwrite must be True or False"),
    ],
)
def test_bad_arguments_raise_and_write_nothing(tmp_path, kwargs, error, message):
    args = dict(model=random_model(False), out=tmp_path / "m") | kwargs
    with pytest.raises(error, match=message):
        export(**args)
    assert list(tmp_path.iterdir()) == []


def test_an_out_path_that_is_a_file_is_refused(tmp_path):
    (tmp_path / "m").write_text("x")
    with pytest.raises(KVLibValueError, match="is a file; expected a new or empty folder"):
        export(random_model(False), tmp_path / "m")


def test_the_eot_id_must_be_the_tokenizers(tmp_path, book):
    model, tokenizer = book
    with pytest.raises(KVLibValueError, match="end-of-text id is 1023"):
        export(model, tmp_path / "m", tokenizer, eot_id=5)


def test_exporting_does_not_import_transformers():
    code = "import sys, kvlib.export; assert 'transformers' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)
