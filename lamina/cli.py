"""The `lamina` command: run, chat, convert."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from lamina.engine_config import EngineConfig
from lamina.sampling_params import SamplingParams


def _add_sampling_args(p: argparse.ArgumentParser, default_temperature: float) -> None:
    p.add_argument("--max-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=default_temperature, help="0 means greedy")
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--stop", action="append", default=None, help="stop string (repeatable)")


def _sampling(args: argparse.Namespace) -> SamplingParams:
    return SamplingParams(
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        max_tokens=args.max_tokens,
        seed=args.seed,
        stop=args.stop,
    )


def _load(args: argparse.Namespace):
    from rich.console import Console

    from lamina.llm import LLM

    config = EngineConfig.from_cli_args(args)  # bad flags fail before the spinner
    with Console(stderr=True).status("Loading model…", spinner="dots"):
        return LLM(config)


def _stream(llm, prompt: str | list[int], params: SamplingParams) -> tuple[str, object]:
    from lamina.streaming import StreamStats, stream_deltas

    stats = StreamStats()
    pieces = []
    for delta in stream_deltas(llm.engine, prompt, params, stats):
        pieces.append(delta)
        sys.stdout.write(delta)
        sys.stdout.flush()
    sys.stdout.write("\n")
    return "".join(pieces), stats


def _print_speed(stats) -> None:
    print(
        f"[prompt: {stats.prompt_tokens} tokens, {stats.prompt_tps:.1f} tok/s | "
        f"decode: {stats.generated_tokens} tokens, {stats.decode_tps:.1f} tok/s | "
        f"finish: {stats.finish_reason}]",
        file=sys.stderr,
    )


def cmd_run(args: argparse.Namespace) -> int:
    llm = _load(args)
    prompt: str | list[int] = args.prompt
    if args.chat_template:
        prompt = llm.tokenizer.apply_chat_template(
            [{"role": "user", "content": args.prompt}], add_generation_prompt=True, tokenize=True
        )
    _, stats = _stream(llm, prompt, _sampling(args))
    _print_speed(stats)
    return 0


def cmd_chat(args: argparse.Namespace) -> int:
    llm = _load(args)
    history: list[dict[str, str]] = []
    if args.system:
        history.append({"role": "system", "content": args.system})
    print("Chat with the model. Empty line or /exit quits, /reset clears history.", file=sys.stderr)
    while True:
        try:
            user = input("> ")
        except EOFError:
            break
        if user.strip() in ("", "/exit", "/quit"):
            break
        if user.strip() == "/reset":
            history = history[:1] if args.system else []
            continue
        history.append({"role": "user", "content": user})
        ids = llm.tokenizer.apply_chat_template(history, add_generation_prompt=True, tokenize=True)
        try:
            reply, stats = _stream(llm, ids, _sampling(args))
        except ValueError as e:  # e.g. the history outgrew the context
            print(f"error: {e}", file=sys.stderr)
            history.pop()
            continue
        history.append({"role": "assistant", "content": reply})
        _print_speed(stats)
    return 0


def cmd_convert(args: argparse.Namespace) -> int:
    from lamina.loading.convert import convert_gguf_to_hf

    out = convert_gguf_to_hf(args.input, args.output, args.dtype)
    print(f"wrote {out}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lamina", description="LLM inference engine")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("run", help="complete one prompt, streaming to the terminal")
    EngineConfig.add_cli_args(p)
    _add_sampling_args(p, default_temperature=0.0)
    p.add_argument(
        "--chat-template",
        action="store_true",
        help="wrap the prompt as one user turn of the model's chat template",
    )
    p.add_argument("prompt")
    p.set_defaults(func=cmd_run)
    p = sub.add_parser("chat", help="interactive multi-turn chat")
    EngineConfig.add_cli_args(p)
    _add_sampling_args(p, default_temperature=0.7)
    p.add_argument("--system", default=None, help="system message")
    p.set_defaults(func=cmd_chat)
    p = sub.add_parser("convert", help="GGUF file -> Hugging Face folder")
    p.add_argument("input", help="a .gguf file")
    p.add_argument("output", help="folder to write")
    p.add_argument("--dtype", default="float32", help="float32, bfloat16 or float16")
    p.set_defaults(func=cmd_convert)
    from lamina.commands.prune import add_prune_parser
    from lamina.commands.quantize import add_quantize_parser
    from lamina.eval.perplexity import add_ppl_parser
    from lamina.server.cli import add_serve_parser

    add_serve_parser(sub)
    add_ppl_parser(sub)
    add_quantize_parser(sub)
    add_prune_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError) as e:
        print(f"lamina: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
