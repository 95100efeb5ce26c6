"""Write tiny transformers models as GGUF files, the way llama.cpp's `convert_hf_to_gguf.py` does.

Test utility (not a fixture module). `write_gguf(model, path, qtype)` stores:
- `{arch}.*` hyper-parameters and a byte-level "gpt2" tokenizer (tokens, types, merges, bos/eos),
- tensors under llama.cpp names (`token_embd`, `blk.N.attn_q`, ...; no `output` when tied),
- q/k rows permuted for the llama architecture exactly as llama.cpp's `LlamaModel.permute`
  (qwen2 is not permuted), every 2-D weight in `qtype`, norms and biases in F32.

Types `gguf.quants.quantize` implements (F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, TQ1_0, ...)
are quantized from the model's weights. K-quants (Q4_K, Q5_K, Q6_K) have no Python quantizer:
their blocks are random bytes whose float16 scale fields are overwritten with small finite values,
so the stored weights no longer equal the model's. Other types without a quantizer (IQ*) get raw
random bytes and are only good for testing that a loader rejects them.

`write_gguf` returns the float32 tensors a correct loader must produce, in Hugging Face names and
layout (dequantized with `gguf.quants.dequantize`, permutation undone): the independent reference.
"""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np
import torch
from gguf import GGMLQuantizationType as QT

# Tiny dims that fit every block size: rows of 256 or 512 values (K-quants need multiples of 256).
TINY_DIMS = {
    "hidden_size": 256,
    "intermediate_size": 512,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 64,
    "max_position_embeddings": 256,
    "rms_norm_eps": 1e-6,
    "rope_theta": 10000.0,
}
BOS_ID, EOS_ID, UNK_ID = 1, 2, 0
K_QUANTS = (QT.Q4_K, QT.Q5_K, QT.Q6_K)

