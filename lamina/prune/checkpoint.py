"""The checkpoint a pruned model is written as.

A pruned model is still a dense float model (zeros in place of pruned weights), so it is saved
as a plain Hugging Face Llama folder under the unfused names (q/k/v, gate/up split back out of
lamina's fused rows): `load_model`, `LLM(...)`, `lamina run / serve` and transformers all load
it with no special code. config.json carries a `pruning_config` block saying what was done;
every loader ignores it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from lamina.config import ModelConfig
from lamina.formats import hf
from lamina.models.llama import LlamaForCausalLM, on_row_major_weights
from lamina.prune.wanda import PruneConfig


def hf_state(model: LlamaForCausalLM) -> dict[str, torch.Tensor]:
    """The model's tensors under Hugging Face names, fused parameters split back into their
    q/k/v and gate/up rows: exactly the inverse of `LlamaForCausalLM.load_weights`."""
    return {name: t.contiguous() for name, t in model.checkpoint_weights()}


@on_row_major_weights
def save_pruned(
    model: LlamaForCausalLM,
    config: ModelConfig,
    tokenizer: Any,
    out_dir: str | Path,
    generation_config: dict[str, Any] | None = None,
) -> Path:
    """Write a pruned model (after `prune_model`) as a Hugging Face folder; returns the path."""
    pcfg: PruneConfig | None = getattr(model, "prune_config", None)
    if pcfg is None:
        raise ValueError("the model is not pruned; call prune_model first")
    return hf.write_hf_folder(
        out_dir,
        hf_state(model),
        config,
        tokenizer,
        model.dtype,
        {"pruning_config": pcfg.to_json()},
        generation_config=generation_config,
    )


def pruning_config_of(folder: str | Path) -> dict[str, Any] | None:
    """The `pruning_config` block of a model folder, or None if it was not pruned by lamina."""
    path = Path(folder) / "config.json"
    block = hf.read_json(path).get("pruning_config") if path.is_file() else None
    return block if isinstance(block, dict) else None
