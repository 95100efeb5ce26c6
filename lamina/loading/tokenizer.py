"""Text <-> token ids, built from a Hugging Face folder or from a GGUF file's metadata.

transformers is our reference for what a model's tokenizer does, so the GGUF builders below
reproduce its GGUF converter (transformers/integrations/gguf/gguf_tokenizer_mapping.py) with the
`tokenizers` library alone: same vocabulary spelling, merges, pre-tokenizer regex, added tokens
and BOS/EOS post-processing.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import tokenizers
from tokenizers import AddedToken, Regex, decoders, normalizers, pre_tokenizers, processors
from tokenizers.models import BPE

from lamina.loading.chat_template import (
    folder_templates,
    normalize_templates,
    render_chat_template,
    select_template,
)
from lamina.loading.detokenizer import IncrementalDetokenizer

if TYPE_CHECKING:
    import gguf

__all__ = ["IncrementalDetokenizer", "Tokenizer"]

_NO_LIMIT = int(1e29)  # transformers writes int(1e30) as model_max_length when it is unknown
_CONTROL, _USER_DEFINED = 3, 4  # llama.cpp token types
_GGUF_MODELS = ("gpt2", "llama")

_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN35_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}"
    r"| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_UPPER, _LOWER = r"[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]", r"[\p{Ll}\p{Lm}\p{Lo}\p{M}]"
_CONTRACTION = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
_TEKKEN_SPLIT = (
    rf"[^\r\n\p{{L}}\p{{N}}]?{_UPPER}*{_LOWER}+|[^\r\n\p{{L}}\p{{N}}]?{_UPPER}+{_LOWER}*"
    r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_GPT4O_SPLIT = (
    rf"[^\r\n\p{{L}}\p{{N}}]?{_UPPER}*{_LOWER}+{_CONTRACTION}"
    rf"|[^\r\n\p{{L}}\p{{N}}]?{_UPPER}+{_LOWER}*{_CONTRACTION}"
    r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# `tokenizer.ggml.pre` -> split regex, as in transformers. Any other name (e.g. "default", "gpt2",
# "smollm") gets the GPT-2 regex built into ByteLevel, which is also what transformers does.
_PRE_SPLITS = {
    **dict.fromkeys(
        "llama3 llama-v3 llama-bpe falcon3 falcon-h1 pixtral midm-2.0 lfm2 jina-v5-nano dbrx "
        "smaug-bpe".split(),
        _LLAMA3_SPLIT,
    ),
    **dict.fromkeys("qwen2 deepseek-r1-qwen kormo f2llmv2 megrez".split(), _QWEN2_SPLIT),
    "qwen35": _QWEN35_SPLIT,
    "tekken": _TEKKEN_SPLIT,
    **dict.fromkeys("gpt-4o llama4 kanana2 talkie minimax-m2".split(), _GPT4O_SPLIT),
}
_GEMMA_ARCHS = ("gemma", "gemma2", "gemma3")


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table that byte-level vocabularies are spelled in."""
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1)]
    bs += range(ord("®"), ord("ÿ") + 1)
    cs = list(bs)
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs), strict=True))


def _generate_merges(vocab: dict[str, int], scores: dict[str, float]) -> list[tuple[str, str]]:
    """Merges a SentencePiece vocabulary implies: every split of a token into two known pieces,
    best score first (transformers' `generate_merges`, kept identical so ties break the same)."""
    merges: list[tuple[str, str, float]] = []
    for token, score in scores.items():
        local = [
            (token[:i], token[i:], score)
            for i in range(1, len(token))
            if token[:i] in vocab and token[i:] in vocab
        ]
        local.sort(key=lambda m: (vocab[m[0]], vocab[m[1]]))
        merges.extend(local)
    merges.sort(key=lambda m: (m[2], len(m[0]), len(m[1])), reverse=True)
    return [(left, right) for left, right, _ in merges]


def _file_merges(merges: list[str] | None) -> list[tuple[str, str]] | None:
    return None if merges is None else [tuple(m.split(" ")) for m in merges]  # type: ignore[misc]