_SPECIALS = ["<unk>", "<s>", "</s>"]
_MERGES = ["Ġ t", "h e", "Ġt he", "i n", "e r", "o n"]
# llama.cpp token types (gguf.TokenType)
_NORMAL, _UNKNOWN, _CONTROL = 1, 2, 3


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table."""
    bs = list(range(ord("!"), ord("~") + 1))
    bs += list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {b: chr(c) for b, c in zip(bs, cs)}


def byte_vocab() -> tuple[list[str], list[int], list[str]]:
    """(tokens, token types, merges) of a byte-level BPE: 3 specials, 256 bytes, a few merges."""
    tokens = list(_SPECIALS)
    tokens += [_bytes_to_unicode()[b] for b in range(256)]
    tokens += ["".join(m.split(" ")) for m in _MERGES]
    types = [_UNKNOWN, _CONTROL, _CONTROL] + [_NORMAL] * (len(tokens) - 3)
    return tokens, types, list(_MERGES)


VOCAB_SIZE = len(byte_vocab()[0])


def make_hf_model(
    arch: str = "llama",
    *,
    tie_word_embeddings: bool = False,
    seed: int = 0,
    std: float = 0.08,
    **overrides,
) -> torch.nn.Module:
    """A random float32 transformers model (eval mode) with TINY_DIMS and the byte vocabulary.

    Norm weights are drawn from U(0.5, 1.5) and biases from N(0, 0.2) so every parameter matters.
    """
    import transformers

    cls_config, cls_model = {
        "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
        "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
    }[arch]
    kwargs = dict(
        TINY_DIMS,
        vocab_size=VOCAB_SIZE,
        bos_token_id=BOS_ID,
        eos_token_id=EOS_ID,
        tie_word_embeddings=tie_word_embeddings,
        initializer_range=std,
    )
    kwargs.update(overrides)
    if arch == "qwen2":
        kwargs.pop("head_dim")  # qwen2 derives it from hidden / heads
    torch.manual_seed(seed)
    model = cls_model(cls_config(**kwargs)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
            elif name.endswith("bias"):
                p.normal_(0, 0.2)
    return model


def permute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's `LlamaModel.permute`: halves per head -> interleaved rotary pairs (rows)."""
    rows = w.shape[0]
    return w.reshape(n_head, 2, rows // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def unpermute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
    """The inverse of `permute_qk` (what transformers' GGUF loader does)."""
    rows = w.shape[0]
    return w.reshape(n_head, rows // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _random_k_blocks(rows: int, cols: int, qtype: QT, rng: np.random.Generator) -> np.ndarray:
    """Random K-quant blocks [rows, bytes per row] with valid float16 scales (weights std ~0.1).

    Layouts (gguf/quants.py): Q4_K = d, dmin, scales[12], qs[128]; Q5_K = d, dmin, scales[12],
    qh[32], qs[128]; Q6_K = ql[128], qh[64], scales[16] (int8), d (at the end).
    """
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    assert cols % block == 0, f"{qtype.name} needs rows of a multiple of {block} values"
    n = cols // block
    raw = rng.integers(0, 256, size=(rows, n, size), dtype=np.uint8)

    def f16(base: float) -> np.ndarray:
        vals = (base * rng.uniform(0.5, 1.5, size=(rows, n))).astype(np.float16)
        return vals[..., None].view(np.uint8)  # [rows, n, 2]

    # base scale ~ 0.1 / std(scale * quant); dmin re-centres the unsigned quants near zero
    if qtype == QT.Q4_K:
        d = 0.1 / 218
        raw[..., 0:2], raw[..., 2:4] = f16(d), f16(d * 7.5)
    elif qtype == QT.Q5_K:
        d = 0.1 / 443
        raw[..., 0:2], raw[..., 2:4] = f16(d), f16(d * 15.5)
    elif qtype == QT.Q6_K:
        raw[..., size - 2 : size] = f16(0.1 / 1367)
    else:
        raise ValueError(f"not a K-quant: {qtype.name}")
    return raw.reshape(rows, n * size)


def encode(w: np.ndarray, qtype: QT, rng: np.random.Generator) -> tuple[np.ndarray, bool]:
    """Store a 2-D float32 weight in `qtype`: quantized, random K-quant blocks, or raw bytes.

    Returns (data, meaningful): meaningful is False for raw random bytes of a type with no
    quantizer (IQ*), whose dequantization may hold NaN; such data is only for rejection tests.
    """
    if qtype in K_QUANTS:
        return _random_k_blocks(w.shape[0], w.shape[1], qtype, rng), True
    try:
        return gguf.quants.quantize(w.astype(np.float32), qtype), True
    except NotImplementedError:
        block, size = gguf.GGML_QUANT_SIZES[qtype]
        shape = (w.shape[0], w.shape[1] // block * size)
        return rng.integers(0, 256, size=shape, dtype=np.uint8), False


def _gguf_names(n_layers: int) -> dict[str, str]:
    """Hugging Face name -> llama.cpp name."""
    names = {
        "model.embed_tokens.weight": "token_embd.weight",
        "model.norm.weight": "output_norm.weight",
        "lm_head.weight": "output.weight",
    }
    parts = {
        "input_layernorm": "attn_norm",
        "post_attention_layernorm": "ffn_norm",
        "self_attn.q_proj": "attn_q",
        "self_attn.k_proj": "attn_k",
        "self_attn.v_proj": "attn_v",
        "self_attn.o_proj": "attn_output",
        "mlp.gate_proj": "ffn_gate",
        "mlp.up_proj": "ffn_up",
        "mlp.down_proj": "ffn_down",
    }
    for i in range(n_layers):
        for hf, gg in parts.items():
            for kind in ("weight", "bias"):
                names[f"model.layers.{i}.{hf}.{kind}"] = f"blk.{i}.{gg}.{kind}"
    return names


def write_gguf(
    model: torch.nn.Module,
    path: str | Path,
    qtype: QT = QT.F32,
    *,
    architecture: str | None = None,
    type_overrides: dict[str, QT] | None = None,
    seed: int = 0,
) -> dict[str, np.ndarray]:
    """Convert a transformers llama/qwen2 model to a GGUF file at `path`.

    qtype: the type of every 2-D weight (token_embd and output included); 1-D tensors stay F32.
    architecture: written as `general.architecture` (default: the model's type); any other name
        gives a file loaders should refuse.
    type_overrides: llama.cpp tensor name -> type, for single tensors.
    Returns HF name -> float32 array a correct loader must produce (the stored data dequantized,
    q/k permutation undone); tensors stored as raw random bytes (IQ types) are left out.
    """
    cfg = model.config
    model_arch = cfg.model_type
    arch = architecture or model_arch
    permute = model_arch == "llama"
    heads, kv_heads = cfg.num_attention_heads, cfg.num_key_value_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    rng = np.random.default_rng(seed)
    overrides = type_overrides or {}

    w = gguf.GGUFWriter(str(path), arch)
    w.add_name(f"tiny-{model_arch}")
    w.add_vocab_size(cfg.vocab_size)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(heads)
    w.add_head_count_kv(kv_heads)
    w.add_rope_dimension_count(head_dim)
    w.add_rope_freq_base(float(cfg.rope_parameters["rope_theta"]))
    w.add_layer_norm_rms_eps(float(cfg.rms_norm_eps))
    ftype = {QT.F32: "ALL_F32", QT.Q4_K: "MOSTLY_Q4_K_M", QT.Q5_K: "MOSTLY_Q5_K_M"}.get(
        qtype, f"MOSTLY_{qtype.name}"
    )
    w.add_file_type(gguf.LlamaFileType.__members__.get(ftype, gguf.LlamaFileType.GUESSED))
    tokens, types, merges = byte_vocab()
    assert len(tokens) == cfg.vocab_size, "the model's vocabulary must be byte_vocab()"
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    w.add_bos_token_id(BOS_ID)
    w.add_eos_token_id(EOS_ID)
    w.add_unk_token_id(UNK_ID)
    w.add_add_bos_token(False)

    names = _gguf_names(cfg.num_hidden_layers)
    expected: dict[str, np.ndarray] = {}
    for hf_name, param in model.state_dict().items():
        if hf_name == "lm_head.weight" and cfg.tie_word_embeddings:
            continue  # llama.cpp writes no `output` for tied embeddings
        gg_name = names.get(hf_name)
        if gg_name is None:
            continue
        data = param.detach().float().numpy()
        ttype = overrides.get(gg_name, qtype) if data.ndim == 2 else QT.F32
        if data.ndim == 2:
            stored, meaningful = encode(data, ttype, rng)
        else:
            stored, meaningful = data.astype(np.float32), True
        if meaningful:
            deq = gguf.quants.dequantize(stored, ttype).reshape(data.shape).astype(np.float32)
            expected[hf_name] = deq
        n_perm = {"q_proj": heads, "k_proj": kv_heads}.get(hf_name.split(".")[-2])
        if permute and n_perm is not None:
            # rows are whole blocks, so permuting stored rows == quantizing the permuted weight
            stored = permute_qk(stored, n_perm)
        w.add_tensor(gg_name, stored, raw_dtype=ttype)

    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return expected
