"""Upstream (original LongLLaVA, llava_jamba) checkpoints: a tiny one is written in that layout here,
converted, loaded with every tensor accounted for, and must give identical logits."""

from __future__ import annotations

import json
import re

import pytest
import torch
from safetensors.torch import save_file

from longllava import protocol
from longllava.cli import main
from longllava.config import LongLlavaConfig
from longllava.errors import ModelInputError
from longllava.loading import build_model, load_model
from longllava.modeling import LongLlavaForConditionalGeneration
from longllava.upstream import convert_upstream

POSITION_IDS = "model.vision_tower.vision_tower.vision_model.embeddings.position_ids"


def to_upstream_layout(state: dict[str, torch.Tensor], style: str = "ai21") -> dict[str, torch.Tensor]:
    """Our state dict -> the original project's keys, per-expert MoE modules, an old position_ids buffer.

    ``ai21``: the Jamba-v0.1 remote code LongLLaVA ships: every feed-forward is ``moe.experts.{e}.*``
    (a dense layer is ``moe.experts.0.*`` without router), ``pre_moe_layernorm``, ``B_layernorm``.
    ``hf``: transformers 4 names; a dense layer is a plain ``feed_forward.{gate,up,down}_proj``.
    ``hf_dense_expert0``: transformers 4 names with dense layers as ``experts.0.*`` plus a saved
    one-expert router.
    """
    out: dict[str, torch.Tensor] = {}
    ffn = "moe" if style == "ai21" else "feed_forward"
    for key, tensor in state.items():
        if key.startswith("model.language_model."):
            name = "model." + key[len("model.language_model.") :]
            if style == "ai21":
                name = name.replace(".pre_ff_layernorm.", ".pre_moe_layernorm.")
                name = name.replace(".mamba.b_layernorm.", ".mamba.B_layernorm.")
                name = name.replace(".mamba.c_layernorm.", ".mamba.C_layernorm.")
            name = name.replace(".feed_forward.", f".{ffn}.")
            fused = re.match(rf"^(model\.layers\.\d+\.{ffn})\.experts\.(gate_up_proj|down_proj)$", name)
            if fused:
                prefix, kind = fused.group(1), fused.group(2)
                for e in range(tensor.shape[0]):
                    if kind == "gate_up_proj":
                        gate, up = tensor[e].chunk(2, dim=0)
                        out[f"{prefix}.experts.{e}.gate_proj.weight"] = gate.clone()
                        out[f"{prefix}.experts.{e}.up_proj.weight"] = up.clone()
                    else:
                        out[f"{prefix}.experts.{e}.down_proj.weight"] = tensor[e].clone()
                continue
            dense = re.match(rf"^(model\.layers\.\d+\.{ffn})\.(gate_proj|up_proj|down_proj)\.weight$", name)
            if dense and style in ("ai21", "hf_dense_expert0"):
                prefix, proj = dense.group(1), dense.group(2)
                out[f"{prefix}.experts.0.{proj}.weight"] = tensor.clone()
                if style == "hf_dense_expert0" and proj == "gate_proj":
                    out[f"{prefix}.router.weight"] = torch.randn(1, tensor.shape[1])
                continue
            out[name] = tensor.clone()
        elif key.startswith("model.vision_tower."):
            out["model.vision_tower.vision_tower.vision_model." + key[len("model.vision_tower.") :]] = tensor.clone()
        elif key.startswith("model.multi_modal_projector.linear_"):
            index = {"1": "0", "2": "2"}[key.split("linear_")[1][0]]
            out[f"model.mm_projector.{index}." + key.rsplit(".", 1)[1]] = tensor.clone()
        else:
            out[key] = tensor.clone()
    out[POSITION_IDS] = torch.arange(state["model.vision_tower.embeddings.position_embedding.weight"].shape[0])[None]
    return out


