"""LongLlavaConfig presets, derived sizes and parameter counts (meta device, no weights allocated)."""

from __future__ import annotations

import pytest
from transformers import AutoConfig, CLIPVisionConfig, JambaConfig

from longllava.config import LongLlavaConfig, count_parameters, preset_names
from longllava.errors import ModelInputError


def test_presets_have_the_documented_shapes():
    assert preset_names() == ("tiny", "demo", "9b", "a13b")
    real = LongLlavaConfig.from_preset("9b")
    assert isinstance(real.vision_config, CLIPVisionConfig) and isinstance(real.text_config, JambaConfig)
    assert real.patch_grid == 24 and real.pooled_grid == 12 and real.tokens_per_image == 144
    assert real.vision_feature_layer == -2 and real.image_token_id == 6
    assert real.text_config.layers_block_type.count("attention") == 4
    assert set(real.text_config.layers_num_experts) == {1}
    a13b = LongLlavaConfig.from_preset("a13b")
    assert a13b.text_config.layers_num_experts.count(16) == 16 and a13b.text_config.num_experts_per_tok == 2


def test_tiny_preset_covers_attention_mamba_and_moe_layers():
    text = LongLlavaConfig.from_preset("tiny").text_config
    assert {"attention", "mamba"} <= set(text.layers_block_type)
    assert max(text.layers_num_experts) > 1 and min(text.layers_num_experts) == 1


def test_demo_preset_has_one_attention_layer_and_fits_50_mb_in_bf16():
    config = LongLlavaConfig.from_preset("demo")
    assert config.text_config.layers_block_type.count("attention") == 1
    assert count_parameters(config)["total"] * 2 <= 50e6


@pytest.mark.parametrize(
    ("name", "total_b", "active_b"),
    [("9b", 9.62, 9.62), ("a13b", 51.89, 12.43)],
)
def test_parameter_counts_of_real_presets(name, total_b, active_b):
    counts = count_parameters(LongLlavaConfig.from_preset(name))
    assert counts["total"] / 1e9 == pytest.approx(total_b, abs=0.01)
    assert counts["active"] / 1e9 == pytest.approx(active_b, abs=0.01)
    assert counts["vision"] == 303_507_456  # CLIP ViT-L/14-336 vision tower
    assert counts["total"] == counts["vision"] + counts["projector"] + counts["language"]


def test_config_round_trip_and_auto_config(tmp_path):
    config = LongLlavaConfig.from_preset("tiny")
    config.save_pretrained(tmp_path)
    loaded = AutoConfig.from_pretrained(tmp_path)
    assert isinstance(loaded, LongLlavaConfig)
    without_path = [{k: v for k, v in c.to_dict().items() if k != "_name_or_path"} for c in (loaded, config)]
    assert without_path[0] == without_path[1]
    assert loaded.tokens_per_image == 16 and loaded.image_seq_length == 16


def test_unknown_preset_is_a_user_error():
    with pytest.raises(ModelInputError, match="unknown preset 'huge'"):
        LongLlavaConfig.from_preset("huge")


def test_from_file_reads_a_folder_or_file_and_rejects_garbage(tmp_path):
    config = LongLlavaConfig.from_preset("demo")
    config.save_pretrained(tmp_path)
    for source in (tmp_path, tmp_path / "config.json"):
        loaded = LongLlavaConfig.from_file(source)
        assert loaded.tokens_per_image == 25 and loaded.text_config.hidden_size == 256
    (tmp_path / "bad.json").write_bytes(b"\x89PNG")
    with pytest.raises(ModelInputError, match="bad.json is not a valid LongLLaVA config"):
        LongLlavaConfig.from_file(tmp_path / "bad.json")
    with pytest.raises(ModelInputError, match="does not exist"):
        LongLlavaConfig.from_file(tmp_path / "missing.json")
