"""Write a kvlib Llama as a standard Hugging Face checkpoint folder.

    python -m kvlib.export OUT          # the book's trained model (kvlib.load_pretrained)

The folder holds what `transformers.AutoModelForCausalLM` / `AutoTokenizer.from_pretrained`
and vLLM read:

    config.json               LlamaForCausalLM (`kvlib.hf.hf_fields`), bos = eos = end-of-text
    generation_config.json    the same token ids
    model.safetensors         the weights under Hugging Face names (`kvlib.hf.to_hf_state_dict`)
    tokenizer.json            kvlib's byte-level BPE for the `tokenizers` library
    tokenizer_config.json     PreTrainedTokenizerFast, `<|endoftext|>` as bos/eos/unk
    special_tokens_map.json

The tokenizer gives the same ids as `kvlib.data.BPETokenizer` for every text:

    pre_tokenizer  Split on PIECE_RE (each match is a piece), then ByteLevel: each byte becomes
                   one printable character (GPT-2's byte-to-unicode table), no prefix space
    model          BPE over those characters: ids 0..255 the bytes, then one id per merge, in
                   rank order (the lowest-ranked pair present is merged first, as kvlib does)
    decoder        ByteLevel: characters back to bytes, then UTF-8 with U+FFFD for invalid bytes

Python's `\\s` (str.isspace) and the `tokenizers` regex engine's `\\s` differ (U+001C..U+001F,
U+0085), so the exported pattern spells the whitespace class out. The text `<|endoftext|>`
is plain bytes for kvlib, so tokenizer_config.json sets split_special_tokens: the special
token is only ever produced as an id, never matched in text. One difference is left: text
holding lone surrogates (not valid Unicode) cannot be passed to `tokenizers` at all, and a
decoded byte run that kvlib reads as a surrogate (ED A0..BF ..) comes back as U+FFFD.

Nothing is half-written: the files go to a temporary folder beside OUT, renamed into place
when complete. `transformers` is not needed to export (the files are plain JSON and
safetensors).
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
from functools import cache
from pathlib import Path

import torch
from safetensors.torch import save_file

from kvlib.config import ModelConfig
from kvlib.data import EOT, PIECE_RE, BPETokenizer
from kvlib.errors import KVLibTypeError, KVLibValueError, check_bool, check_int
from kvlib.hf import hf_fields, to_hf_state_dict
from kvlib.pretrained import DATA_DIR, load_pretrained
from kvlib.transformer import Transformer

WEIGHTS_FILE = "model.safetensors"
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


# ---- the tokenizer -------------------------------------------------------------------------


@cache
def byte_to_unicode() -> dict[int, str]:
    """GPT-2's table: each byte as one printable character (printable Latin-1 bytes are
    themselves, the others are moved to U+0100 and up)."""
    keep = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAC + 1), *range(0xAE, 0xFF + 1)]
    table, extra = {}, 0
    for b in range(256):
        if b in keep:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table


@cache
def _whitespace() -> str:
    """Every character Python's `\\s` matches in a str pattern (str.isspace)."""
    return "".join(chr(c) for c in range(0x110000) if chr(c).isspace())


def hf_pattern(pattern: str = PIECE_RE.pattern) -> str:
    """A kvlib piece pattern in the `tokenizers` regex syntax: `\\s` and `\\S` spelled out as
    Python's whitespace class, so both engines cut every text into the same pieces."""
    ws = _whitespace()
    out = pattern.replace("[^\\s", "[^" + ws).replace("\\s", f"[{ws}]").replace("\\S", f"[^{ws}]")
    if "\\s" in out or "\\S" in out:
        raise KVLibValueError(f"cannot translate the piece pattern {pattern!r}: a \\s is left")
    return out


