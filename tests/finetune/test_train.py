"""Training on CPU with the tiny preset: LoRA and full runs, adapters, merge, resume, stages, recipes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import TrainerCallback

from finetune import FinetuneError
from finetune.merge import load_adapter_model, merge_lora
from finetune.train import (
    RECIPE_DIR,
    Recipe,
    attach_tower_feature_cache,
    keep_only_trainable,
    last_checkpoint,
    load_recipe,
    read_loss_csv,
    run_training,
    set_stage_trainable,
)
from longllava.loading import load_model
from longllava.modeling import _place_vectors


class _Capture(TrainerCallback):
    """Keeps the model object the Trainer trained."""

    model = None

    def on_train_end(self, args, state, control, model=None, **kwargs):
        self.model = model


class _Interrupt(TrainerCallback):
    """Simulates a crash after ``at_step`` optimizer steps."""

    def __init__(self, at_step: int) -> None:
        self.at_step = at_step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.at_step:
            raise KeyboardInterrupt("simulated interruption")


def _probe_inputs(processor) -> dict:
    import numpy as np
    from PIL import Image

    from longllava.protocol import image_block, render_prompt

    pixels = np.random.default_rng(123).integers(0, 256, (56, 56, 3), dtype=np.uint8)
    text = render_prompt([{"role": "user", "content": image_block() + "\nWhat colour?"}])
    return dict(processor(text=text, images=[Image.fromarray(pixels)], return_tensors="pt"))


def _logits(model, inputs) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(**inputs).logits


def _epoch_means(rows: list[dict]) -> tuple[float, float]:
    losses = [r["loss"] for r in rows]
    half = len(losses) // 2
    return sum(losses[:half]) / half, sum(losses[half:]) / (len(losses) - half)


@pytest.fixture(scope="module")
def full_run(tmp_path_factory, colour_set, make_recipe):
    out = tmp_path_factory.mktemp("full") / "run"
    recipe = make_recipe(colour_set, out, mode="full")
    return recipe, run_training(recipe)


def test_full_run_loss_goes_down_and_model_loads(full_run):
    recipe, summary = full_run
    rows = read_loss_csv(f"{recipe.output_dir}/loss.csv")
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    first_epoch, second_epoch = _epoch_means(rows)
    assert second_epoch < first_epoch - 0.05, rows
    assert summary["global_step"] == 4 and summary["saved_to"].endswith("model")
    assert summary["train_samples"] == 12 and summary["train_examples_after_packing"] < 12  # packed
    cache = summary["tower_feature_cache"]  # the frozen tower encoded each image once over two epochs
    assert cache["misses"] == cache["stored_images"] > 0 and cache["hits"] >= cache["misses"], cache
    model, _ = load_model(summary["saved_to"])
    model.requires_grad_(False)  # a next stage on the same (frozen) tower reads the features back
    reloaded = attach_tower_feature_cache(model, Path(recipe.output_dir) / "image_cache")
    assert reloaded.path.is_file() and reloaded.loaded == cache["stored_images"]
    assert getattr(model.config, "use_cache", True) and model.config.text_config.use_cache  # off in training only
    base, _ = load_model(summary["base_model"])
    trained = dict(model.named_parameters())
    changed = [n for n, p in base.named_parameters() if not torch.equal(p, trained[n])]
    assert any("language_model" in n for n in changed) and any("multi_modal_projector" in n for n in changed)
    assert not any("vision_tower" in n for n in changed)  # frozen in every stage by default
    with open(f"{recipe.output_dir}/loss.png", "rb") as handle:
        assert handle.read(8) == b"\x89PNG\r\n\x1a\n"


def test_lora_run_adapters_save_load_merge_identically(tmp_path, colour_set, make_recipe):
    capture = _Capture()
    recipe = make_recipe(colour_set, tmp_path / "lora", mode="lora", gradient_checkpointing=True)
    summary = run_training(recipe, callbacks=[capture])
    rows = read_loss_csv(tmp_path / "lora" / "loss.csv")
    first_epoch, second_epoch = _epoch_means(rows)
    assert second_epoch < first_epoch - 0.02, rows
    adapter = tmp_path / "lora" / "adapter"
    assert (adapter / "adapter_model.safetensors").is_file()
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str((tmp_path / "lora" / "base").resolve())
    assert "experts.gate_up_proj" in " ".join(config["target_parameters"])  # fused MoE experts adapted

    loaded, processor = load_adapter_model(adapter)
    inputs = _probe_inputs(processor)
    in_memory = _logits(capture.model, inputs)
    from_disk = _logits(loaded, inputs)
    torch.testing.assert_close(from_disk, in_memory, rtol=0, atol=1e-6)
    merged_dir = merge_lora(adapter, tmp_path / "merged")
    merged, _ = load_model(merged_dir)
    assert not any("lora" in n for n, _ in merged.named_parameters())
    torch.testing.assert_close(_logits(merged, inputs), from_disk, rtol=1e-5, atol=1e-5)
    base, _ = load_model(summary["base_model"])
    assert (_logits(base, inputs) - from_disk).abs().max() > 1e-3  # the adapters changed the model


def test_resume_continues_from_saved_step(tmp_path, colour_set, make_recipe, full_run):
    reference_recipe, _ = full_run
    recipe = make_recipe(colour_set, tmp_path / "run", mode="full")
    with pytest.raises(FinetuneError, match="no checkpoint"):
        run_training(recipe, resume=True)
    with pytest.raises(KeyboardInterrupt):
        run_training(recipe, callbacks=[_Interrupt(at_step=3)])
    assert last_checkpoint(tmp_path / "run").name == "checkpoint-2"
    with pytest.raises(FinetuneError, match="pass --resume"):
        run_training(recipe)
    summary = run_training(recipe, resume=True)
    assert summary["resumed_from"].endswith("checkpoint-2") and summary["global_step"] == 4
    assert summary["train_loss_since_step"] == 2  # Trainer's mean loss covers steps 3-4 only
    rows = read_loss_csv(tmp_path / "run" / "loss.csv")
    assert [r["step"] for r in rows] == [1, 2, 3, 4]  # step 3 logged once, after the resume
    assert summary["train_loss"] == pytest.approx((rows[2]["loss"] + rows[3]["loss"]) / 2, rel=1e-3)
    reference = read_loss_csv(f"{reference_recipe.output_dir}/loss.csv")
    # Continues the uninterrupted run exactly: same weights (MoE experts included), optimizer state,
    # schedule and data order.
    assert [r["loss"] for r in rows] == pytest.approx([r["loss"] for r in reference], rel=1e-5)
    assert [r["learning_rate"] for r in rows] == pytest.approx([r["learning_rate"] for r in reference])


def test_stages_choose_trainable_parameters(tiny_base):
    model, _ = load_model(tiny_base)
    set_stage_trainable(model, "align")
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("multi_modal_projector" in n for n in trainable)
    set_stage_trainable(model, "sft")
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert any("language_model" in n for n in trainable) and not any("vision_tower" in n for n in trainable)
    set_stage_trainable(model, "multi", train_vision_tower=True)
    assert all(p.requires_grad for p in model.parameters())
    # train_only: of what the stage trains, only the named parameters (here the attention layers)
    set_stage_trainable(model, "sft")
    keep_only_trainable(model, ["self_attn"])
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("language_model" in n and ".self_attn." in n for n in trainable)
    with pytest.raises(FinetuneError, match="names no parameter"):
        keep_only_trainable(model, ["self_attn", "vision_tower"])  # frozen by the stage: not a choice here
    with pytest.raises(FinetuneError, match="train_only"):
        Recipe(name="x", mode="lora", train_data=["a.json"], train_only=["self_attn"]).validate()


def test_recipes_parse_and_overrides_apply(tmp_path):
    names = sorted(p.stem for p in RECIPE_DIR.glob("*.yaml"))
    assert names == ["ct_rate_lora", "demo", "demo_places", "demo_polish", "demo_vision", "demo_vision_tiles",
                     "demo_warmup", "pubmedvision_full", "pubmedvision_lora", "skysense_lora"]
    warmup_ratios = {"demo_warmup": 0.05, "demo_polish": 0.05}  # the demo's stages 2 and 4, as they ran
    for name in names:
        recipe = load_recipe(name)
        assert recipe.lr_scheduler_type == "cosine" and recipe.warmup_ratio == warmup_ratios.get(name, 0.03)
    recipe = load_recipe("demo", ["max_steps=3", "learning_rate=1e-4", "train_data=a.json,b.json", "pack=false"])
    assert (recipe.max_steps, recipe.learning_rate, recipe.train_data, recipe.pack) == (3, 1e-4, ["a.json", "b.json"],
                                                                                        False)
    with pytest.raises(FinetuneError, match="unknown keys \\['lr'\\]"):
        load_recipe("demo", ["lr=1"])
    with pytest.raises(FinetuneError, match="stage 'align' trains one module fully"):
        load_recipe("pubmedvision_lora", ["stage=align"])
    with pytest.raises(FinetuneError, match="unknown recipe 'nope'"):
        load_recipe("nope")
    with pytest.raises(FinetuneError, match="pack must be true or false"):
        load_recipe("demo", ["pack=maybe"])


def test_grow_language_model_recipe_appends_trains_and_saves_layers(tmp_path, synthetic_sets, make_recipe):
    """``grow_language_model`` appends layers to the base model (a no-op at first, its output projections
    zero), the run trains them, and the saved model loads with the grown layout; a LoRA recipe cannot ask."""
    growth = {"num_hidden_layers": 6, "attn_layer_period": 2, "attn_layer_offset": 1}
    recipe = make_recipe(synthetic_sets / "rs_train.json", tmp_path / "run", mode="full", max_steps=2,
                         grow_language_model=growth, pack=False, max_length=2048,
                         image_cache_dir=str(tmp_path / "cache"), render={"tile_size": 112, "max_tiles": 4})
    summary = run_training(recipe)
    model, _ = load_model(summary["saved_to"])
    base, _ = load_model(summary["base_model"])
    assert base.config.text_config.num_hidden_layers == 4
    assert model.config.text_config.layers_block_type == ["mamba", "attention"] * 3
    trained = model.model.language_model.layers[5].self_attn.o_proj.weight
    assert trained.abs().max() > 0  # trained from zero
    with pytest.raises(FinetuneError, match="grow_language_model"):
        make_recipe(synthetic_sets / "ct_train.json", tmp_path / "lora", grow_language_model=growth)
    with pytest.raises(FinetuneError, match="num_hidden_layers"):
        make_recipe(synthetic_sets / "ct_train.json", tmp_path / "bad", mode="full",
                    grow_language_model={"num_hidden_layers": 6})
    shrink = make_recipe(synthetic_sets / "rs_train.json", tmp_path / "shrink", mode="full", max_steps=1,
                         grow_language_model={**growth, "attn_layer_offset": 0}, pack=False, max_length=2048,
                         image_cache_dir=str(tmp_path / "cache"), render={"tile_size": 112, "max_tiles": 4})
    with pytest.raises(FinetuneError, match="keep every existing layer"):
        run_training(shrink)


def test_grid_places_recipe_adds_trains_and_saves_the_place_vectors(tmp_path, synthetic_sets, make_recipe):
    """``grid_places`` gives the base model its row / column vectors (seeded), the run trains them with the
    language model, and the saved model loads them back; a LoRA recipe cannot ask for them."""
    recipe = make_recipe(synthetic_sets / "rs_train.json", tmp_path / "run", mode="full", grid_places=3,
                         max_steps=2, pack=False, max_length=2048, image_cache_dir=str(tmp_path / "cache"),
                         render={"tile_size": 112, "max_tiles": 4})
    summary = run_training(recipe)
    model, _ = load_model(summary["saved_to"])
    base, _ = load_model(summary["base_model"])
    assert base.model.grid_place_embeddings is None and model.config.grid_places == 3
    start = _place_vectors(3, model.config.text_config.hidden_size, recipe.grid_place_norm, recipe.seed)
    trained = model.model.grid_place_embeddings.detach()
    assert trained.shape == start.shape and not torch.equal(trained, start)  # they were trained...
    assert (trained - start).abs().max() < 1.0  # ...from the seeded start
    with pytest.raises(FinetuneError, match="grid_places"):
        make_recipe(synthetic_sets / "rs_train.json", tmp_path / "lora", grid_places=3)
