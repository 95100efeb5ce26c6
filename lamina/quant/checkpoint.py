"""Quantized checkpoints: a Hugging Face-like folder lamina writes and reads back bit-exactly.

Layout: `config.json` (the model config plus `quantization_config` = `QuantConfig.to_json()`,
tagged `quant_method: "lamina"` so transformers and others do not mistake it for AutoAWQ or
GPTQ), `model.safetensors`, tokenizer files and `generation_config.json`. Tensor names are
lamina's module paths, since q/k/v and gate/up are stored fused (AWQ scales them jointly):
float tensors by parameter name (`embed_tokens`, `layers.0.input_layernorm.weight`, ...),
quantized linears as `<path>.qweight`, `.scales`, `.zeros` (int4), `.bias` in each layer's
portable form (see `state_tensors`). Loading rebuilds the same modules and re-derives any
in-memory kernel layout deterministically, so tensors and logits are identical after reload.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from lamina.config import ModelConfig
from lamina.formats import hf
from lamina.models.llama import LlamaForCausalLM, on_row_major_weights
from lamina.quant.apply import QUANT_METHOD_TAG, QuantConfig, decoder_linears, empty_linear
from lamina.quant.int4 import Int4Linear


def quant_config_of(folder: str | Path) -> QuantConfig | None:
    """The lamina quantization config of a model folder, or None for a float checkpoint."""
    path = Path(folder) / "config.json"
    if not path.is_file():
        return None
    qc = hf.read_json(path).get("quantization_config")
    if not isinstance(qc, dict) or qc.get("quant_method") != QUANT_METHOD_TAG:
        return None
    return QuantConfig.from_json(qc)


def _quant_modules(model: LlamaForCausalLM) -> dict[str, Any]:
    return {
        name: getattr(owner, attr)
        for name, owner, attr in decoder_linears(model)
        if hasattr(getattr(owner, attr), "state_tensors")
    }


def quantized_state(model: LlamaForCausalLM) -> dict[str, torch.Tensor]:
    """Every tensor a checkpoint of this quantized model holds, by name."""
    qmods = _quant_modules(model)
    out: dict[str, torch.Tensor] = {}
    for name, p in model.named_parameters():
        if name.rsplit(".", 1)[0] not in qmods:
            out[name] = p.data
    for prefix, mod in qmods.items():
        for leaf, t in mod.state_tensors().items():
            out[f"{prefix}.{leaf}"] = t
    return {k: v.contiguous() for k, v in out.items()}


@on_row_major_weights
def save_quantized(
    model: LlamaForCausalLM, config: ModelConfig, tokenizer: Any, out_dir: str | Path
) -> Path:
    """Write a quantized model (after `quantize_model`) as a folder `load_model` reads."""
    qcfg: QuantConfig | None = getattr(model, "quant_config", None)
    if qcfg is None:
        raise ValueError("the model is not quantized; call quantize_model first")
    return hf.write_hf_folder(
        out_dir,
        quantized_state(model),
        config,
        tokenizer,
        model.dtype,
        {"quantization_config": qcfg.to_json()},
        metadata={"quant_method": QUANT_METHOD_TAG, "method": qcfg.method},
    )


@torch.no_grad()
def load_quantized(model: LlamaForCausalLM, folder: str | Path, qcfg: QuantConfig) -> None:
    """Fill a freshly built float model from a lamina quantized folder: its decoder linears are
    replaced by empty quantized modules, then every tensor is loaded and shape-checked.
    Raises ValueError naming missing or mis-shaped tensors."""
    for _, owner, attr in decoder_linears(model):
        setattr(owner, attr, empty_linear(qcfg, getattr(owner, attr), model.dtype))
    qmods = _quant_modules(model)
    params = {n: p for n, p in model.named_parameters() if n.rsplit(".", 1)[0] not in qmods}
    pending: dict[str, dict[str, torch.Tensor]] = {name: {} for name in qmods}
    seen: set[str] = set()
    for name, tensor in hf.iter_safetensors(Path(folder)):
        prefix, leaf = name.rsplit(".", 1) if "." in name else ("", name)
        if prefix in pending:
            pending[prefix][leaf] = tensor
        elif name in params:
            p = params[name]
            if tuple(tensor.shape) != tuple(p.shape):
                raise ValueError(
                    f"tensor {name} has shape {tuple(tensor.shape)}, the config implies "
                    f"{tuple(p.shape)}; the checkpoint does not match its config"
                )
            p.data = tensor.to(p.dtype)
        else:
            continue
        seen.add(name)
    missing = sorted(set(params) - seen)
    for prefix, mod in qmods.items():
        want = {"qweight", "scales"} | ({"zeros"} if isinstance(mod, Int4Linear) else set())
        want |= {"bias"} if mod.bias is not None else set()
        missing += sorted(f"{prefix}.{k}" for k in want - set(pending[prefix]))
    if missing:
        more = f" (and {len(missing) - 5} more)" if len(missing) > 5 else ""
        raise ValueError(f"quantized checkpoint is missing tensors: {missing[:5]}{more}")
    for prefix, mod in qmods.items():
        mod.load_state_tensors(pending[prefix])
    model.quant_config = qcfg