def tokenizer_json(tokenizer: BPETokenizer) -> dict:
    """The `tokenizers` library's tokenizer.json for a kvlib BPETokenizer (same ids)."""
    if not isinstance(tokenizer, BPETokenizer):
        raise KVLibTypeError(
            f"tokenizer must be a kvlib BPETokenizer, got {type(tokenizer).__name__}"
        )
    table = byte_to_unicode()
    names = ["".join(table[b] for b in token) for token in tokenizer.vocab]  # id -> string
    if len(set(names)) != len(names):
        raise KVLibValueError(
            "two ids of this tokenizer spell the same bytes; a Hugging Face BPE vocabulary "
            "needs one id per string"
        )
    vocab = {name: i for i, name in enumerate(names)} | {EOT: tokenizer.eot_id}
    special = dict(content=EOT, single_word=False, lstrip=False, rstrip=False, normalized=False)
    return {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": [{"id": tokenizer.eot_id, **special, "special": True}],
        "normalizer": None,
        "pre_tokenizer": {
            "type": "Sequence",
            "pretokenizers": [
                {"type": "Split", "pattern": {"Regex": hf_pattern()}, "behavior": "Isolated",
                 "invert": False},
                {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False,
                 "use_regex": False},
            ],
        },
        "post_processor": None,
        "decoder": {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False,
                    "use_regex": False},
        "model": {
            "type": "BPE",
            "dropout": None,
            "unk_token": None,
            "continuing_subword_prefix": None,
            "end_of_word_suffix": None,
            "fuse_unk": False,
            "byte_fallback": False,
            "ignore_merges": False,
            "vocab": vocab,
            "merges": [f"{names[a]} {names[b]}" for a, b in tokenizer.merges],
        },
    }  # fmt: skip


def tokenizer_config(tokenizer: BPETokenizer, max_len: int) -> dict:
    """tokenizer_config.json: no tokens added to a text, `<|endoftext|>` never read from it."""
    return {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": EOT,
        "eos_token": EOT,
        "unk_token": EOT,
        "add_bos_token": False,
        "add_eos_token": False,
        "split_special_tokens": True,
        "clean_up_tokenization_spaces": False,
        "model_max_length": max_len,
        "added_tokens_decoder": {str(tokenizer.eot_id): {"content": EOT, "special": True}},
    }


# ---- the model ------------------------------------------------------------------------------


def config_json(config: ModelConfig, eot_id: int | None, dtype: torch.dtype) -> dict:
    """config.json of a LlamaForCausalLM with the shapes of `config` (bos = eos = `eot_id`)."""
    name = next(k for k, v in DTYPES.items() if v == dtype)
    fields = hf_fields(config)
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        **fields,
        "rope_parameters": {"rope_type": "default", "rope_theta": fields["rope_theta"]},
        "hidden_act": "silu",
        "attention_bias": False,
        "mlp_bias": False,
        "bos_token_id": eot_id,
        "eos_token_id": eot_id,
        "dtype": name,
        "torch_dtype": name,  # the key transformers 4.x reads
    }


def _check_args(model, tokenizer, eot_id, dtype, overwrite) -> tuple[int | None, torch.dtype]:
    if not isinstance(model, Transformer):
        raise KVLibTypeError(f"model must be a kvlib Transformer, got {type(model).__name__}")
    config = model.config
    if tokenizer is not None:
        if not isinstance(tokenizer, BPETokenizer):
            raise KVLibTypeError(
                f"tokenizer must be a kvlib BPETokenizer or None, got {type(tokenizer).__name__}"
            )
        if tokenizer.vocab_size != config.vocab_size:
            raise KVLibValueError(
                f"the tokenizer has {tokenizer.vocab_size} ids but the model's vocab_size is "
                f"{config.vocab_size}; they must be equal"
            )
        if eot_id is None:
            eot_id = tokenizer.eot_id
        elif eot_id != tokenizer.eot_id:
            raise KVLibValueError(
                f"eot_id={eot_id} but the tokenizer's end-of-text id is {tokenizer.eot_id}"
            )
    if eot_id is not None:
        check_int("eot_id", eot_id, low=0, high=config.vocab_size - 1)
    dtype = model.dtype if dtype is None else dtype
    if dtype not in DTYPES.values():
        raise KVLibTypeError(f"dtype must be one of {list(DTYPES)} as torch dtypes, got {dtype!r}")
    check_bool("overwrite", overwrite)
    return eot_id, dtype


