"""Small random models the tests share: the three attention kinds on kvlib's tiny preset."""

import torch

from kvlib.config import ModelConfig, tiny
from kvlib.transformer import Transformer

CONFIGS = {
    "MHA": tiny(n_kv_heads=4),
    "GQA": tiny(),
    "MQA": tiny(n_kv_heads=1, tie_embeddings=True),
}


def model_for(
    config: ModelConfig, dtype: torch.dtype = torch.float32, seed: int = 0, std: float = 0.2
) -> Transformer:
    """A Transformer with seeded random weights (init std `std`), in `dtype`, in eval mode."""
    torch.manual_seed(seed)
    return Transformer(config, init_std=std).to(dtype).eval()
