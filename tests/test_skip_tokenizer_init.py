"""skip_tokenizer_init (vLLM's): a model folder with config + weights only runs on token ids.

Without the flag such a folder is refused, naming the flag; with it, greedy generation from a
token-id prompt gives the same ids as the same weights with a tokenizer, outputs carry no text,
EOS comes from the model's own config, stop_token_ids work, and whatever needs text (text
prompts, stop strings, bad_words, chat, get_tokenizer, `lamina run`) is refused clearly."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from lamina import LLM, SamplingParams
from lamina.engine_config import EngineConfig
from lamina.loading.loader import load_model

PROMPT = [5, 40, 77, 12, 99, 31]
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


def weights_only(src: Path, dst: Path, **config_changes: object) -> Path:
    """A copy of a model folder without its tokenizer files; `config_changes` go into
    config.json (and generation_config.json is dropped when they do)."""
    dst.mkdir(parents=True, exist_ok=True)
    for f in src.iterdir():
        if f.name not in TOKENIZER_FILES:
            shutil.copy(f, dst / f.name)
    if config_changes:
        config = json.loads((dst / "config.json").read_text())
        config.update(config_changes)
        (dst / "config.json").write_text(json.dumps(config))
        (dst / "generation_config.json").unlink(missing_ok=True)
    assert not (dst / "tokenizer.json").exists()
    return dst


@pytest.fixture(scope="module")
def tok_folder(tiny_model_factory) -> Path:
    return tiny_model_factory("llama_gqa")[0]


@pytest.fixture(scope="module")
def bare_folder(tok_folder, tmp_path_factory) -> Path:
    return weights_only(tok_folder, tmp_path_factory.mktemp("bare"))


@pytest.fixture(scope="module")
def with_tok(tok_folder) -> LLM:
    return LLM(str(tok_folder), dtype="float32")


@pytest.fixture(scope="module")
def bare(bare_folder) -> LLM:
    return LLM(str(bare_folder), dtype="float32", skip_tokenizer_init=True)


def greedy(n: int = 12, **kw: object) -> SamplingParams:
    return SamplingParams(temperature=0, max_tokens=n, **kw)  # type: ignore[arg-type]


def test_folder_without_tokenizer_needs_the_flag(bare_folder):
    with pytest.raises(ValueError, match=r"no tokenizer\.json") as e:
        LLM(str(bare_folder), dtype="float32")
    assert "skip_tokenizer_init=True (--skip-tokenizer-init)" in str(e.value)
    assert "--tokenizer" in str(e.value)  # the other way out


def test_flag_is_an_engine_field_and_a_cli_flag(bare_folder):
    assert "skip_tokenizer_init" in EngineConfig.names()
    from lamina.cli import build_parser

    args = build_parser().parse_args(
        ["serve", "--model", str(bare_folder), "--skip-tokenizer-init"]
    )
    assert EngineConfig.from_cli_args(args).skip_tokenizer_init is True
    with pytest.raises(ValueError, match="contradict"):
        EngineConfig(model=str(bare_folder), tokenizer=str(bare_folder), skip_tokenizer_init=True)


def test_loads_no_tokenizer(bare, bare_folder):
    assert bare.tokenizer is None
    assert bare.engine.tokenizer is None
    assert load_model(bare_folder, "float32", skip_tokenizer_init=True).tokenizer is None


def test_same_token_ids_as_with_a_tokenizer(bare, with_tok):
    params = greedy(16, ignore_eos=True)
    want = with_tok.generate([PROMPT], params, use_tqdm=False)[0]
    got = bare.generate([PROMPT], params, use_tqdm=False)[0]
    assert want.outputs[0].text  # the reference does make text
    assert got.outputs[0].token_ids == want.outputs[0].token_ids
    assert got.outputs[0].text == ""
    assert got.prompt is None
    assert got.prompt_token_ids == PROMPT
    # a dict prompt too, and several prompts in one batch
    two = bare.generate([{"prompt_token_ids": PROMPT}, PROMPT[:3]], params, use_tqdm=False)
    ref = with_tok.generate([PROMPT, PROMPT[:3]], params, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in two] == [o.outputs[0].token_ids for o in ref]


def test_stop_token_ids(bare):
    ids = bare.generate([PROMPT], greedy(12, ignore_eos=True), use_tqdm=False)[0].outputs[0]
    stop = ids.token_ids[4]
    cut = ids.token_ids.index(stop)
    out = bare.generate([PROMPT], greedy(12, stop_token_ids=[stop]), use_tqdm=False)[0]
    o = out.outputs[0]
    assert o.token_ids == ids.token_ids[: cut + 1]
    assert (o.finish_reason, o.stop_reason, o.text) == ("stop", stop, "")


def test_eos_comes_from_the_model_config(bare, tok_folder, tmp_path):
    """A folder whose config.json names as EOS a token the model generates: generation stops
    there (finish_reason "stop", no stop_reason), with no tokenizer to say what EOS is."""
    ids = bare.generate([PROMPT], greedy(12, ignore_eos=True), use_tqdm=False)[0]
    generated = ids.outputs[0].token_ids
    eos = generated[5]
    cut = generated.index(eos)
    folder = weights_only(tok_folder, tmp_path / "eos", eos_token_id=eos)
    llm = LLM(str(folder), dtype="float32", skip_tokenizer_init=True)
    assert eos in llm.engine.eos_token_ids
    o = llm.generate([PROMPT], greedy(12), use_tqdm=False)[0].outputs[0]
    assert o.token_ids == generated[: cut + 1]
    assert (o.finish_reason, o.stop_reason) == ("stop", None)


def test_sampling_logprobs_and_beams_without_text(bare, with_tok):
    out = bare.generate(
        [PROMPT], SamplingParams(n=2, seed=3, max_tokens=5, logprobs=2), use_tqdm=False
    )[0]
    assert len(out.outputs) == 2
    for o in out.outputs:
        assert o.text == ""
        assert len(o.token_ids) == len(o.logprobs) == 5
        assert all(lp.decoded_token is None for e in o.logprobs for lp in e.values())
    from lamina.sampling_params import BeamSearchParams

    params = BeamSearchParams(beam_width=2, max_tokens=4)
    got = bare.beam_search([{"prompt_token_ids": PROMPT}], params)[0]
    want = with_tok.beam_search([{"prompt_token_ids": PROMPT}], params)[0]
    assert [s.token_ids for s in got.sequences] == [s.token_ids for s in want.sequences]
    assert all(s.text == "" for s in got.sequences)


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (
            lambda llm: llm.generate("hello", use_tqdm=False),
            r"prompt is text but the engine runs without a tokenizer \(skip_tokenizer_init\); "
            "give token ids",
        ),
        (
            lambda llm: llm.generate({"prompt": "hello"}, use_tqdm=False),
            "prompt is text but the engine runs without a tokenizer",
        ),
        (
            lambda llm: llm.generate([PROMPT], SamplingParams(stop=["\n"]), use_tqdm=False),
            r"stop=\['\\n'\] are strings.*without a tokenizer.*use stop_token_ids",
        ),
        (
            lambda llm: llm.generate([PROMPT], SamplingParams(bad_words=["x"]), use_tqdm=False),
            "bad_words.*without a tokenizer.*logit_bias",
        ),
        (
            lambda llm: llm.chat([{"role": "user", "content": "hi"}], use_tqdm=False),
            "chat renders messages as text.*without a tokenizer.*token ids",
        ),
        (lambda llm: llm.get_tokenizer(), "without a tokenizer"),
    ],
)
def test_text_is_refused(bare, call, match):
    with pytest.raises(ValueError, match=match):
        call(bare)
    assert not bare.engine.has_unfinished_requests()


def test_run_and_chat_refuse_the_flag(bare_folder, capsys):
    from lamina.cli import main

    for argv in (["run", "hi"], ["chat"]):
        code = main([*argv, "--model", str(bare_folder), "--skip-tokenizer-init"])
        err = capsys.readouterr().err
        assert code == 2, err
        assert "--skip-tokenizer-init" in err
        assert "needs a tokenizer" in err
        assert "lamina serve --skip-tokenizer-init" in err
