"""The LLaMA decoder (Touvron et al., 2023) for Llama 1-3, Mistral, Qwen2 and SmolLM2.

Differences between the family members are config switches: GQA/MQA through
`num_key_value_heads`, Qwen2's q/k/v bias through `attention_bias`, tied embeddings, the RoPE
scheme. q/k/v and gate/up projections are fused into one matmul each (fewer, larger ops matter
on a CPU); `DECODER_LINEARS` declares that stacking (lamina/models/layout.py) and
`load_weights` maps checkpoint names onto the fused parameters through it.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Collection, Iterable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, TypeVar, cast

import torch
from torch import nn

from lamina.attention.base import AttentionBackend
from lamina.attention.metadata import AttentionMetadata
from lamina.attention.torch_backend import TorchAttentionBackend
from lamina.config import ModelConfig
from lamina.kv.cache import LayerCache
from lamina.layers.activation import silu_and_mul
from lamina.layers.linear import Linear, can_pack, pack_weight, packed_linear, pad_rows
from lamina.layers.norm import RMSNorm
from lamina.layers.rotary import RotaryEmbedding, apply_rotary
from lamina.models.layout import PackedModule, WeightLayout

if TYPE_CHECKING:  # only for the attributes quantize_model and prune_model attach
    from lamina.prune.wanda import PruneConfig
    from lamina.quant.apply import QuantConfig


class LlamaAttention(nn.Module):
    def __init__(self, config: ModelConfig, rotary: RotaryEmbedding, dtype: torch.dtype) -> None:
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = config.head_dim
        self.q_size, self.kv_size = config.q_size, config.kv_size
        self.scale = self.head_dim**-0.5
        self.qkv_proj = Linear(
            config.hidden_size, self.q_size + 2 * self.kv_size, config.attention_bias, dtype
        )
        self.o_proj = Linear(self.q_size, config.hidden_size, False, dtype)
        self.rotary = rotary
        # the engine installs the backend it selected (LlamaForCausalLM.set_attention_backend)
        self.backend: AttentionBackend = TorchAttentionBackend()

    def forward(
        self,
        positions: torch.Tensor,
        x: torch.Tensor,
        kv: LayerCache,
        meta: AttentionMetadata,
    ) -> torch.Tensor:
        qkv = self.qkv_proj(x)
        heads = self.num_heads + self.num_kv_heads
        qk = qkv[:, : self.q_size + self.kv_size].view(-1, heads, self.head_dim)
        v = qkv[:, self.q_size + self.kv_size :].view(-1, self.num_kv_heads, self.head_dim)
        cos, sin = self.rotary.cos_sin(positions, qkv.dtype, meta.rope_lens)
        if not meta.keys_rotated_on_read:  # q and k heads rotated in one pass: half the ops
            q, k = torch.split(
                apply_rotary(qk, cos, sin, self.rotary.rotary_dim),
                [self.num_heads, self.num_kv_heads],
                dim=1,
            )
        else:  # StreamingLLM / H2O by rank: keys are cached un-rotated and rotated when read
            q, k = torch.split(qk, [self.num_heads, self.num_kv_heads], dim=1)
            q = apply_rotary(q, cos, sin, self.rotary.rotary_dim)
        k = k.contiguous()
        out = self.backend.forward(q, k, v.contiguous(), kv, meta, self.scale, self.rotary)
        y: torch.Tensor = self.o_proj(out.view(-1, self.q_size))
        return y


class LlamaMLP(nn.Module):
    def __init__(self, config: ModelConfig, dtype: torch.dtype) -> None:
        super().__init__()
        self.gate_up_proj = Linear(
            config.hidden_size, 2 * config.intermediate_size, config.mlp_bias, dtype
        )
        self.down_proj = Linear(
            config.intermediate_size, config.hidden_size, config.mlp_bias, dtype
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y: torch.Tensor = self.down_proj(silu_and_mul(self.gate_up_proj(x)))
        return y


class LlamaDecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, rotary: RotaryEmbedding, dtype: torch.dtype) -> None:
        super().__init__()
        self.self_attn = LlamaAttention(config, rotary, dtype)
        self.mlp = LlamaMLP(config, dtype)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, dtype)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, dtype)

    def forward(
        self,
        positions: torch.Tensor,
        h: torch.Tensor,
        kv: LayerCache,
        meta: AttentionMetadata,
    ) -> torch.Tensor:
        h = h + self.self_attn(positions, self.input_layernorm(h), kv, meta)
        out: torch.Tensor = h + self.mlp(self.post_attention_layernorm(h))
        return out


_F = TypeVar("_F", bound=Callable[..., Any])


def on_row_major_weights(fn: _F) -> _F:
    """Decorate a function that reads or rewrites the weights of the model given as its first
    argument: it runs inside `model.row_major_weights()`, so it also works on a model the engine
    has packed."""

    @functools.wraps(fn)
    def wrapper(model: LlamaForCausalLM, *args: Any, **kwargs: Any) -> Any:
        with model.row_major_weights():
            return fn(model, *args, **kwargs)

    return wrapper  # type: ignore[return-value]


# The decoder linears, in forward order: the checkpoint matrices each one stacks and their
# row counts. Loading, pruning, quantization and quantized-checkpoint readers all go by this.
DECODER_LINEARS = (
    PackedModule(
        "self_attn.qkv_proj",
        ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
        ("q_size", "kv_size", "kv_size"),
    ),
    PackedModule("self_attn.o_proj", ("self_attn.o_proj",), ("hidden_size",)),
    PackedModule(
        "mlp.gate_up_proj",
        ("mlp.gate_proj", "mlp.up_proj"),
        ("intermediate_size", "intermediate_size"),
    ),
    PackedModule("mlp.down_proj", ("mlp.down_proj",), ("hidden_size",)),
)
_TOP_LEVEL = {  # checkpoint name -> parameter path, outside the decoder layers
    "model.embed_tokens.weight": "embed_tokens",
    "lm_head.weight": "lm_head",
    "model.norm.weight": "norm.weight",
}


class LlamaForCausalLM(nn.Module):
    """Token ids of a flat multi-sequence batch -> hidden states; logits on demand."""

    def __init__(self, config: ModelConfig, dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        self.config = config
        self.dtype = dtype
        self.rotary = RotaryEmbedding(config)
        self.embed_tokens = nn.Parameter(
            torch.empty(config.vocab_size, config.hidden_size, dtype=dtype), requires_grad=False
        )
        self.layers = nn.ModuleList(
            LlamaDecoderLayer(config, self.rotary, dtype) for _ in range(config.num_hidden_layers)
        )
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps, dtype)
        self.lm_head = (
            None
            if config.tie_word_embeddings
            else nn.Parameter(
                torch.empty(config.vocab_size, config.hidden_size, dtype=dtype), requires_grad=False
            )
        )

        self.packed_lm_head: torch.Tensor | None = None  # set by pack_weights
        # a compact exact lookup for a tied embedding (GGUF rows), which lets pack_weights drop
        # the dense table once it serves as the packed head
        self.embed_lookup: nn.Module | None = None
        # attached by quantize_model / load_quantized and prune_model (what save_* writes), and
        # by the native-quant readers ({module path: source format type} of native linears)
        self.quant_config: QuantConfig | None = None
        self.prune_config: PruneConfig | None = None
        self.gguf_native: dict[str, str] | None = None
        self.awq_native: dict[str, str] | None = None
        self.min_rows = 1  # set_batch_invariant

    @property
    def decoder_layers(self) -> list[LlamaDecoderLayer]:
        """`layers`, typed (to a type checker a ModuleList holds plain Modules)."""
        return [cast(LlamaDecoderLayer, layer) for layer in self.layers]

    def set_attention_backend(self, backend: AttentionBackend) -> None:
        """Make every layer attend through `backend` (chosen by the engine at start)."""
        for layer in self.decoder_layers:
            layer.self_attn.backend = backend

    @property
    def attention_backend(self) -> AttentionBackend:
        return self.decoder_layers[0].self_attn.backend

    @property
    def lm_head_weight(self) -> torch.Tensor:
        return self.embed_tokens if self.lm_head is None else self.lm_head

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        kv_cache: list[LayerCache],
        meta: AttentionMetadata,
    ) -> torch.Tensor:
        h = self.embed(input_ids)
        for layer, kv in zip(self.layers, kv_cache):
            h = layer(positions, h, kv, meta)
        out: torch.Tensor = self.norm(h)
        return out

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Token embeddings, from the dense table or, once it is dropped, the compact one."""
        if self.embed_lookup is not None and self.embed_tokens.numel() == 0:
            rows: torch.Tensor = self.embed_lookup(input_ids)
            return rows
        return self.embed_tokens[input_ids]

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Float32 logits for the selected hidden rows (sampling wants full precision)."""
        if self.packed_lm_head is not None:
            return packed_linear(hidden, self.packed_lm_head, min_rows=self.min_rows).float()
        rows = hidden.shape[0]
        padded = pad_rows(hidden, self.min_rows)
        return torch.nn.functional.linear(padded, self.lm_head_weight)[:rows].float()

    def set_batch_invariant(self, on: bool) -> None:
        """Compute every matrix product over at least two rows, where oneDNN's result for a row
        does not depend on the others (layers/linear.py); attention is the backend's part."""
        self.min_rows = 2 if on else 1
        for m in self.modules():
            if isinstance(m, Linear):
                m.min_rows = self.min_rows

    def pack_weights(self) -> int:
        """Pack every plain Linear and the LM head for oneDNN's CPU GEMM (lamina/layers/
        linear.py); quantized linears keep their own kernels. The embedding table stays
        row-major for the lookup, so a tied head costs one more vocab x hidden copy, taken for
        speed: the head is the largest GEMM of a decode step (SmolLM2: 28M of 135M weights) and
        runs 2-4x faster packed. Returns the number of matrices packed."""
        count = sum(m.pack() for m in self.modules() if type(m) is Linear)
        if self.packed_lm_head is None and can_pack(self.lm_head_weight):
            self.packed_lm_head = pack_weight(self.lm_head_weight)
            if self.lm_head is not None:  # untied: the row-major head is no longer needed
                self.lm_head = nn.Parameter(self.lm_head.new_empty(0), requires_grad=False)
            elif self.embed_lookup is not None:  # tied, with a compact table for lookups
                self.embed_tokens = nn.Parameter(
                    self.embed_tokens.new_empty(0), requires_grad=False
                )
            count += 1
        return count

    def unpack_weights(self) -> bool:
        """Undo `pack_weights`: row-major weights again, for code that reads or edits them.
        Returns whether anything was packed."""
        was_packed = self.packed_lm_head is not None
        for m in self.modules():
            if type(m) is Linear and m.packed is not None:
                m.unpack()
                was_packed = True
        if self.packed_lm_head is not None:
            dense = nn.Parameter(self.packed_lm_head.to_dense(), requires_grad=False)
            if self.lm_head is not None:
                self.lm_head = dense
            elif self.embed_tokens.numel() == 0:
                self.embed_tokens = dense
            self.packed_lm_head = None
        return was_packed

    @contextmanager
    def row_major_weights(self) -> Iterator[None]:
        """Unpacked weights inside the block (quantizing, pruning), packed again after it if
        they were packed before."""
        repack = self.unpack_weights()
        try:
            yield
        finally:
            if repack:
                self.pack_weights()

    # ---- loading -------------------------------------------------------------------------
    @property
    def layout(self) -> WeightLayout:
        """The decoder linears' checkpoint parts and rows for this model's config."""
        return WeightLayout(self.config, DECODER_LINEARS)

    def expected_weights(self) -> set[str]:
        """Checkpoint tensor names (Hugging Face naming) this model needs: a bias for every part
        of a linear that has one."""
        names = {"model.embed_tokens.weight", "model.norm.weight"}
        if self.lm_head is not None:
            names.add("lm_head.weight")
        for i, layer in enumerate(self.layers):
            p = f"model.layers.{i}."
            names |= {p + "input_layernorm.weight", p + "post_attention_layernorm.weight"}
            for m in DECODER_LINEARS:
                has_bias = getattr(layer.get_submodule(m.fused), "bias", None) is not None
                kinds = ("weight", "bias") if has_bias else ("weight",)
                names |= {f"{p}{part}.{kind}" for part in m.parts for kind in kinds}
        return names

    def _destination(self, name: str) -> tuple[torch.Tensor, tuple[int, int] | None]:
        """The parameter a checkpoint tensor fills and, when it is one part of a fused linear,
        that part's (start, size) rows in it."""
        if name in _TOP_LEVEL:
            return self.get_parameter(_TOP_LEVEL[name]), None
        _, _, index, path = name.split(".", 3)  # model.layers.{i}.{module path}.{weight|bias}
        module, kind = path.rsplit(".", 1)
        layer, layout = self.layers[int(index)], self.layout
        slot = layout.slot(module)
        if slot is None:  # a norm
            return getattr(layer.get_submodule(module), kind), None
        param = getattr(layer.get_submodule(slot.fused), kind)
        return param, (slot.start, slot.size) if layout.module(slot.fused).is_packed else None

    def checkpoint_weights(self) -> Iterator[tuple[str, torch.Tensor]]:
        """(checkpoint name, tensor) for every tensor `load_weights` takes, fused linears split
        back into their parts: its inverse, for writing a Hugging Face checkpoint. Parts are
        copies (safetensors refuses tensors that share memory); whole parameters are not."""
        for name in sorted(self.expected_weights()):
            param, rows = self._destination(name)
            tensor = param.detach()
            yield name, tensor if rows is None else tensor.narrow(0, *rows).clone()

    def load_weights(
        self,
        weights: Iterable[tuple[str, torch.Tensor]],
        prefilled: Collection[str] = frozenset(),
    ) -> None:
        """Copy checkpoint tensors in, one at a time, checking names and shapes.

        prefilled: checkpoint names whose values a caller already put in place (linears a
        quantized-checkpoint reader built from packed codes); they are neither required nor read.
        Raises ValueError naming any missing tensor or wrong shape. Unknown extra tensors (e.g.
        rotary caches some checkpoints carry) are ignored.
        """
        expected = self.expected_weights() - set(prefilled)
        seen: set[str] = set()
        for name, tensor in weights:
            if name == "lm_head.weight" and self.lm_head is None:
                continue  # tied: some checkpoints still store the copy
            if name not in expected:
                continue
            param, rows = self._destination(name)
            dst = param if rows is None else param.narrow(0, *rows)
            if tuple(tensor.shape) != tuple(dst.shape):
                raise ValueError(
                    f"tensor {name} has shape {tuple(tensor.shape)}, the config implies "
                    f"{tuple(dst.shape)}; the checkpoint does not match its config"
                )
            if rows is None and tensor.dtype == param.dtype and tensor.is_contiguous():
                param.data = tensor  # adopt the loaded tensor: no second write of its pages
            else:
                with torch.no_grad():
                    dst.copy_(tensor)
            seen.add(name)
        missing = sorted(expected - seen)
        if missing:
            more = f" (and {len(missing) - 5} more)" if len(missing) > 5 else ""
            raise ValueError(f"checkpoint is missing tensors: {missing[:5]}{more}")
