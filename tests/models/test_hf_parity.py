"""lamina vs transformers on tiny random checkpoints of every supported family switch."""

from __future__ import annotations

import pytest
import torch

from lamina import LLM, SamplingParams
from tests.helpers import TINY_CONFIGS, TINY_VOCAB

PROMPT = [1, 17, 99, 3, 250, 45, 45, 7, 128, 64, 5, 200, 31, 8, 77, 150, 9, 33, 12]


def hf_greedy(model, ids: list[int], n: int) -> list[int]:
    """Independent greedy reference: full forward each step, no cache."""
    out = list(ids)
    with torch.no_grad():
        for _ in range(n):
            logits = model(torch.tensor([out])).logits[0, -1]
            out.append(int(logits.argmax()))
    return out[len(ids) :]


@pytest.mark.parametrize("name", sorted(TINY_CONFIGS))
def test_logits_prompt_logprobs_and_greedy_match_transformers(tiny_model_factory, name):
    folder, hf_model = tiny_model_factory(name)
    llm = LLM(str(folder), dtype="float32", block_size=4)
    with torch.no_grad():
        ref = hf_model(torch.tensor([PROMPT])).logits[0].float()
    ours = llm.engine.prompt_logits(PROMPT)
    assert ours.shape == (len(PROMPT), TINY_VOCAB)
    torch.testing.assert_close(ours[-1], ref[-1], atol=1e-4, rtol=0)
    target = torch.tensor(PROMPT[1:])
    ref_lp = ref[:-1].log_softmax(-1).gather(1, target[:, None])
    our_lp = ours[:-1].log_softmax(-1).gather(1, target[:, None])
    torch.testing.assert_close(our_lp, ref_lp, atol=1e-4, rtol=0)

    expected = hf_greedy(hf_model, PROMPT, 32)
    out = llm.generate(
        {"prompt_token_ids": PROMPT},
        SamplingParams(temperature=0, max_tokens=32, ignore_eos=True),
        use_tqdm=False,
    )[0]
    assert out.outputs[0].token_ids == expected
    assert out.outputs[0].finish_reason == "length"
    llm.engine.block_manager.check_all_free()


def test_llama3_rope_changes_frequencies(tiny_model_factory):
    """Guard against the llama3 case silently running as plain RoPE."""
    from lamina.config import ModelConfig
    from lamina.layers.rotary import rope_inv_freq

    folder, hf_model = tiny_model_factory("llama3_rope")
    import json

    cfg = ModelConfig.from_hf(json.loads((folder / "config.json").read_text()))
    assert cfg.rope.rope_type == "llama3"
    ours, _scale = rope_inv_freq(cfg.rope, cfg.head_dim, cfg.max_position_embeddings)
    ref = hf_model.model.rotary_emb.inv_freq
    torch.testing.assert_close(ours, ref.float(), atol=0, rtol=1e-6)
    plain, _ = rope_inv_freq(type(cfg.rope)(theta=cfg.rope.theta), cfg.head_dim, 256)
    assert not torch.allclose(ours, plain)


def test_sharded_safetensors_with_index(tiny_model_factory, tmp_path):
    """A checkpoint split into several safetensors files with an index loads identically."""
    folder, hf_model = tiny_model_factory("llama_gqa")
    sharded = tmp_path / "sharded"
    hf_model.save_pretrained(sharded, max_shard_size="100KB")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (sharded / name).write_bytes((folder / name).read_bytes())
    shards = sorted(p.name for p in sharded.glob("*.safetensors"))
    assert len(shards) > 1
    assert (sharded / "model.safetensors.index.json").is_file()
    one = LLM(str(folder), dtype="float32").engine.prompt_logits(PROMPT)
    many = LLM(str(sharded), dtype="float32").engine.prompt_logits(PROMPT)
    torch.testing.assert_close(many, one, atol=0, rtol=0)
