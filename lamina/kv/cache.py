"""Physical KV cache: per layer, K and V tensors of fixed-size blocks.

Layout per layer: [num_blocks, block_size, num_kv_heads, head_dim]. A flat view over the first
two dimensions makes a token's slot (block * block_size + offset) a single row index.
"""

from __future__ import annotations

import numpy as np
import torch

from lamina.config import CacheConfig, ModelConfig


def bytes_per_block(model: ModelConfig, block_size: int, dtype: torch.dtype) -> int:
    """K and V for every layer of one block."""
    elem = torch.empty((), dtype=dtype).element_size()
    return 2 * model.num_hidden_layers * block_size * model.kv_size * elem


def num_blocks_for(model: ModelConfig, cache: CacheConfig, dtype: torch.dtype) -> int:
    """The explicit block count, else as many blocks as the byte budget holds."""
    if cache.num_blocks is not None:
        return cache.num_blocks
    n = cache.kv_cache_bytes // bytes_per_block(model, cache.block_size, dtype)
    if n < 1:
        raise ValueError(
            f"kv_cache_bytes={cache.kv_cache_bytes} holds no block of {cache.block_size} tokens "
            f"({bytes_per_block(model, cache.block_size, dtype)} bytes each); raise it"
        )
    return int(n)


class KVCache:
    """The K/V block tensors of every layer."""

    def __init__(
        self,
        model: ModelConfig,
        num_blocks: int,
        block_size: int,
        dtype: torch.dtype,
        device: torch.device | str = "cpu",
    ) -> None:
        self.num_blocks = num_blocks
        self.block_size = block_size
        shape = (num_blocks, block_size, model.num_key_value_heads, model.head_dim)
        layers = model.num_hidden_layers
        full = (layers, 2, *shape)
        if torch.device(device).type == "cpu":
            # calloc'd pages: zero without touching memory, so an unused budget costs nothing
            nbytes = int(np.prod(full)) * torch.empty((), dtype=dtype).element_size()
            buf = torch.from_numpy(np.zeros(nbytes, dtype=np.uint8)).view(dtype).view(full)
        else:
            buf = torch.zeros(full, dtype=dtype, device=device)
        # Zeros (not garbage) matter: masked-out slots are multiplied by a 0 attention weight,
        # and 0 * NaN would poison the output.
        self.k = [buf[i, 0] for i in range(layers)]
        self.v = [buf[i, 1] for i in range(layers)]

    def layer(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.k[i], self.v[i]

    def copy_blocks(self, pairs: list[tuple[int, int]]) -> None:
        """Copy whole blocks src -> dst in every layer (copy-on-write)."""
        if not pairs:
            return
        src = torch.tensor([s for s, _ in pairs], dtype=torch.int64)
        dst = torch.tensor([d for _, d in pairs], dtype=torch.int64)
        for k, v in zip(self.k, self.v):
            k[dst] = k[src]
            v[dst] = v[src]
