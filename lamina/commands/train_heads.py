"""`lamina train-heads`: train speculative-decoding heads for a model by self-distillation.

    lamina train-heads --kind medusa --model M --data prompts.jsonl --out DIR \\
        [--num-heads 4] [--epochs 2] [--lr 1e-3] [--batch-size 256] [--max-tokens 128] \\
        [--max-prompts N] [--no-autocast] [--resume] [--force]

Then: `LLM(M, speculative_config={"method": "medusa", "model": DIR})`.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from lamina.commands.boundary import UsageError, check_min, check_out_dir, loading, usage_errors


def add_train_heads_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register the `train-heads` sub-command; its handler is `cmd_train_heads`."""
    p = subparsers.add_parser(
        "train-heads",
        help="train Medusa heads for speculative decoding (self-distillation)",
        description="Generate the model's own greedy continuations of --data prompts, then fit "
        "Medusa heads (the model frozen) to guess the tokens 2, 3, ... places ahead.",
    )
    p.add_argument("--kind", choices=("medusa",), default="medusa", help="head kind")
    p.add_argument("--model", "-m", default=None, help="HF folder or .gguf (default: SmolLM2)")
    p.add_argument("--data", required=True, help='JSONL of {"prompt"|"text"|"messages": ...}')
    p.add_argument("--out", required=True, help="folder to write the heads to")
    p.add_argument("--num-heads", type=int, default=4)
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--batch-size", type=int, default=256, help="positions per step")
    p.add_argument("--max-tokens", type=int, default=128, help="continuation per prompt")
    p.add_argument("--max-prompts", type=int, default=None, help="use the first N prompts")
    p.add_argument("--dtype", default="bfloat16", help="of the frozen model (float32, bfloat16)")
    p.add_argument(
        "--no-autocast", action="store_true", help="train in float32 (default: bf16 autocast)"
    )
    p.add_argument("--resume", action="store_true", help="continue from --out's checkpoint")
    p.add_argument("--force", action="store_true", help="write into a non-empty --out")
    p.set_defaults(func=cmd_train_heads)
    return p


def cmd_train_heads(args: argparse.Namespace) -> int:
    """Run `lamina train-heads`; returns the exit status."""
    from tqdm.auto import tqdm

    from lamina.llm import LLM
    from lamina.spec.medusa import MedusaHeads
    from lamina.spec.train_heads import distill, hidden_states, read_prompts, targets, train

    with usage_errors():  # every argument is checked before the model loads
        for flag, value, low in (
            ("--num-heads", args.num_heads, 1),
            ("--epochs", args.epochs, 1),
            ("--batch-size", args.batch_size, 1),
            ("--max-tokens", args.max_tokens, 1),
            ("--max-prompts", args.max_prompts, 1),
        ):
            check_min(flag, value, low)
        if not args.lr > 0:
            raise UsageError(f"--lr must be > 0, got {args.lr}")
        out = check_out_dir(args.out, args.force or args.resume, source=args.model)
        prompts = read_prompts(args.data)[: args.max_prompts]
    t0 = time.perf_counter()
    with loading(args.model):
        llm = LLM(args.model, dtype=args.dtype, pack_weights=False, max_model_len=2048)
    engine = llm.engine
    model = engine.loaded.model
    examples = distill(engine, prompts, args.max_tokens)
    hiddens = [hidden_states(engine, ex.ids) for ex in tqdm(examples, desc="hidden states")]
    feats, labels = targets(examples, hiddens, args.num_heads)
    heads = MedusaHeads(model.config.hidden_size, args.num_heads)
    bar = tqdm(desc="training", unit="step")

    def on_step(step: int, total: int, loss: float, acc: list[float], tps: float) -> None:
        bar.total = total
        bar.n = step
        bar.set_postfix(
            loss=f"{loss:.3f}", top1=" ".join(f"{a:.2f}" for a in acc), pos_s=f"{tps:.0f}"
        )
        bar.refresh()

    losses = train(
        heads,
        model.lm_head_weight,
        feats,
        labels,
        epochs=args.epochs,
        lr=args.lr,
        batch_size=args.batch_size,
        autocast=not args.no_autocast,
        out=Path(out),
        resume=args.resume,
        on_step=on_step,
    )
    bar.close()
    heads.save(
        out,
        vocab_size=model.config.vocab_size,
        base_model=str(args.model or "SmolLM2-135M-Instruct"),
        prompts=len(examples),
        positions=len(feats),
        epoch_losses=losses,
    )
    print(
        f"medusa: {args.num_heads} heads on {len(feats)} positions, loss by epoch "
        f"{', '.join(f'{x:.3f}' for x in losses)}; wrote {out} in {time.perf_counter() - t0:.0f} s"
    )
    return 0
