"""The `lamina` command line: one error boundary (one line on stderr, exit 1, or 2 for a bad
argument, 130 for Ctrl-C, a traceback only with --debug), arguments checked before the model
loads, the chat template by default for `run`, the sampling flags, and progress bars."""

from __future__ import annotations

import shutil
import socket
import subprocess
import sys
import time

import pytest

from lamina import SamplingParams
from lamina.cli import SAMPLING_FLAGS, _sampling, build_parser, main
from lamina.server import cli as server_cli


def _no_load(monkeypatch) -> None:
    """Loading a model fails the test: the argument checks must come first."""

    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the arguments were checked")

    monkeypatch.setattr("lamina.llm.load_model", refuse)
    monkeypatch.setattr("lamina.loading.loader.load_model", refuse)


def _one_error_line(err: str, prog: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith(f"{prog}: error: "), err
    assert "Traceback" not in err
    return lines[0]


@pytest.fixture
def tiny(tiny_model_factory):
    folder, _ = tiny_model_factory("llama_gqa")
    return folder


@pytest.fixture
def corrupt_copy(tiny, tmp_path):
    """The tiny model with its safetensors file cut short."""
    dst = tmp_path / "corrupt"
    shutil.copytree(tiny, dst)
    weights = dst / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    return dst


# ---- arguments are checked before the model loads -------------------------------------------
@pytest.mark.parametrize(
    ("flags", "named"),
    [
        (["--max-tokens", "0"], "--max-tokens 0"),
        (["--temperature", "-1"], "--temperature"),
        (["--top-p", "0"], "--top-p"),
        (["--min-p", "2"], "--min-p"),
        (["--repetition-penalty", "0"], "--repetition-penalty"),
        (["--frequency-penalty", "3"], "--frequency-penalty"),
        (["--presence-penalty", "-3"], "--presence-penalty"),
        (["--n", "0"], "--n"),
        (["--logprobs", "21"], "--logprobs"),
    ],
)
def test_bad_sampling_flag_fails_before_loading(flags, named, monkeypatch, capsys):
    _no_load(monkeypatch)
    start = time.perf_counter()
    assert main(["run", *flags, "x"]) == 2
    assert time.perf_counter() - start < 5
    assert named in _one_error_line(capsys.readouterr().err, "lamina run")


def test_max_tokens_zero_fails_fast_in_a_fresh_process():
    """The issue's case, end to end: `lamina run --max-tokens 0 x` took ~20 s (a model load)."""
    start = time.perf_counter()
    res = subprocess.run(
        [sys.executable, "-m", "lamina.cli", "run", "--max-tokens", "0", "x"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert res.returncode == 2
    assert time.perf_counter() - start < 15  # the interpreter and torch import, no model
    assert "--max-tokens 0 is invalid" in _one_error_line(res.stderr, "lamina run")


def test_chat_checks_sampling_and_model_before_loading(monkeypatch, capsys):
    _no_load(monkeypatch)
    assert main(["chat", "--top-k", "-2"]) == 2
    assert "--top-k" in _one_error_line(capsys.readouterr().err, "lamina chat")
    assert main(["chat", "--model", "/no/such/model"]) == 2
    assert "neither a folder nor a file" in capsys.readouterr().err


def test_system_with_raw_is_a_usage_error(monkeypatch, capsys):
    _no_load(monkeypatch)
    assert main(["run", "--raw", "--system", "be terse", "x"]) == 2
    assert "--system" in _one_error_line(capsys.readouterr().err, "lamina run")


def test_sampling_flags_build_sampling_params():
    parser = build_parser()
    args = parser.parse_args(
        ["run", "--temperature", "0.5", "--top-k", "7", "--top-p", "0.9", "--min-p", "0.05",
         "--repetition-penalty", "1.1", "--frequency-penalty", "0.2", "--presence-penalty",
         "-0.3", "--n", "2", "--logprobs", "3", "--sample-seed", "11", "--stop", "a", "--stop",
         "b", "--max-tokens", "9", "x"]
    )  # fmt: skip
    assert _sampling(args) == SamplingParams(
        temperature=0.5, top_k=7, top_p=0.9, min_p=0.05, repetition_penalty=1.1,
        frequency_penalty=0.2, presence_penalty=-0.3, n=2, logprobs=3, seed=11,
        stop=["a", "b"], max_tokens=9,
    )  # fmt: skip
    # a flag left out keeps SamplingParams' default; run is greedy, chat samples at 0.7
    assert _sampling(parser.parse_args(["run", "x"])) == SamplingParams(
        temperature=0.0, max_tokens=256
    )
    assert _sampling(parser.parse_args(["chat"])).temperature == 0.7
    assert set(SAMPLING_FLAGS) <= set(SamplingParams.__dataclass_fields__)


# ---- failures while working: one line, exit 1 ---------------------------------------------------
def test_corrupt_safetensors_is_one_line(corrupt_copy, capsys):
    assert main(["run", "--model", str(corrupt_copy), "hi"]) == 1
    line = _one_error_line(capsys.readouterr().err, "lamina run")
    assert f"cannot load {corrupt_copy}" in line
    assert "deserializing header" in line


def test_corrupt_safetensors_in_a_fresh_process(corrupt_copy):
    res = subprocess.run(
        [sys.executable, "-m", "lamina.cli", "run", "--model", str(corrupt_copy), "hi"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert res.returncode == 1
    _one_error_line(res.stderr, "lamina run")


def test_debug_flag_and_env_show_the_traceback(corrupt_copy, monkeypatch, capsys):
    assert main(["run", "--debug", "--model", str(corrupt_copy), "hi"]) == 1
    err = capsys.readouterr().err
    assert "Traceback" in err
    assert err.rstrip().splitlines()[-1].startswith("lamina run: error: cannot load")
    monkeypatch.setenv("LAMINA_DEBUG", "1")
    assert main(["run", "--model", str(corrupt_copy), "hi"]) == 1
    assert "Traceback" in capsys.readouterr().err


def test_unexpected_error_is_one_line_with_its_type(monkeypatch, capsys):
    def bug(*args, **kwargs):
        raise KeyError("oops")

    monkeypatch.setattr("lamina.llm.load_model", bug)
    assert main(["run", "x"]) == 1
    line = _one_error_line(capsys.readouterr().err, "lamina run")
    assert "KeyError: 'oops'" in line
    assert "--debug" in line


def test_ctrl_c_exits_130_quietly(monkeypatch, capsys):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr("lamina.llm.load_model", interrupted)
    assert main(["run", "x"]) == 130
    assert capsys.readouterr().err.strip() == ""


# ---- serve -----------------------------------------------------------------------------------
def test_serve_port_out_of_range(monkeypatch, capsys):
    _no_load(monkeypatch)
    assert server_cli.main(["--port", "99999"]) == 2
    assert "--port" in _one_error_line(capsys.readouterr().err, "lamina serve")
    assert main(["serve", "--port", "-1"]) == 2
    assert "--port" in _one_error_line(capsys.readouterr().err, "lamina serve")


def test_serve_address_in_use_fails_before_loading(monkeypatch, capsys):
    _no_load(monkeypatch)
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        assert server_cli.main(["--port", str(port), "--torch-threads", "1"]) == 1
    line = _one_error_line(capsys.readouterr().err, "lamina serve")
    assert f"cannot listen on 127.0.0.1:{port}" in line


def test_serve_bad_limits_are_usage_errors(monkeypatch, capsys):
    _no_load(monkeypatch)
    assert server_cli.main(["--max-n", "0"]) == 2
    assert "--max-n" in _one_error_line(capsys.readouterr().err, "lamina serve")
    assert server_cli.main(["--torch-threads", "0"]) == 2
    assert "--torch-threads" in _one_error_line(capsys.readouterr().err, "lamina serve")


# ---- output folders: convert, quantize, prune -------------------------------------------------
@pytest.mark.parametrize(
    "argv",
    [
        ["quantize", "--method", "int8", "--out"],
        ["prune", "--method", "magnitude", "--out"],
    ],
)
def test_out_must_not_be_a_file_or_a_folder_with_files(argv, tiny, tmp_path, monkeypatch, capsys):
    _no_load(monkeypatch)
    prog = f"lamina {argv[0]}"
    model = ["--model", str(tiny)]
    afile = tmp_path / "a.txt"
    afile.write_text("x")
    assert main([*argv, str(afile), *model]) == 2
    assert "is an existing file" in _one_error_line(capsys.readouterr().err, prog)
    full = tmp_path / "full"
    full.mkdir()
    (full / "keep.txt").write_text("x")
    assert main([*argv, str(full), *model]) == 2
    assert "--force" in _one_error_line(capsys.readouterr().err, prog)
    assert main([*argv, str(tiny), *model, "--force"]) == 2  # never over the model being read
    assert "the model being read" in _one_error_line(capsys.readouterr().err, prog)
    assert main([*argv, str(full), *model, "--force"]) == 1  # the checks pass, loading runs
    assert "was loaded" in _one_error_line(capsys.readouterr().err, prog)


def test_quantize_and_prune_check_their_flags_before_loading(tiny, tmp_path, monkeypatch, capsys):
    _no_load(monkeypatch)
    out = str(tmp_path / "out")
    model = ["--model", str(tiny), "--out", out]
    cases = [
        (["quantize", "--method", "rtn4", "--group-size", "48"], "group_size 48"),
        (["quantize", "--method", "awq", "--calib", str(tmp_path / "none.txt")], "none.txt"),
        (["quantize", "--method", "awq"], "--calib"),
        (["prune", "--method", "magnitude", "--sparsity", "1.5"], "--sparsity"),
        (["prune", "--method", "magnitude", "--dtype", "int3"], "int3"),
        (["prune", "--method", "wanda", "--calib", str(tmp_path / "none.txt")], "none.txt"),
    ]
    for argv, named in cases:
        assert main([*argv, *model]) == 2, argv
        assert named in _one_error_line(capsys.readouterr().err, f"lamina {argv[0]}")


def test_convert_checks_input_and_output(tiny, tmp_path, capsys):
    assert main(["convert", str(tmp_path / "none.gguf"), str(tmp_path / "out")]) == 2
    assert "none.gguf" in _one_error_line(capsys.readouterr().err, "lamina convert")
    gguf_file = tmp_path / "m.gguf"
    gguf_file.write_bytes(b"not a gguf")
    assert main(["convert", str(gguf_file), str(gguf_file)]) == 2
    assert "is an existing file" in _one_error_line(capsys.readouterr().err, "lamina convert")
    assert main(["convert", str(gguf_file), str(tiny)]) == 2
    assert "--force" in _one_error_line(capsys.readouterr().err, "lamina convert")
    assert main(["convert", str(gguf_file), str(tmp_path / "out"), "--dtype", "int3"]) == 2
    assert "int3" in _one_error_line(capsys.readouterr().err, "lamina convert")
    assert main(["convert", str(gguf_file), str(tmp_path / "out")]) == 1  # not a GGUF inside
    _one_error_line(capsys.readouterr().err, "lamina convert")


def test_ppl_checks_its_flags_before_loading(tmp_path, monkeypatch, capsys):
    _no_load(monkeypatch)
    for flags, named in [
        (["--context-length", "1"], "--context-length"),
        (["--stride", "0"], "--stride"),
        (["--max-tokens", "1"], "--max-tokens"),
        (["--file", str(tmp_path / "none.txt")], "none.txt"),
    ]:
        assert main(["ppl", *flags]) == 2
        assert named in _one_error_line(capsys.readouterr().err, "lamina ppl")


# ---- lamina run: the chat template by default ------------------------------------------------
@pytest.fixture
def seen_prompts(monkeypatch):
    """The prompts `lamina run` streams, decoded (special tokens kept)."""
    import lamina.streaming

    seen: list[str] = []
    real = lamina.streaming.stream_deltas

    def spy(engine, prompt, params, stats=None):
        text = prompt if isinstance(prompt, str) else engine.tokenizer.decode(prompt, False)
        seen.append(text)
        yield from real(engine, prompt, params, stats)

    monkeypatch.setattr(lamina.streaming, "stream_deltas", spy)
    return seen


def test_run_applies_the_chat_template_by_default(tiny, seen_prompts, capsys):
    # the tiny tokenizer's template: "<s>{role}: {content}\n" per turn, then "<s>assistant: "
    assert main(["run", "--model", str(tiny), "--max-tokens", "2", "hello"]) == 0
    assert seen_prompts[-1] == "<s>user: hello\n<s>assistant: "
    argv = ["run", "--model", str(tiny), "--max-tokens", "2", "--system", "be terse", "hello"]
    assert main(argv) == 0
    assert seen_prompts[-1] == "<s>system: be terse\n<s>user: hello\n<s>assistant: "
    assert main(["run", "--model", str(tiny), "--max-tokens", "2", "--chat-template", "hi"]) == 0
    assert seen_prompts[-1] == "<s>user: hi\n<s>assistant: "


@pytest.mark.parametrize("flag", ["--raw", "--no-chat-template"])
def test_run_raw_sends_the_text_as_is(flag, tiny, seen_prompts):
    assert main(["run", "--model", str(tiny), "--max-tokens", "2", flag, "hello"]) == 0
    assert seen_prompts[-1] == "hello"


def test_run_without_a_template_sends_the_text(tiny, tmp_path, seen_prompts, capsys):
    import json

    folder = tmp_path / "plain"
    shutil.copytree(tiny, folder)
    config = json.loads((folder / "tokenizer_config.json").read_text())
    del config["chat_template"]
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    assert main(["run", "--model", str(folder), "--max-tokens", "2", "hello"]) == 0
    assert seen_prompts[-1] == "hello"
    capsys.readouterr()
    assert main(["run", "--model", str(folder), "--chat-template", "hello"]) == 1
    assert "no chat template" in _one_error_line(capsys.readouterr().err, "lamina run")


# ---- lamina run / chat: n, logprobs, seeds ---------------------------------------------------
def test_run_prints_each_sample(tiny, capsys):
    argv = ["run", "--model", str(tiny), "--max-tokens", "3", "--temperature", "1", "--n", "3"]
    assert main([*argv, "--sample-seed", "5", "hello"]) == 0
    out = capsys.readouterr()
    for i in (1, 2, 3):
        assert f"--- sample {i} of 3 ---" in out.out
    assert "finish: length, length, length" in out.err


def test_run_prints_logprobs(tiny, capsys):
    argv = ["run", "--model", str(tiny), "--max-tokens", "4", "--logprobs", "2", "hello"]
    assert main(argv) == 0
    lines = capsys.readouterr().out.splitlines()
    header = next(i for i, line in enumerate(lines) if line.strip().startswith("logprob"))
    assert "top 2" in lines[header]
    rows = lines[header + 1 :]
    assert len(rows) == 4
    for row in rows:
        assert float(row.split()[0]) <= 0
        assert "  |  " in row


def test_logprob_table_format(capsys):
    from lamina.cli import _print_logprobs
    from lamina.outputs import CompletionOutput, Logprob

    out = CompletionOutput(
        index=0,
        text=" a,b",
        token_ids=[7, 9],
        logprobs=[
            {7: Logprob(-0.5, 1, " a"), 8: Logprob(-1.25, 2, "x")},
            {9: Logprob(-3.0, 3, ",b"), 4: Logprob(-0.1, 1, "\n"), 5: Logprob(-2.0, 2, "é")},
        ],
    )
    _print_logprobs(out, 2)
    assert capsys.readouterr().out.splitlines() == [
        "  logprob  token  |  top 2",
        '  -0.5000  " a"  |  " a" -0.5000, "x" -1.2500',
        '  -3.0000  ",b"  |  "\\n" -0.1000, "é" -2.0000',
    ]


def test_sample_seed_makes_samples_reproducible(tiny, capsys):
    argv = ["run", "--model", str(tiny), "--raw", "--max-tokens", "8", "--temperature", "1"]
    texts = []
    for _ in range(2):
        assert main([*argv, "--sample-seed", "3", "hello"]) == 0
        texts.append(capsys.readouterr().out)
    assert texts[0] == texts[1]


def test_chat_prints_samples_and_keeps_the_first(tiny, monkeypatch, capsys):
    lines = iter(["first question", "second question", ""])
    monkeypatch.setattr("builtins.input", lambda prompt="": next(lines))
    histories: list[list[dict]] = []
    from lamina.loading.tokenizer import Tokenizer

    real = Tokenizer.apply_chat_template

    def spy(self, messages, *args, **kwargs):
        histories.append([dict(m) for m in messages])
        return real(self, messages, *args, **kwargs)

    monkeypatch.setattr(Tokenizer, "apply_chat_template", spy)
    argv = ["chat", "--model", str(tiny), "--max-tokens", "3", "--n", "2", "--sample-seed", "1"]
    assert main(argv) == 0
    out = capsys.readouterr()
    assert out.out.count("--- sample 1 of 2 ---") == 2
    first_reply = out.out.split("--- sample 1 of 2 ---\n")[1].split("\n")[0]
    assert histories[1][1] == {"role": "assistant", "content": first_reply}
