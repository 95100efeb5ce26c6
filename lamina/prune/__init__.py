"""Pruning of lamina models: Wanda (|W| x input norm) and magnitude, unstructured or N:M.

    from lamina.prune import prune_model, save_pruned
    prune_model(loaded.model, "wanda", calib_ids, sparsity=0.5)   # or n_m=(2, 4)
    save_pruned(loaded.model, loaded.config, loaded.tokenizer, "out/")
    LLM("out/")  # a plain Hugging Face Llama folder; transformers loads it too

Modules: magnitude.py (masks for each comparison group, the |W| baseline), wanda.py (the
score, sequential calibration, `prune_model`), checkpoint.py (the folder a pruned model is
saved as). The `lamina prune` command lives in lamina/commands/prune.py.
"""

from lamina.prune.checkpoint import pruning_config_of, save_pruned
from lamina.prune.magnitude import nm_mask, parse_n_m, row_mask, sparsity_of
from lamina.prune.wanda import METHODS, PruneConfig, prune_model, wanda_score

__all__ = [
    "METHODS",
    "PruneConfig",
    "nm_mask",
    "parse_n_m",
    "prune_model",
    "pruning_config_of",
    "row_mask",
    "save_pruned",
    "sparsity_of",
    "wanda_score",
]
