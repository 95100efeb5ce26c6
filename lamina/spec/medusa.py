"""Medusa heads (Cai et al. 2024): K small heads on the target's last hidden state, head k
guessing the token k + 1 places ahead, so one forward pass of the target yields its own next
token plus K guesses to verify in the next pass.

Head k is one residual block, h + SiLU(W_k h + b_k), read out through the model's own LM head
(shared, frozen): a few hidden x hidden matrices per model. W_k starts at zero, so an untrained
head repeats the base head's guess. `lamina train-heads` (spec/train_heads.py) fits them to the
model's own continuations. Guesses are the heads' top-1 tokens, a linear chain verified as any
other guesses are (lossless); Medusa's tree of top-k candidates is not built yet.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from lamina.engine.sequence import Sequence
from lamina.spec.proposer import Proposer

CONFIG_NAME = "medusa_config.json"
WEIGHTS_NAME = "medusa_heads.safetensors"


class MedusaHeads(nn.Module):
    def __init__(self, hidden_size: int, num_heads: int) -> None:
        super().__init__()
        self.hidden_size = hidden_size
        blocks = [nn.Linear(hidden_size, hidden_size) for _ in range(num_heads)]
        for block in blocks:
            nn.init.zeros_(block.weight)
            nn.init.zeros_(block.bias)
        self.blocks = nn.ModuleList(blocks)

    @property
    def num_heads(self) -> int:
        return len(self.blocks)

    def forward(self, hidden: torch.Tensor, num_heads: int | None = None) -> torch.Tensor:
        """[heads, N, hidden] features of the first `num_heads` heads for hidden states
        [N, hidden] (the model's final, normed ones); the LM head turns them into logits."""
        blocks = list(self.blocks)[: num_heads or self.num_heads]
        return torch.stack([hidden + F.silu(block(hidden)) for block in blocks])

    def save(self, folder: str | Path, **meta: Any) -> Path:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().float().contiguous() for k, v in self.state_dict().items()}
        save_file(state, str(folder / WEIGHTS_NAME))
        config = {
            "kind": "medusa",
            "num_heads": self.num_heads,
            "hidden_size": self.hidden_size,
            **meta,
        }
        (folder / CONFIG_NAME).write_text(json.dumps(config, indent=2) + "\n")
        return folder

    @classmethod
    def load(cls, folder: str | Path, hidden_size: int, vocab_size: int) -> MedusaHeads:
        """Heads saved by `save` for a model of this hidden and vocabulary size; a ValueError
        naming what is missing or does not match."""
        folder = Path(folder).expanduser()
        if not (folder / CONFIG_NAME).is_file() or not (folder / WEIGHTS_NAME).is_file():
            raise ValueError(
                f"{folder} has no Medusa heads ({CONFIG_NAME} and {WEIGHTS_NAME}); train them "
                "with `lamina train-heads --kind medusa`"
            )
        config = json.loads((folder / CONFIG_NAME).read_text())
        for key, want in (("hidden_size", hidden_size), ("vocab_size", vocab_size)):
            if config.get(key, want) != want:
                raise ValueError(
                    f"the Medusa heads in {folder} were trained for {key}={config.get(key)}, "
                    f"but this model has {want}"
                )
        heads = cls(hidden_size, int(config["num_heads"]))
        heads.load_state_dict(load_file(str(folder / WEIGHTS_NAME)))
        return heads


class MedusaProposer(Proposer):
    """Guesses from the heads' top-1 tokens on each sequence's last hidden state (kept for it
    by the output processor), all heads of all sequences in one LM-head GEMM."""

    name = "medusa"
    needs_hidden = True

    def __init__(self, heads: MedusaHeads, model: Any) -> None:
        self.model = model
        self.heads = heads.to(model.dtype).eval()

    @torch.inference_mode()
    def propose(self, seqs: list[Sequence], num_tokens: list[int]) -> list[list[int]]:
        out: list[list[int]] = [[] for _ in seqs]
        rows = [i for i, s in enumerate(seqs) if num_tokens[i] > 0 and s.last_hidden is not None]
        if not rows:
            return out
        k = min(max(num_tokens[i] for i in rows), self.heads.num_heads)
        hidden = torch.stack([seqs[i].last_hidden for i in rows])  # type: ignore[misc]
        feats = self.heads(hidden.to(self.model.dtype), k)  # [k, rows, hidden]
        guesses = self.model.compute_logits(feats.reshape(-1, feats.shape[-1])).argmax(-1)
        guesses = guesses.view(k, len(rows)).T.tolist()
        for j, i in enumerate(rows):
            out[i] = guesses[j][: num_tokens[i]]
        return out
