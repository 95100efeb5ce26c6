"""Per-input-channel rescaling of a LLaMA model's linears, with the inverse folded upstream.

AWQ and SmoothQuant both rewrite y = W x as y = (W diag(s)) (diag(s)^-1 x). The float function is
unchanged; only what gets quantized changes. diag(s)^-1 must be absorbed by whatever produces x:

- qkv_proj     <- input_layernorm.weight (RMSNorm is x * w, so w / s)
- gate_up_proj <- post_attention_layernorm.weight
- down_proj    <- the `up` rows of gate_up_proj (silu(gate) * up is linear in up)
- o_proj       <- the `v` rows of qkv_proj, only when num_kv_heads == num_heads: o_proj's input
                  channel (head h, dim d) is attention over v's channel (kv head of h, d), so with
                  GQA several input channels share one v row and one scale cannot be folded per
                  channel. AutoAWQ skips o_proj for GQA models likewise.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from lamina.layers.linear import Linear
from lamina.models.llama import LlamaForCausalLM


@dataclass
class ScaleGroup:
    """One linear whose input channels may be rescaled, and how to undo that upstream."""

    name: str  # module path, e.g. "layers.3.self_attn.qkv_proj" (calibration stats key)
    linear: Linear
    fold: Callable[[torch.Tensor], None]  # divide the producer of the linear's input by s
    clip_rows: slice | None = None  # rows AWQ may clip (None: all)


def _div_(t: torch.Tensor, s: torch.Tensor) -> None:
    """In-place t /= s computed in float32 (t may be half precision)."""
    t.copy_((t.float() / s).to(t.dtype))


def _fold_rows(linear: Linear, start: int, size: int) -> Callable[[torch.Tensor], None]:
    def fold(s: torch.Tensor) -> None:
        _div_(linear.weight.data.narrow(0, start, size), s[:, None])
        if linear.bias is not None:
            _div_(linear.bias.data.narrow(0, start, size), s)

    return fold


def _fold_norm(weight: torch.Tensor) -> Callable[[torch.Tensor], None]:
    return lambda s: _div_(weight.data, s)


def scale_groups(
    model: LlamaForCausalLM, o_proj: bool = True, down_proj: bool = True
) -> list[ScaleGroup]:
    """The foldable linears of every decoder layer, in forward order. o_proj is included only
    when requested and the model has as many kv heads as heads (see the module docstring)."""
    c = model.config
    mha = c.num_key_value_heads == c.num_attention_heads
    v_rows = model.layout.slot("self_attn.v_proj")  # in qkv_proj
    up_rows = model.layout.slot("mlp.up_proj")  # in gate_up_proj
    assert v_rows is not None
    assert up_rows is not None
    groups: list[ScaleGroup] = []
    for i, layer in enumerate(model.decoder_layers):
        p = f"layers.{i}."
        attn, mlp = layer.self_attn, layer.mlp
        groups.append(
            ScaleGroup(
                p + "self_attn.qkv_proj",
                attn.qkv_proj,
                _fold_norm(layer.input_layernorm.weight),
                # AutoAWQ: never clip q, k
                clip_rows=slice(v_rows.start, v_rows.start + v_rows.size),
            )
        )
        if o_proj and mha:
            groups.append(
                ScaleGroup(
                    p + "self_attn.o_proj",
                    attn.o_proj,
                    _fold_rows(attn.qkv_proj, v_rows.start, v_rows.size),
                )
            )
        groups.append(
            ScaleGroup(
                p + "mlp.gate_up_proj",
                mlp.gate_up_proj,
                _fold_norm(layer.post_attention_layernorm.weight),
            )
        )
        if down_proj:
            groups.append(
                ScaleGroup(
                    p + "mlp.down_proj",
                    mlp.down_proj,
                    _fold_rows(mlp.gate_up_proj, up_rows.start, up_rows.size),
                )
            )
    return groups


@torch.no_grad()
def apply_scale(group: ScaleGroup, s: torch.Tensor) -> None:
    """W <- W diag(s) and the producer of x <- producer / s: the float model is unchanged."""
    s = s.float()
    w = group.linear.weight.data
    w.copy_((w.float() * s[None, :]).to(w.dtype))
    group.fold(s)
