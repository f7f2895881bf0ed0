"""Train the book's small model: `python -m kvlib.train` (CPU, fixed seed, minutes).

A kvlib `Transformer` (GQA, RoPE, SwiGLU) learns next-token prediction on the fortune corpus
(kvlib/data.py) with AdamW, linear warmup then cosine decay, and gradient clipping. The run
writes three files, loaded again by `kvlib.load_pretrained`:

    model.safetensors   the weights, stored as float16 (no pickle)
    config.json         the ModelConfig plus a record of the run (losses, time, corpus checksum,
                        command line, torch version, date)
    tokenizer.json      the BPE merges, trained on the training split by the same run

Shapes:
    ids: (N,) int64, the whole split as one stream, documents ended by the end-of-text id
    batch x, y: (B, T) int64, y = x shifted left by one token
    logits: (B, T, V), upcast to fp32 for the cross-entropy

The recorded losses are measured after the float16 round trip, on exactly the weights shipped.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import math
import os
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from kvlib.config import ModelConfig
from kvlib.data import (
    CORPUS_PATH,
    DATA_DIR,
    BPETokenizer,
    corpus_sha256,
    load_corpus,
    split_corpus,
    unigram_loss,
)
from kvlib.errors import KVLibValueError
from kvlib.pretrained import (
    CONFIG_FILE,
    TOKENIZER_FILE,
    WEIGHTS_DTYPE,
    WEIGHTS_FILE,
    load_weights,
    save_model,
)
from kvlib.transformer import Transformer

VAL_SUBSET_WINDOWS = 8  # the fixed validation subset the tests re-measure: 8 windows of T tokens


def model_config(vocab_size: int, quick: bool = False) -> ModelConfig:
    """The shipped model (4 layers, C=128, H=4 query heads sharing K=2 kv heads, T=256), or
    with quick=True a 2-layer toy for smoke tests."""
    if quick:
        return ModelConfig(
            vocab_size=vocab_size, dim=32, n_layers=2, n_heads=4, n_kv_heads=2,
            max_seq_len=64, name="kvlib-fortunes-quick",
        )  # fmt: skip
    return ModelConfig(
        vocab_size=vocab_size, dim=128, n_layers=4, n_heads=4, n_kv_heads=2,
        max_seq_len=256, name="kvlib-fortunes",
    )  # fmt: skip


# ---- batches and evaluation ------------------------------------------------------------------


def random_batch(
    ids: torch.Tensor, batch_size: int, seq_len: int, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """B random windows of the stream: inputs x and next-token targets y, each (B, T)."""
    if ids.numel() < seq_len + 1:
        raise KVLibValueError(
            f"the token stream has {ids.numel()} ids, need at least {seq_len + 1}"
        )
    starts = torch.randint(0, ids.numel() - seq_len, (batch_size,), generator=generator)  # (B,)
    offsets = torch.arange(seq_len + 1)  # (T + 1,)
    windows = ids[starts[:, None] + offsets[None, :]]  # (B, T + 1)
    return windows[:, :-1], windows[:, 1:]


def eval_windows(ids: torch.Tensor, seq_len: int, n_windows: int | None = None) -> torch.Tensor:
    """The first `n_windows` (all when None) non-overlapping windows of T + 1 ids, (N, T + 1).

    Consecutive windows share one id (the last target of one is the first input of the next),
    so every id after the first is predicted exactly once.
    """
    n_all = (ids.numel() - 1) // seq_len
    n = n_all if n_windows is None else min(n_windows, n_all)
    if n < 1:
        raise KVLibValueError(
            f"the token stream has {ids.numel()} ids, need at least {seq_len + 1}"
        )
    starts = torch.arange(n) * seq_len  # (N,)
    return ids[starts[:, None] + torch.arange(seq_len + 1)[None, :]]  # (N, T + 1)


@torch.no_grad()
def evaluate(model: Transformer, windows: torch.Tensor, batch_size: int = 16) -> float:
    """Mean next-token cross-entropy (nats/token, fp32) over windows (N, T + 1)."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for i in range(0, windows.shape[0], batch_size):
        w = windows[i : i + batch_size].to(model.device)  # (b, T + 1)
        logits = model(w[:, :-1]).float()  # (b, T, V) fp32
        # (b*T, V) logits against (b*T,) targets
        loss = F.cross_entropy(logits.flatten(0, 1), w[:, 1:].flatten(), reduction="sum")
        total += float(loss)
        count += w[:, 1:].numel()
    model.train(was_training)
    return total / count


def lr_at(step: int, steps: int, lr: float, warmup: int, min_ratio: float = 0.1) -> float:
    """Linear warmup for `warmup` steps, then cosine decay from lr to min_ratio * lr."""
    if step < warmup:
        return lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return lr * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def make_optimizer(model: Transformer, lr: float, weight_decay: float) -> torch.optim.AdamW:
    """AdamW with weight decay on the matrices only (not on norms)."""
    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    groups = [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.95))


# ---- training ------------------------------------------------------------------------------