def _check_out(out: Path, overwrite: bool) -> None:
    if out.exists() and not out.is_dir():
        raise KVLibValueError(f"{out} is a file; expected a new or empty folder")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise KVLibValueError(
            f"{out} is not empty; expected a new or empty folder (overwrite=True, or "
            "--overwrite, replaces it)"
        )


def _write_json(path: Path, value: dict) -> None:
    path.write_text(json.dumps(value, indent=2, ensure_ascii=True) + "\n", encoding="utf-8")


def export(
    model: Transformer,
    out: str | Path,
    tokenizer: BPETokenizer | None = None,
    *,
    eot_id: int | None = None,
    dtype: torch.dtype | None = None,
    overwrite: bool = False,
) -> Path:
    """Write `model` (and `tokenizer`, when given) as a Hugging Face Llama checkpoint in `out`.

    eot_id: the end-of-text id, written as bos and eos (default: the tokenizer's; None without
    a tokenizer). dtype: of the saved weights (default: the model's). `out` must be new or
    empty unless overwrite=True. Returns the folder's path.
    """
    eot_id, dtype = _check_args(model, tokenizer, eot_id, dtype, overwrite)
    out = Path(out).absolute()
    _check_out(out, overwrite)
    config = model.config
    state = {k: v.detach().to("cpu", dtype).contiguous() for k, v in model.state_dict().items()}
    weights = to_hf_state_dict(state, config)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        save_file(weights, str(tmp / WEIGHTS_FILE), metadata={"format": "pt"})
        _write_json(tmp / "config.json", config_json(config, eot_id, dtype))
        _write_json(
            tmp / "generation_config.json", {"bos_token_id": eot_id, "eos_token_id": eot_id}
        )
        if tokenizer is not None:
            _write_json(tmp / "tokenizer.json", tokenizer_json(tokenizer))
            _write_json(
                tmp / "tokenizer_config.json", tokenizer_config(tokenizer, config.max_seq_len)
            )
            names = dict(bos_token=EOT, eos_token=EOT, unk_token=EOT)
            _write_json(tmp / "special_tokens_map.json", names)
        umask = os.umask(0)
        os.umask(umask)  # read it back: mkdtemp made the folder private
        tmp.chmod(0o777 & ~umask)
        for path in tmp.iterdir():
            path.chmod(0o666 & ~umask)
        if out.is_dir():
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old.", dir=out.parent))
            os.rename(out, old / out.name)  # an empty folder, or one overwrite allows
            try:
                os.rename(tmp, out)
            except OSError:
                os.rename(old / out.name, out)  # the old folder goes back
                raise
            finally:
                shutil.rmtree(old)  # the replaced folder, or nothing when it went back
        else:
            os.rename(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return out


def main(argv: list[str] | None = None) -> None:
    """Export the book's trained model (or a `kvlib.train` output folder) for Hugging Face."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m kvlib.export", description=main.__doc__)
    parser.add_argument("out", help="the folder to write (new or empty)")
    parser.add_argument("--model", default=str(DATA_DIR), help="a kvlib checkpoint folder")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty folder")
    args = parser.parse_args(argv)
    model, tokenizer = load_pretrained(path=args.model)
    out = export(model, args.out, tokenizer, dtype=DTYPES[args.dtype], overwrite=args.overwrite)
    print(f"wrote {out}: {', '.join(sorted(p.name for p in out.iterdir()))}", file=sys.stdout)


if __name__ == "__main__":
    main()