def write_upstream_checkpoint(model, tokenizer, folder, style="ai21"):
    config: LongLlavaConfig = model.config
    clip_dir = folder / "clip-vision"
    config.vision_config.save_pretrained(clip_dir)
    text = {k: v for k, v in config.text_config.to_dict().items() if k not in ("model_type", "architectures")}
    text["n_ctx"] = text.pop("max_position_embeddings")  # AI21's name
    upstream_config = {
        **text,
        "mamba_inner_layernorms": True,
        "model_type": "llava_jamba",
        "architectures": ["LlavaJambaForCausalLM"],
        "mm_vision_tower": str(clip_dir),
        "mm_hidden_size": config.vision_config.hidden_size,
        "mm_projector_type": "mlp2x_gelu",
        "mm_vision_select_layer": -2,
        "mm_vision_select_feature": "patch",
        "resamplePooling": "2d",
        "image_aspect_ratio": "pad",
    }
    (folder / "config.json").write_text(json.dumps(upstream_config))
    weights = to_upstream_layout(model.state_dict(), style)
    keys = sorted(weights)
    half = len(keys) // 2  # two shards, as large checkpoints are
    save_file({k: weights[k].contiguous() for k in keys[:half]}, folder / "model-00001-of-00002.safetensors")
    save_file({k: weights[k].contiguous() for k in keys[half:]}, folder / "model-00002-of-00002.safetensors")
    tokenizer.save_pretrained(folder)
    return weights


@pytest.mark.parametrize("layout", ["ai21", "hf", "hf_dense_expert0"])
def test_convert_upstream_checkpoint_gives_identical_logits(tokenizer, tmp_path, images_factory, layout):
    config = LongLlavaConfig.from_preset("tiny")
    if layout == "hf_dense_expert0":
        config.text_config.num_experts = 1
        config.text_config.num_experts_per_tok = 1
    model, processor = build_model(config, tokenizer, seed=3)
    src = tmp_path / "upstream"
    src.mkdir()
    upstream_weights = write_upstream_checkpoint(model, tokenizer, src, style=layout)

    report = convert_upstream(src, tmp_path / "converted", max_shard_bytes=200_000)
    converted, converted_processor = load_model(tmp_path / "converted")  # raises on missing/unexpected weights

    state = model.state_dict()
    assert report.n_written_tensors == len(state) == len(converted.state_dict())
    routers = {k for k in upstream_weights if k.endswith("router.weight")} if layout == "hf_dense_expert0" else set()
    assert set(report.dropped) == {POSITION_IDS} | routers
    # every source tensor is dropped, copied one-to-one, or one of 3 x E per-expert tensors fused into 2
    fused = report.fused_expert_layers
    assert report.n_source_tensors == len(upstream_weights)
    assert report.n_source_tensors == len(report.dropped) + (len(state) - 2 * fused) + 3 * config.text_config.num_experts * fused
    if layout != "hf_dense_expert0":
        assert report.fused_expert_layers == 2
    if layout == "ai21":
        assert any(".moe.experts.0." in k for k in upstream_weights) and any("B_layernorm" in k for k in upstream_weights)
    assert (tmp_path / "converted" / "model.safetensors.index.json").is_file()

    images = images_factory(3)
    prompt = [{"role": "user", "content": protocol.images_prompt(3) + "What is shown?"}]
    inputs = processor.apply_chat_template(prompt, tokenize=True, images=images)
    converted_inputs = converted_processor.apply_chat_template(prompt, tokenize=True, images=images)
    assert torch.equal(inputs["input_ids"], converted_inputs["input_ids"])
    with torch.no_grad():
        expected = model(**inputs).logits
        got = converted(**converted_inputs).logits
    torch.testing.assert_close(got, expected, rtol=0, atol=0)


