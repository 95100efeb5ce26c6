"""Training Medusa heads by self-distillation: the targets are the model's own greedy
continuations of the given prompts, so the heads learn to guess what this model will write
(Medusa-1: the base model frozen, only the heads trained).

1. `distill`: greedy continuations of every prompt, batched through the engine.
2. `hidden_states`: the model's final hidden states at every position of prompt + continuation
   (the frozen base's features, computed once, in chunks through the engine).
3. `train`: head k learns, at each position t whose next token is generated text, the token
   k + 1 places after it: cross-entropy through the model's own (frozen) LM head, heads in
   float32 under bfloat16 autocast (fp32 master weights and optimizer state), AdamW with
   warm-up and cosine decay, checkpoints to resume from.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import torch
import torch.nn.functional as F

from lamina.engine.llm_engine import LLMEngine
from lamina.sampling_params import SamplingParams
from lamina.spec.medusa import MedusaHeads

CHECKPOINT = "checkpoint.pt"


@dataclass
class Example:
    """One prompt + continuation: its ids and where the generated part starts."""

    ids: list[int]
    start: int  # index of the first generated token


def read_prompts(path: str | Path) -> list[str | list[dict[str, Any]]]:
    """Prompts from a JSONL file: {"prompt": text} / {"text": text} or {"messages": [...]}
    (a chat, ended by a user turn; the chat template is applied)."""
    out: list[str | list[dict[str, Any]]] = []
    for n, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{n} is not JSON ({e})") from e
        value = (
            row.get("messages", row.get("prompt", row.get("text")))
            if isinstance(row, dict)
            else None
        )
        if not isinstance(value, (str, list)) or not value:
            raise ValueError(
                f'{path}:{n}: give {{"prompt": "..."}}, {{"text": "..."}} or {{"messages": [...]}}'
            )
        out.append(value)
    if not out:
        raise ValueError(f"{path} has no prompts")
    return out


def distill(
    engine: LLMEngine, prompts: list[str | list[dict[str, Any]]], max_tokens: int
) -> list[Example]:
    """The model's greedy continuation of each prompt."""
    tokenizer = engine.require_tokenizer("training prompts are text")
    ids: list[list[int]] = [
        cast(list[int], tokenizer.apply_chat_template(p, tokenize=True))
        if isinstance(p, list)
        else tokenizer.encode(p)
        for p in prompts
    ]
    params = SamplingParams(temperature=0, max_tokens=max_tokens)
    for i, p in enumerate(ids):
        engine.add_request(f"distill-{i}", p, params)
    outs: dict[str, list[int]] = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                outs[out.request_id] = out.outputs[0].token_ids
    return [Example(p + outs[f"distill-{i}"], len(p)) for i, p in enumerate(ids)]


def hidden_states(engine: LLMEngine, ids: list[int]) -> torch.Tensor:
    """Final hidden states [len(ids), hidden] of the frozen model."""
    parts = [h.float() for _, h in engine.prompt_chunks(ids, chunk_size=512)]
    return torch.cat(parts)


def targets(
    examples: list[Example], hiddens: list[torch.Tensor], num_heads: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """(features [N, hidden], labels [N, heads]) over every position whose next token is
    generated; label -100 where head k's target lies past the end."""
    feats, labels = [], []
    for ex, h in zip(examples, hiddens):
        ids = torch.tensor(ex.ids)
        positions = torch.arange(max(ex.start - 1, 0), len(ex.ids) - 1)
        lab = torch.full((len(positions), num_heads), -100)
        for k in range(num_heads):
            target = positions + 2 + k  # head k (from 0) guesses the token k + 2 ahead
            ok = target < len(ex.ids)
            lab[ok, k] = ids[target[ok]]
        feats.append(h[positions])
        labels.append(lab)
    return torch.cat(feats), torch.cat(labels)


def train(
    heads: MedusaHeads,
    lm_head: torch.Tensor,
    feats: torch.Tensor,
    labels: torch.Tensor,
    *,
    epochs: int = 2,
    lr: float = 1e-3,
    batch_size: int = 256,
    warmup: float = 0.05,
    autocast: bool = True,
    out: Path | None = None,
    resume: bool = False,
    checkpoint_every: int = 50,
    on_step: Callable[[int, int, float, list[float], float], None] | None = None,
    seed: int = 0,
) -> list[float]:
    """Fit the heads; returns the mean loss of each epoch. `lm_head` [vocab, hidden] is the
    model's (frozen). `on_step(step, total, loss, per-head top-1 accuracy, tokens/s)`."""
    heads.float().train()
    opt = torch.optim.AdamW(heads.parameters(), lr=lr, weight_decay=0.0)
    steps_per_epoch = math.ceil(len(feats) / batch_size)
    total = epochs * steps_per_epoch
    warm = max(1, int(warmup * total))

    def schedule(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        return 0.5 * (1 + math.cos(math.pi * (step - warm) / max(1, total - warm)))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, schedule)
    step = 0
    if resume and out is not None and (out / CHECKPOINT).is_file():
        state = torch.load(out / CHECKPOINT, weights_only=True)
        heads.load_state_dict(state["heads"])
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        step = int(state["step"])
    weight = lm_head.detach()
    losses: list[float] = []
    g = torch.Generator().manual_seed(seed)
    orders = [torch.randperm(len(feats), generator=g) for _ in range(epochs)]
    epoch_loss: list[float] = []
    while step < total:
        epoch, i = divmod(step, steps_per_epoch)
        idx = orders[epoch][i * batch_size : (i + 1) * batch_size]
        t0 = time.perf_counter()
        x, y = feats[idx], labels[idx]
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            h = heads(x)  # [heads, B, hidden]
            logits = F.linear(h, weight.to(h.dtype))  # [heads, B, vocab]
        loss = F.cross_entropy(logits.float().flatten(0, 1), y.T.flatten(), ignore_index=-100)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        step += 1
        with torch.no_grad():
            hit = (logits.argmax(-1) == y.T) & (y.T != -100)
            acc = (hit.sum(1) / (y.T != -100).sum(1).clamp(min=1)).tolist()
        value = loss.item()
        epoch_loss.append(value)
        if on_step is not None:
            on_step(step, total, value, acc, len(idx) / (time.perf_counter() - t0))
        if step % steps_per_epoch == 0 or step == total:
            losses.append(sum(epoch_loss) / len(epoch_loss))
            epoch_loss = []
        if out is not None and (step % checkpoint_every == 0 or step == total):
            out.mkdir(parents=True, exist_ok=True)
            torch.save(
                {
                    "heads": heads.state_dict(),
                    "optimizer": opt.state_dict(),
                    "scheduler": sched.state_dict(),
                    "step": step,
                },
                out / CHECKPOINT,
            )
    heads.eval()
    return losses
