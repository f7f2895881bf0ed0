"""The training script: a smoke run of `python -m kvlib.train --quick`, and its parts."""

import json
import math
import subprocess
import sys

import pytest
import torch

from kvlib.config import tiny
from kvlib.pretrained import load_pretrained
from kvlib.train import (
    CONFIG_FILE,
    TOKENIZER_FILE,
    VAL_SUBSET_WINDOWS,
    WEIGHTS_FILE,
    eval_windows,
    evaluate,
    load_weights,
    lr_at,
    model_config,
    random_batch,
    save_model,
    train,
)
from kvlib.transformer import Transformer
from tests.toc import ROOT


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("quick")
    cmd = [sys.executable, "-m", "kvlib.train", "--quick", "--steps", "12", "--out", str(out)]
    result = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    return out, result


def test_quick_run_writes_files(quick_run):
    out, result = quick_run
    for name in (WEIGHTS_FILE, CONFIG_FILE, TOKENIZER_FILE):
        assert (out / name).is_file(), f"{name} missing after the smoke run"
    assert "val loss" in result.stdout and "perplexity" in result.stdout
    assert "train:" in result.stderr, "no progress bar on stderr"
    meta = json.loads((out / CONFIG_FILE).read_text())
    rec = meta["training"]
    assert rec["steps"] == 12 and rec["command"].endswith("--steps 12 --out " + str(out))
    for key in ("train_time_s", "train_loss", "val_loss", "val_perplexity", "val_subset", "torch"):
        assert key in rec, f"{key} not recorded"
    assert len(rec["corpus"]["sha256"]) == 64
    assert abs(rec["val_perplexity"] - math.exp(rec["val_loss"])) < 1e-9


def test_quick_run_learns(quick_run):
    out, _ = quick_run
    rec = json.loads((out / CONFIG_FILE).read_text())["training"]
    V = json.loads((out / CONFIG_FILE).read_text())["model"]["vocab_size"]
    # A model that learned nothing predicts uniformly: loss log V.
    assert rec["val_loss"] < math.log(V) - 0.1, f"val loss {rec['val_loss']:.3f} vs log V"


def test_quick_run_reloads_and_reproduces_subset_loss(quick_run):
    out, _ = quick_run
    from kvlib.data import load_corpus, split_corpus

    model, tok = load_pretrained(path=out)
    rec = json.loads((out / CONFIG_FILE).read_text())["training"]
    val_ids = tok.encode_corpus(split_corpus(load_corpus())[1])
    windows = eval_windows(val_ids, model.config.max_seq_len, rec["val_subset"]["windows"])
    loss = evaluate(model, windows)
    diff = abs(loss - rec["val_subset"]["loss"])
    assert diff < 1e-4, (
        f"subset loss {loss} vs recorded {rec['val_subset']['loss']}: max diff {diff}"
    )


def test_shipped_model_config_meets_the_brief():
    c = model_config(1024)
    assert c.attention_kind == "GQA" and c.n_layers >= 4 and c.max_seq_len >= 256
    assert VAL_SUBSET_WINDOWS >= 1


# ---- parts ---------------------------------------------------------------------------------------


def test_lr_schedule_warmup_then_cosine():
    lrs = [lr_at(s, 100, 1.0, 10) for s in range(100)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert all(a <= b for a, b in zip(lrs[:10], lrs[1:10], strict=False))
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:], strict=False))
    want_mid = 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 45 / 90))
    assert lrs[55] == pytest.approx(want_mid)
    assert lr_at(100, 100, 1.0, 10) == pytest.approx(0.1)


def test_random_batch_targets_are_shifted_inputs():
    ids = torch.arange(1000)
    x, y = random_batch(ids, 4, 16, torch.Generator().manual_seed(0))
    assert x.shape == y.shape == (4, 16)
    assert torch.equal(y[:, :-1], x[:, 1:]) and torch.equal(y[:, -1], x[:, -1] + 1)


def test_random_batch_short_stream():
    with pytest.raises(ValueError, match="has 5 ids, need at least 17"):
        random_batch(torch.arange(5), 2, 16, torch.Generator())


def test_eval_windows_cover_the_stream_once():
    ids = torch.arange(50)
    w = eval_windows(ids, 8)
    assert w.shape == (6, 9)
    assert torch.equal(w[1:, 0], w[:-1, -1]), "consecutive windows share exactly one id"
    targets = w[:, 1:].flatten()
    assert torch.equal(targets, torch.arange(1, 49))
    assert eval_windows(ids, 8, 2).shape == (2, 9)
    with pytest.raises(ValueError, match="has 5 ids, need at least 9"):
        eval_windows(torch.arange(5), 8)


def test_evaluate_matches_reference_cross_entropy():
    torch.manual_seed(0)
    model = Transformer(tiny(), init_std=0.2).eval()
    w = torch.randint(0, 64, (5, 17), generator=torch.Generator().manual_seed(1))
    got = evaluate(model, w, batch_size=2)
    with torch.no_grad():
        logp = torch.log_softmax(model(w[:, :-1]).double(), -1)  # (N, T, V) float64
    want = float(-logp.gather(-1, w[:, 1:, None]).mean())
    assert abs(got - want) < 1e-5, f"max diff {abs(got - want)}"


def test_save_load_weights_round_trip(tmp_path):
    torch.manual_seed(0)
    model = Transformer(tiny())
    save_model(model, tmp_path)
    again = Transformer(tiny(), init_std=0.5)
    load_weights(again, tmp_path / WEIGHTS_FILE)
    for name, p in model.state_dict().items():
        diff = float((p - again.state_dict()[name]).abs().max())
        assert diff < 1e-3, f"{name}: max diff {diff} after the float16 round trip"


def test_load_weights_wrong_shape(tmp_path):
    save_model(Transformer(tiny()), tmp_path)
    with pytest.raises(ValueError, match="expected shape .* for this config, got"):
        load_weights(Transformer(tiny(dim=48, n_heads=4)), tmp_path / WEIGHTS_FILE)


def test_load_weights_wrong_layer_count(tmp_path):
    save_model(Transformer(tiny(n_layers=3)), tmp_path)
    with pytest.raises(ValueError, match=r"unexpected keys \['layers.2.attn.wk.weight'"):
        load_weights(Transformer(tiny()), tmp_path / WEIGHTS_FILE)


def test_train_rejects_zero_steps(tmp_path):
    with pytest.raises(ValueError, match="steps and batch_size must be >= 1, got 0 and 4"):
        train(tmp_path, steps=0, batch_size=4)
