"""Plain data and helpers shared by test modules and conftest fixtures (not a test module:
test modules never import each other or a conftest; what needs pytest is a fixture)."""

from __future__ import annotations

import json
from pathlib import Path

TINY_VOCAB = 256

# The name the test servers give the tiny model (`served_model_name`).
SERVED_MODEL_NAME = "tiny"


def write_byte_tokenizer(folder: Path, vocab_size: int = TINY_VOCAB) -> None:
    """A byte-level BPE tokenizer with no merges (one token per byte), plus its config.

    Ids 0-2 are <unk>, <s>, </s>; bytes map to the remaining ids (vocab_size >= 259 needed
    for every byte, so we keep the byte alphabet printable ASCII only when it is smaller).
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    alphabet.sort()
    specials = ["<unk>", "<s>", "</s>"]
    vocab = {t: i for i, t in enumerate(specials)}
    for ch in alphabet[: vocab_size - len(specials)]:
        vocab[ch] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(specials)
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "bos_token": "<s>",
                "eos_token": "</s>",
                "unk_token": "<unk>",
                "add_bos_token": False,
                "tokenizer_class": "PreTrainedTokenizerFast",
                "chat_template": "{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}\n"
                "{% endfor %}{% if add_generation_prompt %}<s>assistant: {% endif %}",
            }
        )
    )


TINY_CONFIGS: dict[str, dict] = {
    "llama_mha": {"arch": "llama", "num_attention_heads": 4, "num_key_value_heads": 4},
    "llama_gqa": {"arch": "llama", "num_attention_heads": 4, "num_key_value_heads": 2},
    "llama_mqa": {"arch": "llama", "num_attention_heads": 4, "num_key_value_heads": 1},
    "llama_tied": {
        "arch": "llama",
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "tie_word_embeddings": True,
    },
    "llama3_rope": {
        "arch": "llama",
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "rope_parameters": {
            "rope_type": "llama3",
            "rope_theta": 10000.0,
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 32,
        },
    },
    "qwen2_bias": {
        "arch": "qwen2",
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "tie_word_embeddings": True,
    },
    "mistral": {
        "arch": "mistral",
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "sliding_window": None,
    },
}


# SamplingParams' float fields (each must reject NaN / infinity, offline and over HTTP)
SAMPLING_FLOAT_FIELDS = [
    "temperature",
    "top_p",
    "min_p",
    "repetition_penalty",
    "frequency_penalty",
    "presence_penalty",
]


# JSON schemas guided decoding is tested with (nested objects, arrays, enums, bounded numbers,
# optional fields); strings are bounded so that a random model's output ends
JSON_SCHEMAS: dict[str, dict] = {
    "nested": {
        "type": "object",
        "properties": {
            "name": {"type": "string", "maxLength": 8},
            "address": {
                "type": "object",
                "properties": {
                    "city": {"type": "string", "maxLength": 6},
                    "zip": {"type": "integer", "minimum": 1000, "maximum": 9999},
                },
                "required": ["city", "zip"],
                "additionalProperties": False,
            },
        },
        "required": ["name", "address"],
        "additionalProperties": False,
    },
    "array_enum": {
        "type": "object",
        "properties": {
            "tags": {
                "type": "array",
                "items": {"enum": ["red", "green", "blue"]},
                "minItems": 1,
                "maxItems": 3,
            },
            "level": {"enum": [1, 2, "high"]},
        },
        "required": ["tags", "level"],
        "additionalProperties": False,
    },
    "bounded_numbers_optional": {
        "type": "object",
        "properties": {
            "count": {"type": "integer", "minimum": -5, "maximum": 20},
            "ok": {"type": "boolean"},
            "note": {"type": "string", "maxLength": 5},
        },
        "required": ["count"],
        "additionalProperties": False,
    },
    "list_of_objects": {
        "type": "array",
        "items": {
            "type": "object",
            "properties": {"id": {"type": "integer", "minimum": 0, "maximum": 99}},
            "required": ["id"],
            "additionalProperties": False,
        },
        "minItems": 1,
        "maxItems": 2,
    },
}
