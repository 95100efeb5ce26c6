"""Physical KV cache: per layer, K and V tensors of fixed-size blocks (float, or int8 with
per-token-per-head scales, which holds ~3.8x the tokens of float32 in the same bytes).

Layout per layer: [num_blocks, block_size, num_kv_heads, head_dim]. A flat view over the first
two dimensions makes a token's slot (block * block_size + offset) a single row index.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from lamina.config import CacheConfig, ModelConfig

KV_CACHE_DTYPES = ("auto", "int8")


def bytes_per_block(
    model: ModelConfig, block_size: int, dtype: torch.dtype, kv_cache_dtype: str = "auto"
) -> int:
    """K and V for every layer of one block (int8: one byte per value plus a float32 scale per
    token and head)."""
    tokens_heads = 2 * model.num_hidden_layers * block_size * model.num_key_value_heads
    if kv_cache_dtype == "int8":
        return tokens_heads * (model.head_dim + 4)
    return tokens_heads * model.head_dim * torch.empty((), dtype=dtype).element_size()


def num_blocks_for(model: ModelConfig, cache: CacheConfig, dtype: torch.dtype) -> int:
    """The explicit block count, else as many blocks as the byte budget holds."""
    if cache.num_blocks is not None:
        return cache.num_blocks
    per_block = bytes_per_block(model, cache.block_size, dtype, cache.kv_cache_dtype)
    n = cache.kv_cache_bytes // per_block
    if n < 1:
        raise ValueError(
            f"kv_cache_bytes={cache.kv_cache_bytes} holds no block of {cache.block_size} tokens "
            f"({per_block} bytes each); raise it"
        )
    return int(n)


def _lazy_zeros(
    shape: tuple[int, ...], dtype: torch.dtype, device: torch.device | str
) -> torch.Tensor:
    """Zeros from calloc'd pages on CPU: an unused budget costs no memory. Zeros (not garbage)
    matter: masked-out slots are multiplied by a 0 attention weight, and 0 * NaN is NaN."""
    if torch.device(device).type != "cpu":
        return torch.zeros(shape, dtype=dtype, device=device)
    nbytes = int(np.prod(shape)) * torch.empty((), dtype=dtype).element_size()
    return torch.from_numpy(np.zeros(nbytes, dtype=np.uint8)).view(dtype).view(shape)


@dataclass
class LayerCache:
    """One layer's K/V blocks [num_blocks, block_size, Hkv, D], and for an int8 cache the
    per-token-per-head scales [num_blocks, block_size, Hkv]."""

    k: torch.Tensor
    v: torch.Tensor
    k_scale: torch.Tensor | None = None
    v_scale: torch.Tensor | None = None
    dtype: torch.dtype = torch.float32  # what attention computes in

    @property
    def block_size(self) -> int:
        return self.k.shape[1]

    def write(self, k: torch.Tensor, v: torch.Tensor, slots: torch.Tensor) -> None:
        """Store new rows [T, Hkv, D] at flat slots (block * block_size + offset)."""
        for cache, scales, x in ((self.k, self.k_scale, k), (self.v, self.v_scale, v)):
            if scales is not None:
                x, s = quantize_int8(x)
                scales.view(-1, scales.shape[-1]).index_copy_(0, slots, s)
            cache.view(-1, *cache.shape[2:]).index_copy_(0, slots, x)

    def gather(self, blocks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Whole blocks (a flat id list) -> K, V [n * block_size, Hkv, D] in the compute dtype,
        copied as block-sized contiguous rows."""
        out = []
        for cache, scales in ((self.k, self.k_scale), (self.v, self.v_scale)):
            x = cache.view(cache.shape[0], -1).index_select(0, blocks)
            x = x.view(-1, *cache.shape[2:])
            if scales is not None:
                s = scales.view(scales.shape[0], -1).index_select(0, blocks).view(-1, x.shape[1])
                x = (x.to(torch.float32) * s.unsqueeze(-1)).to(self.dtype)
            out.append(x)
        return out[0], out[1]

    def gather_slots(self, slots: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Single token slots -> K, V [n, Hkv, D] (for token-level policies such as H2O)."""
        return (
            _gather_rows(self.k, self.k_scale, slots, self.dtype),
            _gather_rows(self.v, self.v_scale, slots, self.dtype),
        )


def _gather_rows(
    cache: torch.Tensor, scales: torch.Tensor | None, slots: torch.Tensor, dtype: torch.dtype
) -> torch.Tensor:
    x = cache.view(-1, *cache.shape[2:]).index_select(0, slots)
    if scales is not None:
        s = scales.view(-1, scales.shape[-1]).index_select(0, slots)
        x = (x.to(torch.float32) * s.unsqueeze(-1)).to(dtype)
    return x


def quantize_int8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 per token and head: x [T, H, D] -> (int8 [T, H, D], scale [T, H])."""
    xf = x.to(torch.float32)
    scale = xf.abs().amax(dim=-1).clamp(min=1e-8) / 127.0
    q = torch.round(xf / scale.unsqueeze(-1)).clamp(-127, 127).to(torch.int8)
    return q, scale


class KVCache:
    """The K/V block tensors of every layer, in one lazily zeroed allocation."""

    def __init__(
        self,
        model: ModelConfig,
        num_blocks: int,
        block_size: int,
        dtype: torch.dtype,
        device: torch.device | str = "cpu",
        kv_cache_dtype: str = "auto",
    ) -> None:
        if kv_cache_dtype not in KV_CACHE_DTYPES:
            raise ValueError(
                f"kv_cache_dtype {kv_cache_dtype!r} is not supported; accepted: {KV_CACHE_DTYPES}"
            )
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.kv_cache_dtype = kv_cache_dtype
        layers, heads = model.num_hidden_layers, model.num_key_value_heads
        shape = (layers, 2, num_blocks, block_size, heads, model.head_dim)
        quantized = kv_cache_dtype == "int8"
        buf = _lazy_zeros(shape, torch.int8 if quantized else dtype, device)
        scales = (
            _lazy_zeros((layers, 2, num_blocks, block_size, heads), torch.float32, device)
            if quantized
            else None
        )
        self.layers = [
            LayerCache(
                buf[i, 0],
                buf[i, 1],
                None if scales is None else scales[i, 0],
                None if scales is None else scales[i, 1],
                dtype,
            )
            for i in range(layers)
        ]

    def layer(self, i: int) -> LayerCache:
        return self.layers[i]

    def copy_blocks(self, pairs: list[tuple[int, int]]) -> None:
        """Copy whole blocks src -> dst in every layer (copy-on-write)."""
        if not pairs:
            return
        src = torch.tensor([s for s, _ in pairs], dtype=torch.int64)
        dst = torch.tensor([d for _, d in pairs], dtype=torch.int64)
        for layer in self.layers:
            for t in (layer.k, layer.v, layer.k_scale, layer.v_scale):
                if t is not None:
                    t[dst] = t[src]