def _byte_level_backend(
    tokens: list[str], merges: list[str] | None, pre: str | None
) -> tuple[tokenizers.Tokenizer, list[str]]:
    """A GPT-2 style byte-level BPE; returns it and the tokens its class marks special."""
    spelling = _bytes_to_unicode()
    alphabet = frozenset(spelling.values())
    vocab = {
        t if alphabet.issuperset(t) else "".join(spelling[b] for b in t.encode("utf-8")): i
        for i, t in enumerate(tokens)
    }
    if merges is None:
        raise ValueError(
            "This GGUF has a byte-level (gpt2) vocabulary but no tokenizer.ggml.merges."
        )
    pairs = _file_merges(merges)
    backend = tokenizers.Tokenizer(
        BPE(vocab, pairs, continuing_subword_prefix="", end_of_word_suffix="", fuse_unk=False)
    )
    split = _PRE_SPLITS.get(pre or "")
    if split is None:
        backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    else:
        backend.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(split), behavior="isolated"),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )
    backend.decoder = decoders.ByteLevel()
    return backend, ["<|endoftext|>"]  # GPT2Tokenizer's default bos/eos/unk


def _sentencepiece_backend(
    tokens: list[str], scores: list[float] | None, merges: list[str] | None, arch: str
) -> tuple[tokenizers.Tokenizer, list[str]]:
    """A SentencePiece vocabulary as a byte-fallback BPE, as transformers' LlamaTokenizer builds it
    (Gemma and Phi-3 files differ in spelling and space handling, so they get their variants)."""
    gemma = arch in _GEMMA_ARCHS
    if gemma:  # runs of spaces are stored as spaces but looked up as "▁"s; merges follow file order
        tokens = ["\u2581" * len(t) if " " in t and not t.strip() else t for t in tokens]
    vocab = {t: i for i, t in enumerate(tokens)}
    pairs = _file_merges(merges)
    if pairs is None:
        if gemma:
            by_score = {t: -float(i) for i, t in enumerate(tokens)}
        elif scores is None:
            raise ValueError("This GGUF SentencePiece vocabulary has neither merges nor scores.")
        else:
            by_score = dict(zip(tokens, scores, strict=True))
        pairs = _generate_merges(vocab, by_score)
    replace_space = decoders.Replace("\u2581", " ")
    if gemma:
        backend = tokenizers.Tokenizer(
            BPE(vocab, pairs, unk_token="<unk>", fuse_unk=True, byte_fallback=True)
        )
        backend.normalizer = normalizers.Replace(" ", "\u2581")
        backend.pre_tokenizer = pre_tokenizers.Split(" ", behavior="merged_with_previous")
        backend.decoder = decoders.Sequence(
            [replace_space, decoders.ByteFallback(), decoders.Fuse()]
        )
        return backend, ["<bos>", "<eos>", "<unk>", "<pad>", "<mask>"]
    backend = tokenizers.Tokenizer(BPE(vocab, pairs, fuse_unk=True, byte_fallback=True))
    if arch == "phi3":  # the prefix space comes from a normalizer, not from Metaspace
        backend.normalizer = normalizers.Sequence(
            [normalizers.Prepend("\u2581"), normalizers.Replace(" ", "\u2581")]
        )
    else:
        backend.pre_tokenizer = pre_tokenizers.Metaspace(
            replacement="\u2581", prepend_scheme="first", split=False
        )
    backend.decoder = decoders.Sequence(
        [replace_space, decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    return backend, ["<s>", "</s>", "<unk>"]


def _template_processor(
    bos: Any, bos_id: Any, eos: Any, eos_id: Any, add_bos: bool, add_eos: bool
) -> processors.TemplateProcessing:
    """The post-processor transformers' `update_post_processor` writes, so saved files match."""
    single = f"{(bos + ':0 ') if add_bos else ''}$A:0{(' ' + eos + ':0') if add_eos else ''}"
    pair = f"{single}{(' ' + bos + ':1') if add_bos else ''} $B:1"
    pair += f"{(' ' + eos + ':1') if add_eos else ''}"
    special = [(bos, bos_id)] if add_bos else []
    special += [(eos, eos_id)] if add_eos else []
    return processors.TemplateProcessing(single=single, pair=pair, special_tokens=special)


def _read_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


def _token_content(value: Any) -> str | None:
    """Special tokens in HF configs are strings or serialized AddedToken dicts."""
    return value.get("content") if isinstance(value, dict) else value


class Tokenizer:
    """Wraps a tokenizers.Tokenizer plus the special-token facts and chat template."""

    def __init__(
        self,
        backend: tokenizers.Tokenizer,
        *,
        bos_token: str | None = None,
        eos_token: str | None = None,
        pad_token: str | None = None,
        unk_token: str | None = None,
        add_bos_token: bool | None = None,
        add_eos_token: bool | None = None,
        chat_template: str | dict[str, str] | list[dict[str, str]] | None = None,
        model_max_length: int | None = None,
        stop_token_ids: Sequence[int] = (),
    ) -> None:
        """`add_bos_token`/`add_eos_token` of None keep the backend's post-processor (HF does the
        same for a tokenizer.json); a bool rewrites it the way transformers does."""
        self.backend = backend
        self.bos_token, self.eos_token = bos_token, eos_token
        self.pad_token, self.unk_token = pad_token, unk_token
        self.bos_token_id = self._id(bos_token)
        self.eos_token_id = self._id(eos_token)
        self.pad_token_id = self._id(pad_token)
        self.unk_token_id = self._id(unk_token)
        if add_bos_token is not None or add_eos_token is not None:
            add_bos = bool(add_bos_token) and self.bos_token_id is not None
            add_eos = bool(add_eos_token) and self.eos_token_id is not None
            backend.post_processor = _template_processor(
                bos_token, self.bos_token_id, eos_token, self.eos_token_id, add_bos, add_eos
            )
        with_special = backend.encode("a", add_special_tokens=True).ids
        plain = backend.encode("a", add_special_tokens=False).ids
        added = len(with_special) > len(plain)
        self.add_bos_token = added and with_special[0] == self.bos_token_id
        self.add_eos_token = added and with_special[-1] == self.eos_token_id
        self.chat_templates = normalize_templates(chat_template)
        self.model_max_length = model_max_length
        stops = [self.eos_token_id] if self.eos_token_id is not None else []
        self.stop_token_ids: list[int] = list(dict.fromkeys([*stops, *stop_token_ids]))

    def _id(self, token: str | None) -> int | None:
        return None if token is None else self.backend.token_to_id(token)

    @property
    def chat_template(self) -> str | None:
        """The default template (None if the model has none)."""
        return self.chat_templates.get("default")

    @chat_template.setter
    def chat_template(self, value: str | None) -> None:
        if value is None:
            self.chat_templates.pop("default", None)
        else:
            self.chat_templates["default"] = value

    @property
    def vocab_size(self) -> int:
        """Number of ids, added tokens included (what HF's len(tokenizer) reports)."""
        return self.backend.get_vocab_size(with_added_tokens=True)

    @property
    def special_tokens(self) -> dict[str, str]:
        """The named special tokens, as chat templates see them."""
        named = {
            "bos_token": self.bos_token,
            "eos_token": self.eos_token,
            "unk_token": self.unk_token,
            "pad_token": self.pad_token,
        }
        return {k: v for k, v in named.items() if v is not None}

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of `text`; special tokens written literally in it are matched."""
        return self.backend.encode(text, add_special_tokens=add_special_tokens).ids

    def encode_batch(
        self, texts: Sequence[str], add_special_tokens: bool = True
    ) -> list[list[int]]:
        """Like encode, for many texts at once (tokenizers parallelizes this)."""
        encs = self.backend.encode_batch(list(texts), add_special_tokens=add_special_tokens)
        return [e.ids for e in encs]

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        """Text of `ids`; incomplete UTF-8 at either end shows as U+FFFD."""
        return self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def convert_ids_to_tokens(self, ids: int | Sequence[int]) -> list[str]:
        """Vocabulary spellings (e.g. "Ġthe" in byte-level vocabularies)."""
        ids = [ids] if isinstance(ids, int) else ids
        return [self.backend.id_to_token(int(i)) for i in ids]

    def apply_chat_template(
        self,
        messages: list[dict[str, Any]],
        add_generation_prompt: bool = True,
        tokenize: bool = False,
        *,
        chat_template: str | None = None,
        tools: list[dict[str, Any]] | None = None,
        **template_kwargs: Any,
    ) -> str | list[int]:
        """The prompt for a conversation, rendered as transformers would. `chat_template` may be
        a template or a template's name. Ids are encoded without adding BOS/EOS, since templates
        write their own special tokens (as transformers does)."""
        source = select_template(self.chat_templates, chat_template, tools)
        text = render_chat_template(
            source,
            messages,
            add_generation_prompt=add_generation_prompt,
            special_tokens=self.special_tokens,
            tools=tools,
            **template_kwargs,
        )
        return self.encode(text, add_special_tokens=False) if tokenize else text

    def detokenizer(
        self, prompt_ids: Sequence[int] = (), skip_special_tokens: bool = True
    ) -> IncrementalDetokenizer:
        """A streaming decoder for text generated after `prompt_ids`."""
        return IncrementalDetokenizer(self, prompt_ids, skip_special_tokens)

    def save_hf(self, folder: str | Path) -> None:
        """Write tokenizer.json + tokenizer_config.json that transformers' AutoTokenizer loads to
        the same behaviour (it takes BOS/EOS handling from tokenizer.json's post-processor)."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        self.backend.save(str(folder / "tokenizer.json"))
        config: dict[str, Any] = {
            "tokenizer_class": "PreTrainedTokenizerFast",
            **self.special_tokens,
            "add_bos_token": self.add_bos_token,
            "add_eos_token": self.add_eos_token,
            "clean_up_tokenization_spaces": False,
        }
        if self.model_max_length is not None:
            config["model_max_length"] = self.model_max_length
        if set(self.chat_templates) == {"default"}:
            config["chat_template"] = self.chat_templates["default"]
        elif self.chat_templates:
            config["chat_template"] = [
                {"name": k, "template": v} for k, v in self.chat_templates.items()
            ]
        text = json.dumps(config, indent=2, ensure_ascii=False) + "\n"
        (folder / "tokenizer_config.json").write_text(text, encoding="utf-8")

    @classmethod
    def from_hf_folder(cls, folder: str | Path) -> Tokenizer:
        """Load a Hugging Face tokenizer folder: tokenizer.json, tokenizer_config.json and, if
        present, special_tokens_map.json, generation_config.json (extra stop ids) and the
        chat_template.jinja / chat_template.json / additional_chat_templates/ files."""
        folder = Path(folder)
        path = folder / "tokenizer.json"
        if not path.is_file():
            raise ValueError(
                f"{folder} has no tokenizer.json. lamina reads Hugging Face 'fast' tokenizers: "
                "a folder with tokenizer.json (+ tokenizer_config.json), or a GGUF file. Convert "
                "a slow tokenizer with transformers' AutoTokenizer(...).save_pretrained(folder)."
            )
        backend = tokenizers.Tokenizer.from_file(str(path))
        config = _read_json(folder / "tokenizer_config.json")
        token_map = _read_json(folder / "special_tokens_map.json")
        generation = _read_json(folder / "generation_config.json")
        names = ("bos_token", "eos_token", "pad_token", "unk_token")
        special = {n: _token_content(config.get(n, token_map.get(n))) for n in names}
        templates = folder_templates(folder, config.get("chat_template"))
        limit = config.get("model_max_length")
        stops = generation.get("eos_token_id", [])
        stops = [stops] if isinstance(stops, int) else list(stops)
        tok = cls(
            backend,
            **special,
            chat_template=templates,
            model_max_length=limit if isinstance(limit, int) and limit < _NO_LIMIT else None,
            stop_token_ids=stops,
        )
        if tok.eos_token_id is None and stops:
            tok.eos_token_id = stops[0]
        return tok

    @classmethod
    def from_gguf(cls, reader: gguf.GGUFReader) -> Tokenizer:
        """Build the tokenizer a GGUF file's metadata describes (~0.1 s for a 49k vocabulary)."""

        def field(key: str, default: Any = None) -> Any:
            f = reader.fields.get(key)
            return default if f is None else f.contents()

        kind = field("tokenizer.ggml.model")
        if kind not in _GGUF_MODELS:
            raise ValueError(
                f"Cannot build a tokenizer from a GGUF whose tokenizer.ggml.model is {kind!r}; "
                f"lamina accepts {list(_GGUF_MODELS)} (byte-level BPE and SentencePiece)."
            )
        arch = field("general.architecture", "")
        tokens: list[str] = field("tokenizer.ggml.tokens")
        types: list[int] = field("tokenizer.ggml.token_type") or []
        merges: list[str] | None = field("tokenizer.ggml.merges")
        if kind == "gpt2":
            backend, class_specials = _byte_level_backend(
                tokens, merges, field("tokenizer.ggml.pre")
            )
            alphabet = frozenset(_bytes_to_unicode().values())
        else:
            scores = field("tokenizer.ggml.scores")
            backend, class_specials = _sentencepiece_backend(tokens, scores, merges, arch)
            alphabet = None
        # The tokens transformers makes special, in its order: its tokenizer class's defaults,
        # control tokens (in a byte-level file only if spelled in the byte alphabet; others are
        # llama.cpp mislabels), then the file's named tokens. transformers also appends class
        # defaults missing from the vocabulary as new ids; we skip those (the model has no row).
        keys = {"bos": "bos", "eos": "eos", "unk": "unknown", "pad": "padding"}
        named_ids = {f"{k}_token": field(f"tokenizer.ggml.{v}_token_id") for k, v in keys.items()}
        named = {k: tokens[i] for k, i in named_ids.items() if i is not None and i < len(tokens)}
        control = [
            t
            for t, ty in zip(tokens, types, strict=False)
            if ty == _CONTROL and (alphabet is None or alphabet.issuperset(t))
        ]
        specials = [
            t
            for t in [*class_specials, *control, *named.values()]
            if backend.token_to_id(t) is not None
        ]
        backend.add_special_tokens(
            [AddedToken(t, normalized=False, special=True) for t in dict.fromkeys(specials)]
        )
        vocab = backend.get_vocab()
        user = [
            t for t, ty in zip(tokens, types, strict=False) if ty == _USER_DEFINED and t in vocab
        ]
        if user:
            backend.add_tokens([AddedToken(t, normalized=False, special=False) for t in user])
        add_bos = field("tokenizer.ggml.add_bos_token")
        if add_bos is None and kind == "llama":
            add_bos = True  # llama.cpp adds BOS to SentencePiece vocabularies that do not say
        context = field(f"{arch}.context_length")
        extra_stops = [field(f"tokenizer.ggml.{k}_token_id") for k in ("eot", "eom")]
        tok = cls(
            backend,
            **named,
            add_bos_token=bool(add_bos),
            add_eos_token=bool(field("tokenizer.ggml.add_eos_token")),
            chat_template=field("tokenizer.chat_template"),
            model_max_length=int(context) if context else None,
            stop_token_ids=[i for i in extra_stops if i is not None],
        )
        for name, i in named_ids.items():  # ids straight from the file, whatever the spelling
            if i is not None:
                setattr(tok, f"{name}_id", int(i))
        if tok.eos_token_id is not None and tok.eos_token_id not in tok.stop_token_ids:
            tok.stop_token_ids.insert(0, tok.eos_token_id)
        return tok
