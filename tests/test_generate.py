"""Generation behaviour users see: stop strings, seeds, streaming text, the CLI."""

from __future__ import annotations

import subprocess
import sys

import pytest

from lamina import SamplingParams
from lamina.cli import main
from lamina.streaming import StreamStats, stop_holdback, stream_deltas


def test_stop_holdback():
    assert stop_holdback("Hello wor", ["world"]) == 3
    assert stop_holdback("Hello", ["world"]) == 0
    assert stop_holdback("abc\n\n", ["\n\nUser:", "c\n"]) == 2
    assert stop_holdback("x", []) == 0


@pytest.mark.slow
def test_stop_string_is_cut_like_openai(smollm2_llm):
    base = smollm2_llm.generate(
        "The capital of France is", SamplingParams(temperature=0, max_tokens=24), use_tqdm=False
    )[0].outputs[0]
    assert "answer" in base.text, base.text  # the greedy continuation we rely on below
    out = smollm2_llm.generate(
        "The capital of France is",
        SamplingParams(temperature=0, max_tokens=24, stop=["answer"]),
        use_tqdm=False,
    )[0].outputs[0]
    assert out.text == base.text[: base.text.index("answer")]
    assert out.finish_reason == "stop"
    assert out.stop_reason == "answer"
    tok = base.token_ids[3]
    out = smollm2_llm.generate(
        "The capital of France is",
        SamplingParams(temperature=0, max_tokens=24, stop_token_ids=[tok]),
        use_tqdm=False,
    )[0].outputs[0]
    assert out.token_ids == base.token_ids[: base.token_ids.index(tok) + 1]
    assert out.finish_reason == "stop"
    assert out.stop_reason == tok


@pytest.mark.slow
def test_seed_reproducible_and_sampling_varies(smollm2_llm):
    def run(seed):
        params = SamplingParams(temperature=1.0, top_p=0.95, top_k=50, max_tokens=24, seed=seed)
        return smollm2_llm.generate("Tell me a story.", params, use_tqdm=False)[0].outputs[0]

    a, b, c = run(7), run(7), run(8)
    assert a.token_ids == b.token_ids
    assert a.token_ids != c.token_ids


@pytest.mark.slow
def test_streaming_never_breaks_utf8_and_hides_stop_prefixes(smollm2_llm):
    engine = smollm2_llm.engine
    for prompt, stop in [
        ("Write a line of emoji: 🍕🌮🎉", None),
        ("用中文写一首诗：", None),
        ("The capital of France is", ["answer"]),
    ]:
        params = SamplingParams(temperature=0, max_tokens=40, stop=stop)
        stats = StreamStats()
        deltas = list(stream_deltas(engine, prompt, params, stats))
        full = smollm2_llm.generate(prompt, params, use_tqdm=False)[0].outputs[0].text
        assert deltas
        assert "".join(deltas) == full
        assert all("\ufffd" not in d for d in deltas)
        assert stats.generated_tokens > 0
        assert stats.prompt_tps > 0
    engine.block_manager.check_all_free()


def test_stream_abandoned_midway_frees_blocks(tiny_model_factory):
    from lamina import LLM

    folder, _ = tiny_model_factory("llama_gqa")
    llm = LLM(str(folder), dtype="float32")
    gen = stream_deltas(llm.engine, [5, 6, 7], SamplingParams(max_tokens=50, ignore_eos=True))
    next(gen)
    gen.close()
    assert not llm.engine.has_unfinished_requests()
    llm.engine.block_manager.check_all_free()


def test_cli_run_streams_and_reports_speed(tiny_model_factory, capsys):
    folder, _ = tiny_model_factory("llama_gqa")
    assert main(["run", "--model", str(folder), "--max-tokens", "8", "hello"]) == 0
    captured = capsys.readouterr()
    assert captured.out.strip()
    assert "tok/s" in captured.err
    assert "decode: 8 tokens" in captured.err


def test_cli_chat_keeps_history(tiny_model_factory, monkeypatch, capsys):
    import lamina.streaming

    folder, _ = tiny_model_factory("llama_gqa")
    lines = iter(["first question", "second question", ""])
    monkeypatch.setattr("builtins.input", lambda prompt="": next(lines))
    seen: list = []
    real = lamina.streaming.stream_deltas

    def spy(engine, prompt, params, stats=None):
        seen.append(engine.tokenizer.decode(prompt, skip_special_tokens=False))
        yield from real(engine, prompt, params, stats)

    monkeypatch.setattr(lamina.streaming, "stream_deltas", spy)
    assert main(["chat", "--model", str(folder), "--max-tokens", "4", "--seed", "1"]) == 0
    assert len(seen) == 2
    assert "first question" in seen[1]
    assert "second question" in seen[1]
    assert "assistant" in seen[1]


def test_cli_bad_model_is_a_clear_error(capsys):
    assert main(["run", "--model", "/no/such/dir", "hi"]) == 2
    assert "neither a folder nor a file" in capsys.readouterr().err


@pytest.mark.slow
def test_console_script_on_default_model(smollm2_path):
    """The installed `lamina` entry point runs the default model end to end."""
    exe = [sys.executable, "-m", "lamina.cli"]
    res = subprocess.run(
        [*exe, "run", "--raw", "--max-tokens", "12", "The capital of France is"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert res.returncode == 0, res.stderr
    assert "Paris" in res.stdout
    assert "decode: 12 tokens" in res.stderr
