"""Where a checkpoint's projection matrices live inside lamina's fused decoder linears.

lamina stacks q/k/v into one `qkv_proj` and gate/up into one `gate_up_proj` (fewer, larger
matmuls matter on a CPU), while checkpoints (Hugging Face, GGUF, AutoAWQ) store them apart.
Loading, saving a pruned model, reading quantized checkpoints, folding AWQ / SmoothQuant scales
into the right rows and pruning each original matrix as its own group all cross between the two
views. They read the geometry from one declaration (`PackedModule`, listed by the model class)
resolved against a config (`WeightLayout`), the part vLLM's `packed_modules_mapping` plays,
instead of each re-deriving which rows are whose.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

import torch

from lamina.config import ModelConfig


@dataclass(frozen=True)
class PackedModule:
    """One decoder linear as lamina holds it and as checkpoints store it.

    fused: its module path inside a decoder layer, e.g. "self_attn.qkv_proj".
    parts: the checkpoint module paths whose weight rows it stacks, in row order.
    rows: for each part, the `ModelConfig` attribute giving its row count ("q_size", "kv_size"):
        named rather than computed, so the declaration stays plain data.
    A linear that is not fused is a pack of one part (its own path)."""

    fused: str
    parts: tuple[str, ...]
    rows: tuple[str, ...]

    def __post_init__(self) -> None:
        if not self.parts or len(self.parts) != len(self.rows):
            raise ValueError(f"{self.fused}: parts {self.parts} and rows {self.rows} must pair up")

    @property
    def is_packed(self) -> bool:
        """Whether several checkpoint matrices share this linear's rows."""
        return len(self.parts) > 1


class Slot(NamedTuple):
    """Where one checkpoint part's rows sit: in linear `fused`, rows start .. start + size."""

    fused: str
    start: int
    size: int


@dataclass(frozen=True)
class WeightLayout:
    """The decoder linears of a model (`modules`) resolved against its `config`: row counts,
    offsets, and the split / fuse between checkpoint parts and fused weights (dim 0 throughout:
    a weight is [out, in], a bias [out], quantized codes and scales [out, ...])."""

    config: ModelConfig
    modules: tuple[PackedModule, ...]

    @property
    def fused_names(self) -> tuple[str, ...]:
        """Module paths (inside a decoder layer) of every decoder linear, in forward order."""
        return tuple(m.fused for m in self.modules)

    def module(self, fused: str) -> PackedModule:
        for m in self.modules:
            if m.fused == fused:
                return m
        raise KeyError(f"{fused!r} is not a decoder linear; these are: {self.fused_names}")

    def checkpoint_parts(self, fused: str) -> tuple[str, ...]:
        """The checkpoint module paths stacked in `fused`, in row order."""
        return self.module(fused).parts

    def shard_sizes(self, fused: str) -> list[int]:
        """Row count of each checkpoint part of `fused`, in row order."""
        return [int(getattr(self.config, r)) for r in self.module(fused).rows]

    def slot(self, part: str) -> Slot | None:
        """Where the rows of checkpoint module `part` (e.g. "self_attn.v_proj") live; None
        for a path that is no decoder linear's part (norms)."""
        for m in self.modules:
            if part in m.parts:
                i = m.parts.index(part)
                sizes = self.shard_sizes(m.fused)
                return Slot(m.fused, sum(sizes[:i]), sizes[i])
        return None

    def split(self, fused: str, tensor: torch.Tensor) -> list[torch.Tensor]:
        """A fused tensor's rows, one view per checkpoint part (in `checkpoint_parts` order)."""
        sizes = self.shard_sizes(fused)
        if tensor.shape[0] != sum(sizes):
            raise ValueError(
                f"{fused} has {sum(sizes)} rows ({sizes}) for this config, the tensor "
                f"{tensor.shape[0]}"
            )
        return list(torch.split(tensor, sizes, dim=0))

    def fuse(self, fused: str, parts: Sequence[torch.Tensor]) -> torch.Tensor:
        """The checkpoint parts' tensors (in `checkpoint_parts` order) stacked into `fused`'s."""
        sizes = self.shard_sizes(fused)
        got = [int(t.shape[0]) for t in parts]
        if got != sizes:
            raise ValueError(f"{fused} stacks parts of {sizes} rows for this config, got {got}")
        return torch.cat(list(parts), dim=0)
