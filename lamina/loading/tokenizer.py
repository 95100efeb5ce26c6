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
from tokenizers import AddedToken, processors

from lamina.loading.chat_template import (
    folder_templates,
    normalize_templates,
    render_chat_template,
    select_template,
)
from lamina.loading.detokenizer import IncrementalDetokenizer
from lamina.loading.gguf_vocab import (
    CONTROL,
    GGUF_MODELS,
    USER_DEFINED,
    byte_level_backend,
    bytes_to_unicode,
    sentencepiece_backend,
)

if TYPE_CHECKING:
    import gguf

__all__ = ["IncrementalDetokenizer", "Tokenizer"]

_NO_LIMIT = int(1e29)  # transformers writes int(1e30) as model_max_length when it is unknown


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
        # tokenizers returns None only for ids outside the vocabulary
        return [self.backend.id_to_token(int(i)) or "" for i in ids]

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
        write their own special tokens (as transformers does). Like transformers, any role a
        template understands is rendered; a message that is not a dict, has no role, or lacks a
        content the template reads is a ValueError naming it (`validate_messages` in
        chat_template.py checks OpenAI's roles and contents, for `LLM.chat` and the server)."""
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
            bos_token=special["bos_token"],
            eos_token=special["eos_token"],
            pad_token=special["pad_token"],
            unk_token=special["unk_token"],
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
        if kind not in GGUF_MODELS:
            raise ValueError(
                f"Cannot build a tokenizer from a GGUF whose tokenizer.ggml.model is {kind!r}; "
                f"lamina accepts {list(GGUF_MODELS)} (byte-level BPE and SentencePiece)."
            )
        arch = field("general.architecture", "")
        tokens: list[str] = field("tokenizer.ggml.tokens")
        types: list[int] = field("tokenizer.ggml.token_type") or []
        merges: list[str] | None = field("tokenizer.ggml.merges")
        if kind == "gpt2":
            backend, class_specials = byte_level_backend(
                tokens, merges, field("tokenizer.ggml.pre")
            )
            alphabet = frozenset(bytes_to_unicode().values())
        else:
            scores = field("tokenizer.ggml.scores")
            backend, class_specials = sentencepiece_backend(tokens, scores, merges, arch)
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
            if ty == CONTROL and (alphabet is None or alphabet.issuperset(t))
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
            t for t, ty in zip(tokens, types, strict=False) if ty == USER_DEFINED and t in vocab
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
