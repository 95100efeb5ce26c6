"""Progress bars (tqdm, on stderr) for the long offline jobs: quantize_model per layer (int8,
rtn4, and the final conversion of awq / smoothquant) and `lamina convert` per tensor, as AWQ,
calibration and perplexity already show them; `progress=False` silences them."""

from __future__ import annotations

import pytest

from lamina.cli import main


def test_quantize_shows_progress_per_layer(tiny_model_factory, capsys):
    from lamina.loading.loader import load_model
    from lamina.quant.apply import quantize_model

    folder, _ = tiny_model_factory("llama_mha")
    for method in ("int8", "rtn4"):
        model = load_model(folder, "float32").model
        quantize_model(model, method, group_size=32)
        err = capsys.readouterr().err
        assert f"{method} quantize" in err
        assert "2/2" in err  # the tiny model's two layers
        quantize_model(load_model(folder, "float32").model, method, group_size=32, progress=False)
        assert capsys.readouterr().err == ""


def test_convert_shows_progress_per_tensor(tmp_path, capsys):
    pytest.importorskip("transformers")
    from tests.gguf_writer import make_hf_model, write_gguf

    path = tmp_path / "tiny.gguf"
    tensors = write_gguf(make_hf_model(), path)
    assert main(["convert", str(path), str(tmp_path / "out")]) == 0
    err = capsys.readouterr().err
    assert "converting" in err
    assert f"{len(tensors)}/{len(tensors)}" in err
