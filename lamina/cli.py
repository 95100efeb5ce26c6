"""The `lamina` command: run, chat, convert (and serve, ppl, quantize, prune from their modules).

Every command runs inside one error boundary (lamina/commands/boundary.py): a failure is one
line `lamina CMD: error: ...` on stderr, exit status 1 (2 for a bad argument, 130 for Ctrl-C),
with the traceback only under --debug or LAMINA_DEBUG=1. Arguments are checked before the model
loads.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
from collections.abc import Sequence
from typing import Any

from lamina.commands.boundary import (
    UsageError,
    add_debug_flag,
    add_force_flag,
    check_out_dir,
    loading,
    run_command,
    usage_errors,
)
from lamina.engine_config import EngineConfig
from lamina.sampling_params import MAX_LOGPROBS, SamplingParams

# The sampling flags of `lamina run` and `lamina chat`: SamplingParams field -> (flag, type,
# help). A flag left out keeps SamplingParams' default (except max_tokens and temperature, set
# per command in `_add_sampling_args`); the values are checked by SamplingParams itself.
SAMPLING_FLAGS: dict[str, tuple[str, type, str]] = {
    "max_tokens": ("--max-tokens", int, "most tokens to generate (default %(default)s)"),
    "temperature": ("--temperature", float, "0 means greedy (default %(default)s)"),
    "top_k": ("--top-k", int, "keep the k most likely tokens (0: all)"),
    "top_p": ("--top-p", float, "keep the smallest set of tokens reaching this probability"),
    "min_p": ("--min-p", float, "drop tokens less likely than MIN_P x the most likely one"),
    "repetition_penalty": (
        "--repetition-penalty",
        float,
        "divide the logit of every token seen in prompt or output by it (1: off)",
    ),
    "frequency_penalty": (
        "--frequency-penalty",
        float,
        "OpenAI: subtract it x the count of each generated token from its logit, in [-2, 2]",
    ),
    "presence_penalty": (
        "--presence-penalty",
        float,
        "OpenAI: subtract it from the logit of every generated token, in [-2, 2]",
    ),
    "n": ("--n", int, "samples to generate; each is printed"),
    "logprobs": (
        "--logprobs",
        int,
        f"print each generated token's logprob and the top N (0-{MAX_LOGPROBS})",
    ),
    "seed": ("--sample-seed", int, "seed of this request's sampling (reproducible samples)"),
    "stop": ("--stop", str, "stop string (repeatable)"),
}
_DEST = "sampling_"  # argparse dest prefix: the fields' own names may be engine flags too


def _add_sampling_args(p: argparse.ArgumentParser, default_temperature: float) -> None:
    group = p.add_argument_group("sampling", "a flag left out keeps SamplingParams' default")
    for name, (flag, kind, text) in SAMPLING_FLAGS.items():
        action = "append" if name == "stop" else "store"
        metavar = {int: "N", float: "X"}.get(kind, "TEXT")
        group.add_argument(
            flag, dest=_DEST + name, type=kind, action=action, metavar=metavar, help=text
        )
    # `--seed` stays an alias of --sample-seed unless the engine has a --seed of its own
    with contextlib.suppress(argparse.ArgumentError):
        group.add_argument("--seed", dest=_DEST + "seed", type=int, help=argparse.SUPPRESS)
    p.set_defaults(**{_DEST + "max_tokens": 256, _DEST + "temperature": default_temperature})


def _sampling(args: argparse.Namespace) -> SamplingParams:
    """The SamplingParams the flags describe (a bad value raises SamplingParams' ValueError)."""
    given = {
        name: getattr(args, _DEST + name)
        for name in SAMPLING_FLAGS
        if getattr(args, _DEST + name, None) is not None
    }
    try:
        return SamplingParams(**given)
    except ValueError as e:  # "max_tokens=0 is invalid; ..." -> "--max-tokens 0 is invalid; ..."
        message = str(e)
        for name, (flag, _, _) in SAMPLING_FLAGS.items():
            if message.startswith(f"{name}="):
                message = f"{flag} {message.removeprefix(name + '=')}"
        raise ValueError(message) from e


def _engine_config(args: argparse.Namespace) -> EngineConfig:
    """The engine settings, checked, and the model path resolved (a missing folder or file is
    an argument error, found before anything loads)."""
    from lamina.loading.resolve import resolve_model

    config = EngineConfig.from_cli_args(args)
    if config.skip_tokenizer_init:
        raise ValueError(
            f"--skip-tokenizer-init: `lamina {args.command}` reads and prints text, which needs "
            "a tokenizer; for token ids alone use `lamina serve --skip-tokenizer-init` "
            "(token-id prompts on /v1/completions) or LLM(skip_tokenizer_init=True) in Python"
        )
    resolve_model(config.model)
    return config


def _load(config: EngineConfig) -> Any:
    from rich.console import Console

    from lamina.llm import LLM

    with loading(config.model), Console(stderr=True).status("Loading model…", spinner="dots"):
        return LLM(config)


def _stream(llm: Any, prompt: str | list[int], params: SamplingParams) -> tuple[str, Any]:
    from lamina.streaming import StreamStats, stream_deltas

    stats = StreamStats()
    pieces = []
    for delta in stream_deltas(llm.engine, prompt, params, stats):
        pieces.append(delta)
        sys.stdout.write(delta)
        sys.stdout.flush()
    sys.stdout.write("\n")
    return "".join(pieces), stats


def _print_speed(stats: Any) -> None:
    print(
        f"[prompt: {stats.prompt_tokens} tokens, {stats.prompt_tps:.1f} tok/s | "
        f"decode: {stats.generated_tokens} tokens, {stats.decode_tps:.1f} tok/s | "
        f"finish: {stats.finish_reason}]",
        file=sys.stderr,
    )


def _quoted(text: str | None) -> str:
    return json.dumps(text or "", ensure_ascii=False)


def _print_logprobs(output: Any, top_n: int) -> None:
    """One line per generated token: its logprob, the token, and the top-N alternatives."""
    print(f"{'logprob':>9}  token  |  top {top_n}" if top_n else f"{'logprob':>9}  token")
    for tid, entry in zip(output.token_ids, output.logprobs or [], strict=False):
        own = entry[tid]
        line = f"{own.logprob:>9.4f}  {_quoted(own.decoded_token)}"
        tops = sorted(
            (lp for lp in entry.values() if lp.rank is not None and lp.rank <= top_n),
            key=lambda lp: lp.rank,
        )
        if tops:
            line += "  |  " + ", ".join(f"{_quoted(t.decoded_token)} {t.logprob:.4f}" for t in tops)
        print(line)


def _generate_and_print(llm: Any, prompt: str | list[int], params: SamplingParams) -> str:
    """Without streaming (n > 1 or logprobs): print every sample, then its logprobs if asked;
    returns the first sample's text."""
    one = prompt if isinstance(prompt, str) else {"prompt_token_ids": prompt}
    start = time.perf_counter()
    out = llm.generate(one, params, use_tqdm=False)[0]
    seconds = time.perf_counter() - start
    samples = out.outputs
    for o in samples:
        if len(samples) > 1:
            print(f"--- sample {o.index + 1} of {len(samples)} ---")
        print(o.text)
        if params.logprobs is not None:
            _print_logprobs(o, params.logprobs)
    generated = sum(len(o.token_ids) for o in samples)
    print(
        f"[prompt: {len(out.prompt_token_ids)} tokens | generated: {generated} tokens in "
        f"{seconds:.1f} s, {generated / max(seconds, 1e-9):.1f} tok/s | finish: "
        f"{', '.join(str(o.finish_reason) for o in samples)}]",
        file=sys.stderr,
    )
    return str(samples[0].text)


def _respond(llm: Any, prompt: str | list[int], params: SamplingParams) -> str:
    """Stream one sample, or print them all when there are several or logprobs are asked."""
    if params.n > 1 or params.logprobs is not None:
        return _generate_and_print(llm, prompt, params)
    text, stats = _stream(llm, prompt, params)
    _print_speed(stats)
    return text


def _run_prompt(llm: Any, args: argparse.Namespace) -> str | list[int]:
    """The prompt of `lamina run`: one user turn (after --system) of the model's chat template
    when it has one, unless --raw; the text as is otherwise."""
    has_template = "default" in llm.tokenizer.chat_templates
    if args.chat_template and not has_template:
        raise ValueError(
            "--chat-template: this model has no chat template; leave the flag out to send the "
            "text as is"
        )
    use_template = has_template if args.chat_template is None else args.chat_template
    if not use_template:
        if args.system:
            raise ValueError(
                "--system needs a chat template and this model has none; drop --system"
            )
        return str(args.prompt)
    messages = [{"role": "system", "content": args.system}] if args.system else []
    messages.append({"role": "user", "content": args.prompt})
    ids = llm.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    return list(ids)


def cmd_run(args: argparse.Namespace) -> int:
    with usage_errors():
        params = _sampling(args)
        config = _engine_config(args)
    if args.chat_template is False and args.system:
        raise UsageError("--system needs the chat template; drop --raw")
    llm = _load(config)
    _respond(llm, _run_prompt(llm, args), params)
    return 0


def cmd_chat(args: argparse.Namespace) -> int:
    with usage_errors():
        params = _sampling(args)
        config = _engine_config(args)
    llm = _load(config)
    history: list[dict[str, str]] = []
    if args.system:
        history.append({"role": "system", "content": args.system})
    err = sys.stderr
    if params.n > 1:
        print(f"Each turn prints {params.n} samples; the first stays in the history.", file=err)
    print("Chat with the model. Empty line or /exit quits, /reset clears history.", file=err)
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
            reply = _respond(llm, list(ids), params)
        except ValueError as e:  # e.g. the history outgrew the context: the chat goes on
            print(f"lamina chat: error: {e}", file=sys.stderr)
            history.pop()
            continue
        history.append({"role": "assistant", "content": reply})
    return 0


def cmd_convert(args: argparse.Namespace) -> int:
    from pathlib import Path

    from lamina.config import parse_dtype
    from lamina.loading.convert import convert_gguf_to_hf

    with usage_errors():
        if not Path(args.input).is_file():
            raise FileNotFoundError(f"{args.input} is not a file; `lamina convert` takes a .gguf")
        parse_dtype(args.dtype)
        out = check_out_dir(args.output, args.force, flag="output")
    print(f"wrote {convert_gguf_to_hf(args.input, out, args.dtype)}")
    return 0


def _add_run_args(p: argparse.ArgumentParser) -> None:
    template = p.add_mutually_exclusive_group()
    template.add_argument(
        "--chat-template",
        dest="chat_template",
        action="store_true",
        default=None,
        help="wrap the prompt as one user turn of the model's chat template (the default when "
        "the model has one; an error when it has none)",
    )
    template.add_argument(
        "--raw",
        "--no-chat-template",
        dest="chat_template",
        action="store_false",
        default=None,
        help="send the prompt as is, without the chat template",
    )
    p.add_argument("--system", default=None, help="system message (with the chat template)")
    p.add_argument("prompt")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lamina", description="LLM inference engine")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("run", help="complete one prompt, streaming to the terminal")
    EngineConfig.add_cli_args(p)
    _add_sampling_args(p, default_temperature=0.0)
    _add_run_args(p)
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
    add_force_flag(p, "output")
    p.set_defaults(func=cmd_convert)
    from lamina.commands.prune import add_prune_parser
    from lamina.commands.quantize import add_quantize_parser
    from lamina.commands.train_heads import add_train_heads_parser
    from lamina.eval.perplexity import add_ppl_parser
    from lamina.server.cli import add_serve_parser

    add_serve_parser(sub)
    add_ppl_parser(sub)
    add_quantize_parser(sub)
    add_prune_parser(sub)
    add_train_heads_parser(sub)
    for command in sub.choices.values():
        add_debug_flag(command)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run_command(f"lamina {args.command}", args.func, args)


if __name__ == "__main__":
    sys.exit(main())
