"""The shipped model: it loads, reproduces its recorded loss, and generates the same text with
and without the KV cache."""

import json
import shutil

import pytest
import torch

from kvlib.data import CORPUS_PATH, DATA_DIR, corpus_sha256, load_corpus, split_corpus
from kvlib.generate import generate
from kvlib.pretrained import load_pretrained, training_record
from kvlib.train import eval_windows, evaluate


@pytest.fixture(scope="module")
def pretrained():
    return load_pretrained()


@pytest.fixture(scope="module")
def record():
    return training_record()


def test_loads_in_eval_mode_fp32(pretrained):
    model, tok = pretrained
    assert not model.training
    assert all(p.dtype == torch.float32 and p.device.type == "cpu" for p in model.parameters())
    c = model.config
    assert c.attention_kind == "GQA" and c.n_layers >= 4 and c.max_seq_len >= 256
    assert c.vocab_size == tok.vocab_size


def test_shipped_files_are_small():
    names = ["model.safetensors", "config.json", "tokenizer.json"]
    total = sum((DATA_DIR / n).stat().st_size for n in names)
    assert total <= 5_000_000, f"model files take {total} bytes, the budget is 5 MB"
    assert CORPUS_PATH.stat().st_size <= 2_000_000


def test_record_matches_the_corpus(record):
    assert record["corpus"]["sha256"] == corpus_sha256()
    train, val = split_corpus(load_corpus())
    assert record["corpus"]["val_documents"] == len(val)
    assert record["corpus"]["train_documents"] == len(train)


def test_reproduces_recorded_validation_subset_loss(pretrained, record):
    model, tok = pretrained
    val_ids = tok.encode_corpus(split_corpus(load_corpus())[1])
    assert val_ids.numel() == record["corpus"]["val_tokens"]
    sub = record["val_subset"]
    windows = eval_windows(val_ids, sub["seq_len"], sub["windows"])  # (N, T + 1)
    loss = evaluate(model, windows)
    diff = abs(loss - sub["loss"])
    assert diff < 2e-3, f"subset loss {loss:.5f} vs recorded {sub['loss']:.5f}: diff {diff:.2e}"


def test_beats_the_unigram_baseline(record):
    assert record["val_loss"] < record["unigram_val_loss"] - 1.0, (
        f"val loss {record['val_loss']:.3f} is not well below the unigram baseline "
        f"{record['unigram_val_loss']:.3f}"
    )


def test_record_is_complete(record):
    for key in ("train_time_s", "steps", "train_loss", "val_loss", "val_perplexity", "command",
                "torch", "date", "seed"):  # fmt: skip
        assert key in record, f"{key} missing from the training record"
    meta = json.loads((DATA_DIR / "config.json").read_text())
    assert meta["training"]["weights_bytes"] == (DATA_DIR / meta["weights"]).stat().st_size


def test_greedy_generation_same_with_and_without_cache(pretrained):
    model, tok = pretrained
    prompt = torch.tensor([tok.encode("The best way to")])  # (1, T)
    a = generate(model, prompt, 40, use_cache=True)
    b = generate(model, prompt, 40, use_cache=False)
    assert torch.equal(a, b), f"cached: {tok.decode(a[0])!r}\nuncached: {tok.decode(b[0])!r}"
    assert tok.decode(a[0]).startswith("The best way to")


def test_sampled_generation_same_with_and_without_cache(pretrained):
    model, tok = pretrained
    prompt = torch.tensor([tok.encode("Q:"), tok.encode("A:")])  # (2, T)
    kw = dict(temperature=0.8, top_k=50, seed=3)
    a = generate(model, prompt, 30, use_cache=True, **kw)
    b = generate(model, prompt, 30, use_cache=False, **kw)
    assert torch.equal(a, b), f"first difference at {(a != b).nonzero()[:1].tolist()}"


# ---- misuse ----------------------------------------------------------------------------------


def test_missing_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="no config.json in .* train a model there first"):
        load_pretrained(path=tmp_path)


def test_dtype_must_be_float():
    with pytest.raises(TypeError, match="dtype must be a floating torch.dtype"):
        load_pretrained(dtype=torch.int8)


def test_tokenizer_model_mismatch(tmp_path):
    for name in ("model.safetensors", "config.json", "tokenizer.json"):
        shutil.copy(DATA_DIR / name, tmp_path / name)
    meta = json.loads((tmp_path / "config.json").read_text())
    meta["model"]["vocab_size"] += 1
    (tmp_path / "config.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="the tokenizer has .* ids but the model expects"):
        load_pretrained(path=tmp_path)


def test_incomplete_config(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model": {}}))
    with pytest.raises(ValueError, match="has no 'weights' entry"):
        load_pretrained(path=tmp_path)


@pytest.mark.parametrize(
    ("name", "damage", "expected"),
    [
        ("model.safetensors", lambda b: b[: len(b) // 2], "safetensors file of weights"),
        ("tokenizer.json", lambda b: b[:100], "tokenizer written by BPETokenizer.save"),
        ("config.json", lambda b: b"{not json", "config.json written by kvlib.train"),
    ],
)
def test_a_damaged_asset_names_the_file(tmp_path, name, damage, expected):
    from kvlib.data import AssetError

    folder = tmp_path / "model"
    shutil.copytree(DATA_DIR, folder)
    target = folder / name
    assert target.is_file(), f"{name} is not among the shipped assets"
    target.write_bytes(damage(target.read_bytes()))
    with pytest.raises(AssetError, match=expected) as info:
        load_pretrained(path=folder)
    assert str(target) in str(info.value) and info.value.path == target
