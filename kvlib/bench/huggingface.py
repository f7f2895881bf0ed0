"""Section "hf": kvlib's `generate` vs Hugging Face's on the same random-init Llama.

The weights are copied with `kvlib.hf.from_hf_llama`, so both generate the same tokens (checked).
HF runs with its default attention and with the other of sdpa / eager. Target: kvlib at least
as fast as HF on a 125M-class model, where the model's own work dominates; on kvlib's tiny
preset the figure is printed without a target (per-step Python overhead decides it there).
Both models are built from one kvlib `ModelConfig` (`kvlib.hf.hf_config`).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from kvlib.bench.problems import model_125m
from kvlib.bench.report import fmt, target
from kvlib.bench.section import Settings
from kvlib.config import ModelConfig, tiny
from kvlib.errors import BenchError
from kvlib.generate import generate
from kvlib.hf import hf_config, hf_fields
from kvlib.timing import interleaved, median

SPEEDUP_TARGETS = {"125m": 1.0}  # config name -> kvlib speedup over each HF attention
PROMPT_LEN = 16


HF_CONFIGS: dict[str, ModelConfig] = {
    "tiny": tiny(),  # per-step overhead dominates: the decode loop is measured
    "125m": model_125m(),  # matmuls dominate
}


def _hf_llama(config: ModelConfig, seed: int, attn_implementation: str | None):
    import transformers

    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(hf_config(config)).eval()
    if attn_implementation is not None:
        model.set_attn_implementation(attn_implementation)
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    return model


def bench_hf(
    device: torch.device,
    config_name: str,
    new_tokens: int,
    reps: int = 3,
    prompt_len: int = PROMPT_LEN,
    progress: Callable[[], None] | None = None,
) -> dict:
    """kvlib `generate` vs HF `generate` (default attention, and sdpa/eager), same weights."""
    if config_name not in HF_CONFIGS:
        raise BenchError(f"unknown HF config {config_name!r}; known: {sorted(HF_CONFIGS)}")
    try:
        import transformers
    except ImportError:
        return {"skipped": "transformers is not installed"}
    config = HF_CONFIGS[config_name]
    hf_default = _hf_llama(config, seed=0, attn_implementation=None).to(device)
    default_impl = hf_default.config._attn_implementation
    impls = {f"hf_{default_impl}": hf_default}
    for other in ("sdpa", "eager"):
        if other != default_impl:
            m = _hf_llama(config, seed=0, attn_implementation=other).to(device)
            m.load_state_dict(hf_default.state_dict())
            impls[f"hf_{other}"] = m
    from kvlib.hf import from_hf_llama

    model = from_hf_llama(hf_default)  # the same weights, on the same device
    torch.manual_seed(1)
    prompt = torch.randint(0, config.vocab_size, (1, prompt_len), device=device)  # (B, T)
    outputs: dict[str, torch.Tensor] = {}

    def kv() -> None:
        outputs["kvlib"] = generate(model, prompt, new_tokens)

    def hf_fn(name: str, m) -> Callable[[], None]:
        def call() -> None:
            with torch.inference_mode():
                outputs[name] = m.generate(
                    prompt,
                    attention_mask=torch.ones_like(prompt),
                    max_new_tokens=new_tokens,
                    do_sample=False,
                )

        return call

    fns = {"kvlib": kv} | {name: hf_fn(name, m) for name, m in impls.items()}
    times = interleaved(fns, reps, device)
    med = {name: median(ts) for name, ts in times.items()}
    equal = {
        name: bool(
            outputs[name].shape == outputs["kvlib"].shape
            and torch.equal(outputs[name].cpu(), outputs["kvlib"].cpu())
        )
        for name in impls
    }
    if progress:
        progress()
    return {
        "config": config_name,
        "hf_config": hf_fields(config),
        "n_params": model.config.n_params,
        "prompt_len": prompt_len,
        "new_tokens": new_tokens,
        "default_attn": default_impl,
        "transformers": transformers.__version__,
        "tok_s": {name: new_tokens / t for name, t in med.items()},
        "speedup": {name: med[name] / med["kvlib"] for name in impls},
        "tokens_equal": equal,
        "times_s": times,
    }


def hf_targets(name: str, figure: dict) -> list[dict]:
    """kvlib's speedup over each HF attention, for the configs with a target."""
    if "skipped" in figure or name not in SPEEDUP_TARGETS:
        return []
    out = []
    for impl, ratio in figure["speedup"].items():
        same = "tokens identical" if figure["tokens_equal"][impl] else "TOKENS DIFFER"
        out.append(
            target(
                f"kvlib vs HF generate ({name})",
                f"speedup over {impl}",
                ratio,
                ">=",
                SPEEDUP_TARGETS[name],
                same,
            )
        )
    return out


def run(quick: bool, settings: Settings) -> dict:
    """The section: the tiny preset (32 tokens) quick; tiny (64) and 125m (32) full."""
    plan = [("tiny", 32)] if quick else [("tiny", 64), ("125m", 32)]
    figure: dict = {"targets": []}
    for name, n in plan:
        figure[name] = bench_hf(settings.device, name, n, settings.reps, PROMPT_LEN)
        figure["targets"] += hf_targets(name, figure[name])
    return figure


def format(figure: dict) -> list[str]:
    lines = []
    for name, h in figure.items():
        lines.append(f"\nkvlib vs Hugging Face generate, {name} config")
        if "skipped" in h:
            lines.append(f"  skipped: {h['skipped']}")
            continue
        lines.append(f"{'contender':>12} {'tokens/s':>10} {'kvlib speedup':>14} tokens equal")
        for impl, tps in h["tok_s"].items():
            ratio = h["speedup"].get(impl)
            eq = h["tokens_equal"].get(impl, "-")
            lines.append(
                f"{impl:>12} {fmt(tps):>10} {'-' if ratio is None else fmt(ratio):>14} {eq}"
            )
    return lines
