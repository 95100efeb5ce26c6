"""Medusa heads on the tiny model: self-distillation training lowers the loss and raises the
heads' accuracy, heads save and load (and refuse another model's), speculating with them keeps
greedy output identical while keeping guesses, and `lamina train-heads` runs end to end."""

from __future__ import annotations

import json

import pytest
import torch

from lamina import LLM, SamplingParams
from lamina.cli import main
from lamina.spec.medusa import MedusaHeads
from lamina.spec.train_heads import distill, hidden_states, targets, train

PROMPTS = ["the cat sat on", "hello world", "abc abc abc", "one two three", "zzz", "to be or"]


@pytest.fixture(scope="module")
def folder(tiny_model_factory):
    return tiny_model_factory("llama_gqa")[0]


@pytest.fixture(scope="module")
def trained(folder, tmp_path_factory):
    """Heads trained on the tiny model's own continuations; (folder, epoch losses, accuracy)."""
    llm = LLM(str(folder), dtype="float32", pack_weights=False)
    engine = llm.engine
    examples = distill(engine, list(PROMPTS), 48)
    feats, labels = targets(examples, [hidden_states(engine, e.ids) for e in examples], 3)
    heads = MedusaHeads(engine.loaded.config.hidden_size, 3)
    accs: list[list[float]] = []
    losses = train(
        heads,
        engine.loaded.model.lm_head_weight,
        feats,
        labels,
        epochs=30,
        lr=3e-3,
        batch_size=64,
        autocast=False,
        on_step=lambda step, total, loss, acc, tps: accs.append(acc),
    )
    out = heads.save(tmp_path_factory.mktemp("heads"), vocab_size=engine.loaded.config.vocab_size)
    return out, losses, accs


def test_training_lowers_the_loss_and_raises_accuracy(trained):
    _, losses, accs = trained
    assert losses[-1] < 0.75 * losses[0]
    assert sum(accs[-1]) > sum(accs[0])


def test_targets_are_the_tokens_two_and_more_ahead():
    from lamina.spec.train_heads import Example

    ex = Example(ids=[10, 11, 12, 13, 14, 15], start=3)
    hidden = torch.arange(6.0).unsqueeze(1)
    feats, labels = targets([ex], [hidden], 2)
    # positions 2..4 predict generated tokens; head 0 the token 2 ahead, head 1 the token 3 ahead
    assert feats.squeeze(1).tolist() == [2.0, 3.0, 4.0]
    assert labels.tolist() == [[14, 15], [15, -100], [-100, -100]]


def test_heads_load_and_refuse_another_model(trained, tmp_path):
    out, _, _ = trained
    config = json.loads((out / "medusa_config.json").read_text())
    heads = MedusaHeads.load(out, config["hidden_size"], config["vocab_size"])
    assert heads.num_heads == 3
    with pytest.raises(ValueError, match="trained for hidden_size=64, but this model has 576"):
        MedusaHeads.load(out, 576, config["vocab_size"])
    with pytest.raises(ValueError, match="no Medusa heads"):
        MedusaHeads.load(tmp_path, 64, 256)


def test_speculating_with_the_heads_is_lossless_and_trained_heads_guess_better(
    folder, trained, tmp_path
):
    out, _, _ = trained
    untrained = MedusaHeads(64, 3).save(tmp_path / "untrained", vocab_size=256)
    plain = LLM(str(folder), dtype="float32")
    params = SamplingParams(temperature=0, max_tokens=48)
    want = [o.outputs[0].token_ids for o in plain.generate(PROMPTS, params, use_tqdm=False)]
    rates = []
    for heads in (untrained, out):
        spec = {
            "method": "medusa",
            "model": str(heads),
            "num_speculative_tokens": 3,
            "disable_by_batch_size": None,
        }
        medusa = LLM(str(folder), dtype="float32", speculative_config=spec)
        got = [o.outputs[0].token_ids for o in medusa.generate(PROMPTS, params, use_tqdm=False)]
        assert got == want
        assert medusa.engine.stats.spec.num_drafts > 0
        rates.append(medusa.engine.stats.spec.acceptance_rate)
        medusa.engine.block_manager.check_all_free()
    assert rates[1] > rates[0] + 0.03  # trained on these very continuations


def test_medusa_config_needs_a_model_folder(folder):
    with pytest.raises(ValueError, match='"medusa" needs "model"'):
        LLM(str(folder), speculative_config={"method": "medusa"})


def test_cli_trains_and_writes_heads(folder, tmp_path, capsys):
    data = tmp_path / "prompts.jsonl"
    data.write_text(
        "\n".join(
            json.dumps(r)
            for r in [
                {"prompt": "abc"},
                {"text": "hello"},
                {"messages": [{"role": "user", "content": "hi"}]},
            ]
        )
    )
    out = tmp_path / "heads"
    args = [
        "train-heads",
        "--model",
        str(folder),
        "--data",
        str(data),
        "--out",
        str(out),
        "--num-heads",
        "2",
        "--epochs",
        "2",
        "--max-tokens",
        "12",
        "--dtype",
        "float32",
    ]
    assert main(args) == 0
    assert (out / "medusa_heads.safetensors").is_file()
    assert json.loads((out / "medusa_config.json").read_text())["num_heads"] == 2
    assert "loss by epoch" in capsys.readouterr().out
    assert main([*args, "--resume"]) == 0  # the checkpoint is already at the last step
    assert main([*args[:-2], "--num-heads", "0", "--force"]) == 2  # before loading anything