def train(
    out: str | Path,
    *,
    steps: int = 800,
    batch_size: int = 16,
    lr: float = 3e-3,
    weight_decay: float = 0.1,
    warmup: int = 50,
    grad_clip: float = 1.0,
    vocab_size: int = 1024,
    seed: int = 0,
    quick: bool = False,
    threads: int | None = None,
    device: str = "cpu",
    eval_windows_max: int | None = None,
    command: str = "",
    progress: bool = True,
) -> dict:
    """Train, save to `out`, and return the run record written into config.json."""
    if steps < 1 or batch_size < 1:
        raise KVLibValueError(f"steps and batch_size must be >= 1, got {steps} and {batch_size}")
    t_start = time.perf_counter()
    threads = threads or len(os.sched_getaffinity(0))
    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)

    train_docs, val_docs = split_corpus(load_corpus())
    tokenizer = BPETokenizer.train(train_docs, vocab_size)
    tokenizer.save(out / TOKENIZER_FILE)
    train_ids = tokenizer.encode_corpus(train_docs)  # (N_train,)
    val_ids = tokenizer.encode_corpus(val_docs)  # (N_val,)

    config = model_config(tokenizer.vocab_size, quick=quick)
    T = config.max_seq_len
    model = Transformer(config).to(device)
    model.train()
    opt = make_optimizer(model, lr, weight_decay)
    gen = torch.Generator().manual_seed(seed)
    warmup = min(warmup, max(1, steps // 10))

    bar = tqdm(range(steps), desc="train", disable=not progress, mininterval=2.0)
    for step in bar:
        for group in opt.param_groups:
            group["lr"] = lr_at(step, steps, lr, warmup)
        x, y = random_batch(train_ids, batch_size, T, gen)  # (B, T) each
        logits = model(x.to(device)).float()  # (B, T, V) fp32
        loss = F.cross_entropy(logits.flatten(0, 1), y.to(device).flatten())  # (B*T, V), (B*T,)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
        opt.step()
        if step % 10 == 0 or step == steps - 1:
            bar.set_postfix(loss=f"{loss.item():.3f}", gnorm=f"{float(norm):.2f}")
    bar.close()
    train_time = time.perf_counter() - t_start

    # Measure the shipped (float16) weights, not the fp32 ones still in memory.
    save_model(model, out)
    model = Transformer(config)
    load_weights(model, out / WEIGHTS_FILE)
    model.to(device).eval()
    val_w = eval_windows(val_ids, T, eval_windows_max)  # (N, T + 1)
    train_w = eval_windows(train_ids, T, val_w.shape[0])  # (N, T + 1), as many as validation
    subset = eval_windows(val_ids, T, VAL_SUBSET_WINDOWS)
    val_loss = evaluate(model, val_w)
    train_loss = evaluate(model, train_w)
    subset_loss = evaluate(model, subset)
    uni = unigram_loss(train_ids, val_ids, tokenizer.vocab_size)

    weights_bytes = (out / WEIGHTS_FILE).stat().st_size
    record = {
        "steps": steps,
        "batch_size": batch_size,
        "seq_len": T,
        "tokens_seen": steps * batch_size * T,
        "lr": lr,
        "warmup": warmup,
        "schedule": "linear warmup, cosine decay to 0.1 * lr",
        "weight_decay": weight_decay,
        "grad_clip": grad_clip,
        "optimizer": "AdamW(betas=(0.9, 0.95))",
        "seed": seed,
        "train_time_s": round(train_time, 1),
        "threads": threads,
        "device": str(device),
        "train_loss": train_loss,
        "val_loss": val_loss,
        "val_perplexity": math.exp(val_loss),
        "val_windows": int(val_w.shape[0]),
        "val_subset": {"windows": int(subset.shape[0]), "seq_len": T, "loss": subset_loss},
        "unigram_val_loss": uni,
        "unigram_val_perplexity": math.exp(uni),
        "n_params": sum(p.numel() for p in model.parameters()),
        "weights_bytes": weights_bytes,
        "weights_dtype": str(WEIGHTS_DTYPE).removeprefix("torch."),
        "corpus": {
            "file": CORPUS_PATH.name,
            "sha256": corpus_sha256(),
            "train_documents": len(train_docs),
            "val_documents": len(val_docs),
            "train_tokens": int(train_ids.numel()),
            "val_tokens": int(val_ids.numel()),
        },
        "command": command,
        "torch": torch.__version__,
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
    }
    meta = {
        "model": dataclasses.asdict(config),
        "weights": WEIGHTS_FILE,
        "tokenizer": TOKENIZER_FILE,
        "eot_id": tokenizer.eot_id,
        "training": record,
    }
    (out / CONFIG_FILE).write_text(json.dumps(meta, indent=2) + "\n")
    return record


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(
        prog="python -m kvlib.train", description="Train the book's small model on CPU."
    )
    parser.add_argument(
        "--out", default=str(DATA_DIR), help="output folder (default: kvlib/assets)"
    )
    parser.add_argument("--steps", type=int, default=800)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--vocab-size", type=int, default=1024)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None, help="default: all cores available")
    parser.add_argument("--device", default="cpu")
    parser.add_argument(
        "--quick", action="store_true",
        help="smoke test: toy model, 300-id vocabulary, 5 steps (unless --steps is given)",
    )  # fmt: skip
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    args = parser.parse_args(argv)
    argv_list = sys.argv[1:] if argv is None else argv
    steps = 5 if args.quick and "--steps" not in argv_list else args.steps
    record = train(
        args.out,
        steps=steps,
        batch_size=4 if args.quick else args.batch_size,
        lr=args.lr,
        vocab_size=300 if args.quick else args.vocab_size,
        seed=args.seed,
        quick=args.quick,
        threads=args.threads,
        device=args.device,
        eval_windows_max=4 if args.quick else None,
        command=" ".join(["python -m kvlib.train", *argv_list]),
        progress=not args.no_progress,
    )
    print(
        f"{record['steps']} steps in {record['train_time_s']:.0f} s | "
        f"train loss {record['train_loss']:.3f} | val loss {record['val_loss']:.3f} "
        f"(perplexity {record['val_perplexity']:.1f}; unigram baseline "
        f"{record['unigram_val_perplexity']:.1f}) | weights {record['weights_bytes']} bytes "
        f"-> {args.out}"
    )
    return record


if __name__ == "__main__":
    main()
