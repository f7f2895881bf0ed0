"""The small model this project trained (`python -m kvlib.train`), shipped inside kvlib, and
the checkpoint format both use.

`load_pretrained()` returns (model, tokenizer): a kvlib `Transformer` in eval mode with fp32
weights on the requested device, and the `BPETokenizer` it was trained with. A checkpoint is a
folder of three files: WEIGHTS_FILE (float16 safetensors, no pickle; tied weights stored once),
CONFIG_FILE (the ModelConfig and the record of the training run, `training_record()`) and
TOKENIZER_FILE. `kvlib.train` writes them with `save_model`; this module reads them, so
`import kvlib` never loads the trainer.

Shapes: the model maps tokens (B, T) int64 to logits (B, T, V), V = tokenizer.vocab_size.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from kvlib.config import ModelConfig
from kvlib.data import DATA_DIR, AssetError, BPETokenizer, read_json
from kvlib.errors import KVLibTypeError, KVLibValueError, MissingFileError
from kvlib.transformer import Transformer, check_state_dict

WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
TOKENIZER_FILE = "tokenizer.json"
WEIGHTS_DTYPE = torch.float16


# ---- the checkpoint's weights -----------------------------------------------------------


def save_model(model: Transformer, out: Path, dtype: torch.dtype = WEIGHTS_DTYPE) -> None:
    """Weights as safetensors of `dtype`, float16 by default (contiguous copies; tied weights
    are stored once)."""
    state = {k: v.detach().to("cpu", dtype).contiguous() for k, v in model.state_dict().items()}
    if model.config.tie_embeddings:
        state.pop("output.weight", None)
    save_file(state, str(out / WEIGHTS_FILE))


def load_weights(model: Transformer, path: Path) -> None:
    """Load safetensors weights into `model` (any dtype/device), strictly."""
    if not Path(path).is_file():
        raise MissingFileError(f"{path} is missing (expected safetensors weights)")
    try:
        state = load_file(str(path))
    except Exception as err:  # safetensors raises its own error type for a damaged file
        raise AssetError(path, "a safetensors file of weights", err) from err
    check_state_dict(state, model.config, source=str(path))  # tied weights are stored once
    if model.config.tie_embeddings:
        state["output.weight"] = state["tok_embeddings.weight"]
    model.load_state_dict({k: v.to(model.dtype) for k, v in state.items()}, strict=True)


def _read_config(path: Path) -> dict:
    config_path = path / CONFIG_FILE
    if not config_path.is_file():
        raise MissingFileError(
            f"no {CONFIG_FILE} in {path}: train a model there first (python -m kvlib.train "
            f"--out {path})"
        )
    meta = read_json(config_path, "the config.json written by kvlib.train")
    for key in ("model", "weights", "tokenizer"):
        if not isinstance(meta, dict) or key not in meta:
            raise KVLibValueError(
                f"{config_path} has no '{key}' entry (not written by kvlib.train?)"
            )
    return meta


def training_record(path: str | Path = DATA_DIR) -> dict:
    """The record of the training run (steps, time, losses, corpus checksum, ...)."""
    return _read_config(Path(path)).get("training", {})


def load_pretrained(
    device: torch.device | str = "cpu",
    path: str | Path = DATA_DIR,
    dtype: torch.dtype = torch.float32,
) -> tuple[Transformer, BPETokenizer]:
    """(model, tokenizer) of the shipped model (or of a `kvlib.train` output folder `path`).

    The model is in eval mode, with weights of `dtype` (fp32 by default) on `device`.
    """
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise KVLibTypeError(
            f"dtype must be a floating torch.dtype such as torch.float32, got {dtype!r}"
        )
    path = Path(path)
    meta = _read_config(path)
    config = ModelConfig(**meta["model"])
    tokenizer = BPETokenizer.load(path / meta["tokenizer"])
    if tokenizer.vocab_size != config.vocab_size:
        raise KVLibValueError(
            f"{path}: the tokenizer has {tokenizer.vocab_size} ids but the model expects "
            f"vocab_size={config.vocab_size}"
        )
    model = Transformer(config)
    load_weights(model, path / meta["weights"])
    model = model.to(device=device, dtype=dtype).eval()
    return model, tokenizer