def test_convert_upstream_cli_and_errors(tokenizer, tmp_path, capsys):
    model, _ = build_model("tiny", tokenizer, seed=1)
    src = tmp_path / "upstream"
    src.mkdir()
    write_upstream_checkpoint(model, tokenizer, src)
    assert main(["convert-upstream", str(src), str(tmp_path / "out"), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["written_tensors"] == len(model.state_dict())
    # the converted folder is not upstream any more; converting into a non-empty folder is refused
    assert main(["convert-upstream", str(src), str(tmp_path / "out")]) == 2
    assert "not empty" in capsys.readouterr().err
    # a Jamba variant transformers cannot express is refused
    config = json.loads((src / "config.json").read_text())
    (src / "config.json").write_text(json.dumps({**config, "mamba_inner_layernorms": False}))
    with pytest.raises(ModelInputError, match="mamba_inner_layernorms is false"):
        convert_upstream(src, tmp_path / "out3")
    (src / "config.json").write_text(json.dumps(config))
    # an unknown tensor in the source is reported, not silently dropped
    save_file({"model.extra.weight": torch.zeros(2)}, src / "extra.safetensors")
    with pytest.raises(ModelInputError, match="unexpected weight 'model.extra.weight'"):
        convert_upstream(src, tmp_path / "out2")


def test_loading_an_upstream_folder_directly_says_convert(tokenizer, tmp_path):
    model, _ = build_model("tiny", tokenizer, seed=1)
    write_upstream_checkpoint(model, tokenizer, tmp_path)
    with pytest.raises(ModelInputError, match="convert-upstream"):
        load_model(tmp_path)


def test_upstream_tokenizer_without_image_token_gets_one_and_a_larger_vocab(tmp_path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    # A tokenizer like Jamba's: bos/eos/pad but no <image>; vocabulary exactly as large as the model's.
    base = Tokenizer(models.BPE())
    base.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    base.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=320, special_tokens=["<|pad|>", "<|startoftext|>", "<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    base.train_from_iterator(["a ship in the harbor", "no pleural effusion"] * 20, trainer=trainer)
    upstream_tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=base, bos_token="<|startoftext|>", eos_token="<|endoftext|>", pad_token="<|pad|>"
    )
    config = LongLlavaConfig.from_preset("tiny")
    config.text_config.vocab_size = len(upstream_tokenizer)  # full: <image> needs a new embedding row
    torch.manual_seed(2)
    model = LongLlavaForConditionalGeneration(config).eval()
    src = tmp_path / "upstream"
    src.mkdir()
    write_upstream_checkpoint(model, upstream_tokenizer, src)

    report = convert_upstream(src, tmp_path / "converted")
    converted, processor = load_model(tmp_path / "converted")
    assert report.added_image_token
    image_id = processor.image_token_id
    assert image_id == len(upstream_tokenizer) == converted.config.image_token_id
    assert converted.config.text_config.vocab_size % 64 == 0 and converted.config.text_config.vocab_size > image_id
    text_ids = upstream_tokenizer("a ship in the harbor", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        before = model(input_ids=text_ids).logits
        after = converted(input_ids=text_ids).logits
    torch.testing.assert_close(after[..., : before.shape[-1]], before)  # same weights; lm_head has more rows
    inputs = processor(text="<img><image></img> a ship", images=torch.zeros(1, 3, 56, 56))
    assert int((inputs["input_ids"] == image_id).sum()) == 16
    with torch.no_grad():
        assert torch.isfinite(converted(**inputs).logits).all()


def test_vision_tower_weights_from_a_local_clip_folder(tokenizer, tmp_path, images_factory):
    """Upstream checkpoints often leave CLIP out (it is loaded from mm_vision_tower): take it from there."""
    model, processor = build_model("tiny", tokenizer, seed=4)
    src = tmp_path / "upstream"
    src.mkdir()
    weights = write_upstream_checkpoint(model, tokenizer, src)
    for shard in src.glob("*.safetensors"):
        shard.unlink()
    without_clip = {k: v.contiguous() for k, v in weights.items() if not k.startswith("model.vision_tower.")}
    save_file(without_clip, src / "model.safetensors")
    # a CLIPModel-style checkpoint in the folder named by mm_vision_tower: vision_model.* plus unused parts
    clip_dir = src / "clip-vision"
    clip_weights = {
        "vision_model." + k[len("model.vision_tower.") :]: v.contiguous()
        for k, v in model.state_dict().items()
        if k.startswith("model.vision_tower.")
    }
    clip_weights.update({
        "text_model.embeddings.token_embedding.weight": torch.zeros(10, 4),
        "visual_projection.weight": torch.zeros(4, 32),
        "logit_scale": torch.tensor(2.6),
    })
    save_file(clip_weights, clip_dir / "model.safetensors")

    report = convert_upstream(src, tmp_path / "converted")
    converted, _ = load_model(tmp_path / "converted")
    assert {reason for reason in report.dropped.values()} >= {"CLIP text tower / projections (unused by LongLLaVA)"}
    inputs = processor(text=protocol.images_prompt(2) + "Q", images=images_factory(2))
    with torch.no_grad():
        torch.testing.assert_close(converted(**inputs).logits, model(**inputs).logits, rtol=0, atol=0)

    (clip_dir / "config.json").unlink()  # mm_vision_tower no longer a local CLIP folder
    with pytest.raises(ModelInputError, match="no vision tower weights"):
        convert_upstream(src, tmp_path / "again")
