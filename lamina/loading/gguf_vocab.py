"""Tokenizer backends rebuilt from GGUF vocabularies, the way transformers' GGUF converter
builds them: byte-level BPE ("gpt2") with the pre-tokenizer regex named by
`tokenizer.ggml.pre`, and SentencePiece ("llama") with byte fallback."""

from __future__ import annotations

import tokenizers
from tokenizers import Regex, decoders, normalizers, pre_tokenizers
from tokenizers.models import BPE

CONTROL, USER_DEFINED = 3, 4  # llama.cpp token types
GGUF_MODELS = ("gpt2", "llama")

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
        [
            "llama3",
            "llama-v3",
            "llama-bpe",
            "falcon3",
            "falcon-h1",
            "pixtral",
            "midm-2.0",
            "lfm2",
            "jina-v5-nano",
            "dbrx",
            "smaug-bpe",
        ],
        _LLAMA3_SPLIT,
    ),
    **dict.fromkeys(["qwen2", "deepseek-r1-qwen", "kormo", "f2llmv2", "megrez"], _QWEN2_SPLIT),
    "qwen35": _QWEN35_SPLIT,
    "tekken": _TEKKEN_SPLIT,
    **dict.fromkeys(["gpt-4o", "llama4", "kanana2", "talkie", "minimax-m2"], _GPT4O_SPLIT),
}
_GEMMA_ARCHS = ("gemma", "gemma2", "gemma3")


def bytes_to_unicode() -> dict[int, str]:
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


def byte_level_backend(
    tokens: list[str], merges: list[str] | None, pre: str | None
) -> tuple[tokenizers.Tokenizer, list[str]]:
    """A GPT-2 style byte-level BPE; returns it and the tokens its class marks special."""
    spelling = bytes_to_unicode()
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


def sentencepiece_backend(
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
