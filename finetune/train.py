"""Fine-tuning on HF ``Trainer``: LoRA (peft) or full, the paper's stages, DeepSpeed, resume.

Stages (LongLLaVA, section 4): ``align`` trains only the projector (vision tower and LLM frozen);
``sft`` trains projector + LLM; ``multi`` trains projector + LLM on multi-image / series / grid data
mixed with ``replay_ratio`` x as many records replayed from earlier-stage data (``replay_data``).
The vision tower stays frozen in every stage (as in the paper) unless ``train_vision_tower`` is set.
``vision`` (not in the paper, which starts from a pretrained CLIP) pretrains a vision tower trained from
random weights on labelled single images through a linear head (:mod:`finetune.vision`).

Modes: ``full`` updates all trainable weights of the stage; ``lora`` freezes the LLM and adds
adapters (see :data:`LORA_TARGET_MODULES`) while the projector is trained fully (``modules_to_save``).
Adapters are saved on their own in ``OUTPUT/adapter``; ``longllava merge-lora`` folds them in.

Outputs in ``output_dir``: ``checkpoint-N/`` (Trainer checkpoints, ``--resume`` continues from the
last), ``model/`` (full) or ``adapter/`` (LoRA) with the processor, ``base/`` (the random base model
when the recipe starts from a preset), ``loss.csv`` + ``loss.png``, ``recipe.yaml`` (resolved) and
``training_summary.json``.
"""

from __future__ import annotations

import csv
import json
import os
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from finetune import FinetuneError

RECIPE_DIR = Path(__file__).parent / "recipes"
DEEPSPEED_DIR = Path(__file__).parent / "deepspeed"
MODES = ("lora", "full")
STAGES = ("align", "sft", "multi", "vision")
LOSS_AVERAGES = ("token", "turn")

# LoRA targets, language model only (the CLIP tower has q/k/v/out_proj too and stays frozen):
# attention (q,k,v,o), Mamba mixer projections (in_proj: x and gate; x_proj: dt/B/C; out_proj) and the
# dense MLP (gate/up/down). transformers 5 stores MoE experts as fused 3D parameters, which Linear-
# module targeting cannot reach: peft's ``target_parameters`` adapts them (LongLLaVA-9B keeps only a
# dense MLP, so there they are absent and skipped). Routers, norms, conv1d, dt_proj stay frozen.
LORA_TARGET_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "in_proj", "x_proj", "out_proj",
                       "gate_proj", "up_proj", "down_proj")
LORA_TARGET_PARAMETERS = ("feed_forward.experts.gate_up_proj", "feed_forward.experts.down_proj")
PROJECTOR_MODULE = "multi_modal_projector"


@dataclass
class Recipe:
    """Everything a run needs; YAML keys are these field names (``key=value`` overrides on the CLI)."""

    name: str = "custom"
    description: str = ""
    base_model: str = "preset:tiny"  # a model folder, "demo", or "preset:NAME" (random init, seeded)
    mode: str = "lora"
    stage: str = "sft"
    train_data: list[str] = field(default_factory=list)
    image_root: str | None = None
    replay_data: list[str] = field(default_factory=list)
    replay_ratio: float = 0.0
    output_dir: str = "runs/custom"
    image_cache_dir: str | None = None  # default OUTPUT/image_cache
    render: dict = field(default_factory=dict)  # CT / raster options for records that set none
    train_vision_tower: bool = False  # the paper keeps CLIP frozen; a model trained from scratch may not
    projector_init_head: str | None = None  # a stage-'vision' output_dir: its label head seeds the projector
    projector_init_scale: float = 0.25
    # give a base model without them grid place vectors for this many rows / columns (longllava.config; 0: none)
    grid_places: int = 0
    grid_place_norm: float = 8.0
    # append language-model layers to a base model that has fewer (longllava.modeling.append_language_layers):
    # {num_hidden_layers: N, attn_layer_period: P, attn_layer_offset: O}; the layout must keep the existing layers
    grow_language_model: dict = field(default_factory=dict)
    # full mode: of what the stage trains, only the parameters whose names contain one of these (none: all of it)
    train_only: list[str] = field(default_factory=list)
    # stage vision: weight of the per-token loss of records with token_labels (0: those targets are not used)
    vision_token_loss_weight: float = 0.0
    # stage vision: label-name prefix -> weight of those labels' loss terms (others 1), e.g. {"niah shape": 4}
    vision_label_weights: dict = field(default_factory=dict)
    max_length: int = 4096
    pack: bool = True
    learning_rate: float = 1e-5
    lr_scheduler_type: str = "cosine"
    warmup_ratio: float = 0.03
    weight_decay: float = 0.0
    num_train_epochs: float = 1.0
    max_steps: int = -1
    per_device_train_batch_size: int = 1
    gradient_accumulation_steps: int = 1
    max_grad_norm: float = 1.0
    # token: the mean over every answer token (HF's causal-LM loss); turn: each answer turn's mean, averaged
    # over the batch's turns, so a one-word answer weighs as much as a 100-token report
    loss_average: str = "token"
    gradient_checkpointing: bool = True
    precision: str = "auto"  # auto: bf16 on a CUDA GPU that supports it, else fp32
    deepspeed: str | None = None  # None, "zero2", "zero3" or a JSON path
    lora_r: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.0  # peft's ParamWrapper (fused MoE experts) requires 0
    lora_target_modules: list[str] = field(default_factory=lambda: list(LORA_TARGET_MODULES))
    lora_target_parameters: list[str] = field(default_factory=lambda: list(LORA_TARGET_PARAMETERS))
    save_steps: int = 500
    save_total_limit: int | None = 3
    logging_steps: int = 1
    seed: int = 42
    dataloader_num_workers: int = 0
    report_to: str = "none"

    def validate(self) -> None:
        if self.mode not in MODES:
            raise FinetuneError(f"recipe {self.name}: mode {self.mode!r} unknown; use lora or full")
        if self.stage not in STAGES:
            raise FinetuneError(f"recipe {self.name}: stage {self.stage!r} unknown; use align, sft, multi or vision")
        if self.stage in ("align", "vision") and self.mode == "lora":
            raise FinetuneError(
                f"recipe {self.name}: stage {self.stage!r} trains one module fully; set mode=full"
            )
        if self.stage == "vision" and (self.gradient_checkpointing or self.deepspeed):
            raise FinetuneError(
                f"recipe {self.name}: stage 'vision' trains a small head on the vision tower without "
                "gradient checkpointing or DeepSpeed; set gradient_checkpointing: false and deepspeed: null"
            )
        if self.projector_init_head and (self.stage == "vision" or self.mode != "full"):
            raise FinetuneError(
                f"recipe {self.name}: projector_init_head seeds the projector of a full fine-tune of a text "
                "stage (a LoRA adapter is saved against the unchanged base); set mode: full and stage sft, "
                "align or multi, or drop projector_init_head"
            )
        if self.grid_places and (self.mode != "full" or self.stage not in ("sft", "multi")):
            raise FinetuneError(
                f"recipe {self.name}: grid_places adds weights that a full sft / multi run trains; set mode: full "
                "and stage: sft or multi, or drop grid_places"
            )
        self._validate_growth()
        if self.train_only and self.mode != "full":
            raise FinetuneError(f"recipe {self.name}: train_only picks parameters of a full fine-tune; set mode: full "
                                "or drop train_only (LoRA trains its adapters)")
        if not self.train_data:
            raise FinetuneError(f"recipe {self.name}: train_data is empty; give one or more .json/.jsonl files")
        if self.stage != "multi" and self.replay_ratio:
            raise FinetuneError(f"recipe {self.name}: replay_ratio applies to stage 'multi' only")
        if self.precision not in ("auto", "bf16", "fp16", "fp32"):
            raise FinetuneError(f"recipe {self.name}: precision {self.precision!r}; use auto, bf16, fp16 or fp32")
        if self.loss_average not in LOSS_AVERAGES:
            raise FinetuneError(f"recipe {self.name}: loss_average {self.loss_average!r}; use token or turn")
        if self.loss_average != "token" and self.stage == "vision":
            raise FinetuneError(
                f"recipe {self.name}: loss_average applies to answer tokens; stage 'vision' has none "
                "(drop loss_average)"
            )
        if self.max_length < 8:
            raise FinetuneError(f"recipe {self.name}: max_length {self.max_length} is too small")
        if not self.vision_token_loss_weight >= 0:
            raise FinetuneError(f"recipe {self.name}: vision_token_loss_weight {self.vision_token_loss_weight!r} "
                                "must be 0 (off) or positive")
        if not isinstance(self.vision_label_weights, dict):
            raise FinetuneError(f"recipe {self.name}: vision_label_weights {self.vision_label_weights!r} must map "
                                'label-name prefixes to weights, e.g. {"niah shape": 4}')
        bad_weights = {k: v for k, v in self.vision_label_weights.items()
                       if not isinstance(k, str) or isinstance(v, bool) or not isinstance(v, (int, float)) or not v >= 0}
        if bad_weights:
            raise FinetuneError(f"recipe {self.name}: vision_label_weights {bad_weights!r}: map label-name prefixes "
                                "to weights >= 0")
        if self.vision_label_weights and self.stage != "vision":
            raise FinetuneError(f"recipe {self.name}: vision_label_weights apply to stage 'vision' only")

    def _validate_growth(self) -> None:
        if not self.grow_language_model:
            return
        keys = ("num_hidden_layers", "attn_layer_period", "attn_layer_offset")
        growth = self.grow_language_model
        if not isinstance(growth, dict) or sorted(growth) != sorted(keys) or not all(
                isinstance(growth[k], int) and not isinstance(growth[k], bool) and growth[k] >= 0 for k in keys):
            raise FinetuneError(f"recipe {self.name}: grow_language_model {growth!r} must give integers "
                                "num_hidden_layers, attn_layer_period and attn_layer_offset, e.g. "
                                "{num_hidden_layers: 10, attn_layer_period: 5, attn_layer_offset: 4}")
        if self.mode != "full" or self.stage not in ("sft", "multi"):
            raise FinetuneError(f"recipe {self.name}: grow_language_model adds layers that a full sft / multi run "
                                "trains; set mode: full and stage: sft or multi, or drop grow_language_model")


# ----------------------------------------------------------------------------------------------
# Recipes


def recipe_path(name_or_path: str) -> Path:
    """A bundled recipe name (``finetune/recipes/NAME.yaml``) or a YAML file path."""
    candidate = Path(name_or_path)
    if candidate.suffix in (".yaml", ".yml"):
        if not candidate.is_file():
            raise FinetuneError(f"recipe file {candidate} not found")
        return candidate
    bundled = RECIPE_DIR / f"{name_or_path}.yaml"
    if not bundled.is_file():
        known = ", ".join(sorted(p.stem for p in RECIPE_DIR.glob("*.yaml")))
        raise FinetuneError(f"unknown recipe {name_or_path!r}; use one of {known} or a .yaml path")
    return bundled


def _coerce(recipe_name: str, key: str, value: Any, current: Any) -> Any:
    if isinstance(current, list) and isinstance(value, str):
        return [v for v in value.split(",") if v]
    if isinstance(current, bool) and not isinstance(value, bool):
        raise FinetuneError(f"recipe {recipe_name}: {key} must be true or false, got {value!r}")
    if isinstance(current, float) and isinstance(value, int | str) and not isinstance(value, bool):
        try:
            return float(value)  # YAML 1.1 reads "1e-5" (no dot) as a string
        except ValueError:
            raise FinetuneError(f"recipe {recipe_name}: {key} must be a number, got {value!r}") from None
    return value


def load_recipe(name_or_path: str, overrides: Sequence[str] = ()) -> Recipe:
    """Read a recipe and apply ``key=value`` overrides (values parsed as YAML scalars)."""
    path = recipe_path(name_or_path)
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as error:
        raise FinetuneError(f"recipe {path}: not valid YAML ({error})") from None
    if not isinstance(raw, dict):
        raise FinetuneError(f"recipe {path}: expected a mapping of keys to values")
    raw.setdefault("name", path.stem)
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise FinetuneError(f"override {item!r} is not key=value")
        raw[key.strip()] = yaml.safe_load(value) if value.strip() else None
    valid = {f.name: f for f in fields(Recipe)}
    unknown = sorted(set(raw) - set(valid))
    if unknown:
        raise FinetuneError(f"recipe {path}: unknown keys {unknown}; valid keys: {', '.join(valid)}")
    defaults = Recipe()
    values = {key: _coerce(raw["name"], key, value, getattr(defaults, key)) for key, value in raw.items()}
    if isinstance(values.get("train_data"), str):
        values["train_data"] = [values["train_data"]]
    if isinstance(values.get("replay_data"), str):
        values["replay_data"] = [values["replay_data"]]
    recipe = Recipe(**values)
    recipe.validate()
    return recipe


def deepspeed_config(spec: str | None) -> dict | None:
    """``zero2`` / ``zero3`` (bundled configs) or a JSON file path -> dict (``auto`` values filled by HF)."""
    if not spec:
        return None
    path = DEEPSPEED_DIR / f"{spec}.json" if spec in ("zero2", "zero3") else Path(spec)
    if not path.is_file():
        raise FinetuneError(f"DeepSpeed config {spec!r} not found; use zero2, zero3 or a JSON file path")
    return json.loads(path.read_text())


# ----------------------------------------------------------------------------------------------
# Model set-up


def resolve_base_model(recipe: Recipe, output_dir: Path, wait_s: float = 600.0) -> str:
    """The base model folder; ``preset:NAME`` is written once (seeded) to ``OUTPUT/base``.

    Called before the distributed set-up (ZeRO-3 must not be active while a random model is built):
    rank 0 writes to a temporary folder and renames it; other ranks wait for the folder to appear
    (multi-node runs need ``output_dir`` on a shared file system, or a real ``base_model`` path).
    """
    spec = recipe.base_model
    if not spec.startswith("preset:"):
        return spec
    base_dir = output_dir / "base"
    if (base_dir / "config.json").is_file():
        return str(base_dir)
    if _is_main_process():
        from longllava.loading import save_random_model

        tmp = output_dir / f"base.tmp-{os.getpid()}"
        save_random_model(spec.split(":", 1)[1], tmp, seed=recipe.seed)
        tmp.replace(base_dir)
        return str(base_dir)
    deadline = time.monotonic() + wait_s
    while not (base_dir / "config.json").is_file():
        if time.monotonic() > deadline:
            raise FinetuneError(f"rank {os.environ.get('RANK')}: {base_dir} did not appear within {wait_s:.0f} s; "
                                "is output_dir on a file system shared by all nodes?")
        time.sleep(0.5)
    return str(base_dir)


def _is_main_process() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def set_stage_trainable(model: Any, stage: str, train_vision_tower: bool = False) -> None:
    """Freeze everything, then unfreeze what the stage trains (the vision tower only when asked)."""
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    projector = _find_module(model, PROJECTOR_MODULE)
    for parameter in projector.parameters():
        parameter.requires_grad_(True)
    if stage in ("sft", "multi"):
        for name, parameter in model.named_parameters():
            if "vision_tower" not in name and PROJECTOR_MODULE not in name:
                parameter.requires_grad_(True)
    if train_vision_tower:
        for parameter in _find_module(model, "vision_tower").parameters():
            parameter.requires_grad_(True)


def keep_only_trainable(model: Any, patterns: Sequence[str], recipe_name: str = "custom") -> None:
    """Freeze every trainable parameter whose name contains none of ``patterns``; each pattern must name
    at least one trainable parameter."""
    trainable = [name for name, parameter in model.named_parameters() if parameter.requires_grad]
    for pattern in patterns:
        if not any(pattern in name for name in trainable):
            raise FinetuneError(f"recipe {recipe_name}: train_only pattern {pattern!r} names no parameter this stage "
                                "trains; check the names with model.named_parameters()")
    for name, parameter in model.named_parameters():
        if parameter.requires_grad and not any(pattern in name for pattern in patterns):
            parameter.requires_grad_(False)


def _find_module(model: Any, suffix: str) -> Any:
    for name, module in model.named_modules():
        if name.split(".")[-1] == suffix:
            return module
    raise FinetuneError(f"model has no {suffix!r} module; is it a LongLLaVA model?")


def lora_config(recipe: Recipe, model: Any) -> Any:
    """peft LoRA on the language model's projections (+ fused experts when present)."""
    from peft import LoraConfig

    names = "|".join(re.escape(n) for n in recipe.lora_target_modules)
    module_regex = rf".*language_model.*\.({names})$"
    parameter_names = {name for name, _ in model.named_parameters()}
    target_parameters = [t for t in recipe.lora_target_parameters
                         if any(name.endswith(t) for name in parameter_names)]
    if target_parameters and recipe.lora_dropout:
        raise FinetuneError(
            f"recipe {recipe.name}: lora_dropout={recipe.lora_dropout} but peft adapts fused MoE experts "
            "(lora_target_parameters) only with dropout 0; set lora_dropout=0 or lora_target_parameters=[]"
        )
    return LoraConfig(
        r=recipe.lora_r,
        lora_alpha=recipe.lora_alpha,
        lora_dropout=recipe.lora_dropout,
        target_modules=module_regex,
        target_parameters=target_parameters or None,
        modules_to_save=[PROJECTOR_MODULE],
        bias="none",
    )


def register_moe_leaf_modules(model: Any) -> int:
    """Mark sparse MoE blocks as ZeRO-3 leaves (ranks routing to different experts could otherwise hang)."""
    from deepspeed.utils import set_z3_leaf_modules

    classes = sorted({type(m) for m in model.modules() if type(m).__name__.endswith("SparseMoeBlock")},
                     key=lambda c: c.__name__)
    if classes:
        set_z3_leaf_modules(model, classes)
    return len(classes)


def _set_use_cache(model: Any, enabled: bool) -> None:
    """Switch the generation cache in the config and its text config (off for training, on for saving)."""
    config = getattr(model, "config", None)
    for owner in (config, getattr(config, "text_config", None)):
        if owner is not None:
            owner.use_cache = enabled


def prepare_model(recipe: Recipe, model: Any) -> Any:
    """Stage freezing, then LoRA wrapping for ``mode=lora``."""
    _set_use_cache(model, False)
    set_stage_trainable(model, recipe.stage, recipe.train_vision_tower)
    if recipe.train_only:
        keep_only_trainable(model, recipe.train_only, recipe.name)
    if recipe.mode == "lora":
        from peft import get_peft_model

        config = lora_config(recipe, model)
        if recipe.train_vision_tower:
            config.modules_to_save = [*config.modules_to_save, "vision_tower"]
        model = get_peft_model(model, config)
    return model


def tokens_per_image_of(processor: Any, model: Any) -> int:
    """How many tokens one image becomes (processor, then config attributes)."""
    for owner in (processor, getattr(model, "config", None)):
        for attribute in ("tokens_per_image", "num_image_tokens", "image_seq_length"):
            value = getattr(owner, attribute, None)
            if isinstance(value, int) and value > 0:
                return value
    raise FinetuneError("cannot tell how many tokens an image takes from this processor/config")


# ----------------------------------------------------------------------------------------------
# Loss log (CSV + PNG beside the checkpoints)


def write_loss_plot(csv_path: Path, png_path: Path, title: str = "training loss") -> None:
    """Loss curve PNG from the CSV (step, loss)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_loss_csv(csv_path)
    figure, axis = plt.subplots(figsize=(6, 3.5), dpi=100)
    axis.plot([r["step"] for r in rows], [r["loss"] for r in rows], marker="o", markersize=2)
    axis.set_xlabel("step")
    axis.set_ylabel("loss")
    axis.set_title(title)
    axis.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(png_path)
    plt.close(figure)


def read_loss_csv(path: str | Path) -> list[dict]:
    """Rows of ``loss.csv`` as dicts with int step and float loss/learning_rate."""
    path = Path(path)
    if not path.is_file():
        return []
    with path.open(newline="") as handle:
        return [{"step": int(r["step"]), "epoch": float(r["epoch"]), "loss": float(r["loss"]),
                 "learning_rate": float(r["learning_rate"] or "nan")} for r in csv.DictReader(handle)]


def _loss_callback_class():
    from transformers import TrainerCallback

    class LossLogger(TrainerCallback):
        """Appends each logged training loss to ``loss.csv``; redraws ``loss.png`` at saves and at the end.
        On resume, rows past the resumed step (logged after the last checkpoint) are dropped."""

        def __init__(self, output_dir: Path, title: str) -> None:
            self.csv_path = output_dir / "loss.csv"
            self.png_path = output_dir / "loss.png"
            self.title = title

        def on_train_begin(self, args, state, control, **kwargs):
            if not state.is_world_process_zero:
                return
            kept = [r for r in read_loss_csv(self.csv_path) if r["step"] <= state.global_step]
            with self.csv_path.open("w", newline="") as handle:
                writer = csv.writer(handle)
                writer.writerow(["step", "epoch", "loss", "learning_rate"])
                for row in kept:
                    writer.writerow([row["step"], f"{row['epoch']:.4f}", row["loss"], row["learning_rate"]])

        def on_log(self, args, state, control, logs=None, **kwargs):
            if not state.is_world_process_zero or not logs or "loss" not in logs:
                return
            with self.csv_path.open("a", newline="") as handle:
                csv.writer(handle).writerow(
                    [state.global_step, f"{state.epoch or 0:.4f}", logs["loss"], logs.get("learning_rate", "")]
                )

        def _plot(self, state):
            if state.is_world_process_zero and read_loss_csv(self.csv_path):
                write_loss_plot(self.csv_path, self.png_path, self.title)

        def on_save(self, args, state, control, **kwargs):
            self._plot(state)

        def on_train_end(self, args, state, control, **kwargs):
            self._plot(state)

    return LossLogger


# ----------------------------------------------------------------------------------------------
# The run


def _precision_flags(recipe: Recipe) -> dict:
    import torch

    on_gpu = torch.cuda.is_available()
    precision = recipe.precision
    if precision == "auto":
        precision = "bf16" if on_gpu and torch.cuda.is_bf16_supported() else "fp32"
    if precision in ("bf16", "fp16") and not on_gpu:
        raise FinetuneError(f"precision {precision} needs a CUDA GPU; use precision=fp32 (or auto) on CPU")
    return {"bf16": precision == "bf16", "fp16": precision == "fp16", "use_cpu": not on_gpu}


def training_arguments(recipe: Recipe, output_dir: Path) -> Any:
    from transformers import TrainingArguments

    return TrainingArguments(
        output_dir=str(output_dir),
        learning_rate=recipe.learning_rate,
        lr_scheduler_type=recipe.lr_scheduler_type,
        warmup_steps=recipe.warmup_ratio,  # transformers 5: a float < 1 is a ratio of total steps
        weight_decay=recipe.weight_decay,
        num_train_epochs=recipe.num_train_epochs,
        max_steps=recipe.max_steps,
        per_device_train_batch_size=recipe.per_device_train_batch_size,
        gradient_accumulation_steps=recipe.gradient_accumulation_steps,
        max_grad_norm=recipe.max_grad_norm,
        activation_checkpointing=recipe.gradient_checkpointing,
        activation_checkpointing_kwargs={"use_reentrant": False} if recipe.gradient_checkpointing else None,
        logging_steps=recipe.logging_steps,
        save_strategy="steps",
        save_steps=recipe.save_steps,
        save_total_limit=recipe.save_total_limit,
        seed=recipe.seed,
        data_seed=recipe.seed,
        dataloader_num_workers=recipe.dataloader_num_workers,
        report_to=recipe.report_to,
        remove_unused_columns=False,
        deepspeed=deepspeed_config(recipe.deepspeed),
        disable_tqdm=False,
        **_precision_flags(recipe),
    )


def answer_turn_ids(labels: Any) -> Any:
    """(batch, seq) labels -> ids numbering each row's answer turns 1, 2, ... (0 off the answers).

    A turn is a maximal run of supervised positions: answers are separated by prompts (-100), and packed
    records by their own prompts, so runs and turns coincide.
    """
    import torch

    from finetune.data import IGNORE_INDEX

    supervised = labels != IGNORE_INDEX
    before = torch.zeros_like(supervised)
    before[:, 1:] = supervised[:, :-1]
    starts = supervised & ~before  # (batch, seq): first position of each run
    return torch.cumsum(starts.long(), dim=1) * supervised.long()


def supervised_positions(labels: Any) -> Any:
    """(batch, seq) labels -> bool (batch, seq): the positions whose logits a causal-LM loss reads.

    Position t predicts label t + 1, so t is kept when label t + 1 is supervised; the last position never is.
    Passed as ``logits_to_keep``, the LM head runs only there: on a 1,000-image sequence of the 9B (144,000
    image tokens, vocabulary 65,536) the full logits alone would take 38 GB in fp32.
    """
    import torch

    from finetune.data import IGNORE_INDEX

    keep = torch.zeros_like(labels, dtype=torch.bool)
    keep[:, :-1] = labels[:, 1:] != IGNORE_INDEX
    return keep


def kept_targets(labels: Any) -> Any:
    """(batch, seq) labels -> (n_kept,) next-token targets, in the order ``logits[supervised_positions]`` has."""
    from finetune.data import IGNORE_INDEX

    return labels[:, 1:][labels[:, 1:] != IGNORE_INDEX]


def turn_averaged_loss(logits: Any, labels: Any) -> Any:
    """Causal-LM cross entropy averaged within each answer turn, then over the batch's turns.

    ``logits``: (batch, seq, vocab) for every position, or (n_kept, vocab) for the positions
    :func:`supervised_positions` keeps (what the model returns for ``logits_to_keep=supervised_positions``);
    ``labels`` (batch, seq) as the model sees them; position t predicts label t + 1, as in HF's loss.
    Raises when nothing is supervised.
    """
    import torch
    import torch.nn.functional as F

    if logits.dim() == 3:
        logits = logits[supervised_positions(labels)]  # (batch, seq, vocab) -> (n_kept, vocab)
    turns = answer_turn_ids(labels[:, 1:])  # (batch, seq - 1)
    n_turns = int(turns.max(dim=1).values.sum())
    if n_turns == 0:
        raise FinetuneError("turn_averaged_loss: no supervised answer token in the batch")
    token_loss = F.cross_entropy(logits.float(), kept_targets(labels), reduction="none")  # (n_kept,)
    # a slot per (row, turn): row r's turn t -> r * slots + t
    slots = int(turns.max()) + 1
    slot_of = turns + torch.arange(turns.shape[0], device=turns.device)[:, None] * slots  # (batch, seq - 1)
    kept_slots = slot_of[turns > 0]  # (n_kept,), row-major like the kept logits
    turn_lengths = torch.bincount(kept_slots, minlength=turns.shape[0] * slots)[kept_slots]
    return (token_loss / turn_lengths.float()).sum() / n_turns


def token_averaged_loss(logits: Any, labels: Any, num_items_in_batch: Any = None) -> Any:
    """HF's causal-LM loss on kept logits (n_kept, vocab): the mean over supervised tokens, or their sum over
    ``num_items_in_batch`` (the Trainer's count across gradient accumulation) when it is given."""
    import torch.nn.functional as F

    targets = kept_targets(labels)
    if targets.numel() == 0:
        raise FinetuneError("token_averaged_loss: no supervised answer token in the batch")
    if num_items_in_batch is None:
        return F.cross_entropy(logits.float(), targets)
    if hasattr(num_items_in_batch, "to"):
        num_items_in_batch = num_items_in_batch.to(logits.device)
    return F.cross_entropy(logits.float(), targets, reduction="sum") / num_items_in_batch


def answer_loss(model: Any, batch: dict, loss_average: str = "token", num_items_in_batch: Any = None) -> tuple:
    """(loss, outputs) of a labelled batch with the LM head run only at :func:`supervised_positions`.

    ``loss_average``: ``token`` (HF's causal-LM loss; with ``num_items_in_batch``, the sum over that count)
    or ``turn`` (:func:`turn_averaged_loss`). ``outputs.logits`` is (n_kept, vocab).
    """
    inputs = dict(batch)
    labels = inputs.pop("labels")
    outputs = model(**inputs, logits_to_keep=supervised_positions(labels))
    if loss_average == "turn":
        return turn_averaged_loss(outputs.logits, labels), outputs
    return token_averaged_loss(outputs.logits, labels, num_items_in_batch), outputs


def _trainer_class() -> Any:
    from transformers import Trainer

    class LongLlavaTrainer(Trainer):
        """``Trainer`` whose resume restores every weight of a full-mode checkpoint, whose LM head runs only
        where an answer token is predicted, and whose loss can average answer turns instead of tokens
        (``loss_average``; ``None`` leaves the loss to the model).

        transformers 5 saves fused MoE experts in the per-expert layout (``experts.N.gate_proj``) and
        converts them back only in ``from_pretrained``; the stock resume path loads the file with
        ``load_state_dict(strict=False)`` and would silently keep the experts' in-memory values. Here
        the checkpoint goes through ``from_pretrained`` and is copied in strictly. LoRA (peft) and
        DeepSpeed checkpoints keep the stock path (their own formats).
        """

        def __init__(self, *args, loss_average: str | None = "token", **kwargs):
            super().__init__(*args, **kwargs)
            self.loss_average = loss_average  # None: the model computes its own loss (the vision stage's head)
            if loss_average == "turn":
                self.loss_is_scaled_for_ga = False  # a per-micro-batch mean: Trainer divides by the GA steps

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            """The recipe's loss from logits at the supervised positions only (``logits_to_keep``)."""
            if self.loss_average is None:
                return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            count = num_items_in_batch if self.loss_average == "token" else None
            loss, outputs = answer_loss(model, inputs, self.loss_average, count)
            if count is not None and self.args.average_tokens_across_devices:
                loss = loss * self.accelerator.num_processes  # as Trainer.compute_loss: a global count
            return (loss, outputs) if return_outputs else loss

        def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
            target = model if model is not None else self.model
            if (self.is_deepspeed_enabled or getattr(self, "is_fsdp_enabled", False)
                    or hasattr(target, "peft_config") or not (Path(resume_from_checkpoint) / "config.json").is_file()):
                return super()._load_from_checkpoint(resume_from_checkpoint, model)
            restored = type(target).from_pretrained(resume_from_checkpoint)
            target.load_state_dict(restored.state_dict(), strict=True)
            del restored

    return LongLlavaTrainer


def _checkpoint_step(checkpoint: Path) -> int:
    """The global step a ``checkpoint-N`` folder was saved at."""
    return int(checkpoint.name.split("-")[1])


def last_checkpoint(output_dir: Path) -> Path | None:
    """The highest ``checkpoint-N`` folder in ``output_dir``, if any."""
    found = [(_checkpoint_step(p), p) for p in output_dir.glob("checkpoint-*")
             if p.is_dir() and p.name.split("-")[1].isdigit()]
    return max(found)[1] if found else None


def image_cache_dir(recipe: Recipe, output_dir: Path) -> Path:
    """Where rendered training images (and the frozen tower's features of them) are cached."""
    return Path(recipe.image_cache_dir) if recipe.image_cache_dir else output_dir / "image_cache"


def build_train_dataset(recipe: Recipe, processor: Any, model: Any, output_dir: Path) -> Any:
    from finetune import data

    records = [r for path in recipe.train_data for r in data.load_records(path, recipe.image_root, recipe.render)]
    if recipe.stage == "multi" and recipe.replay_ratio:
        replay = [r for path in recipe.replay_data
                  for r in data.load_records(path, recipe.image_root, recipe.render)]
        records = data.mix_with_replay(records, replay, recipe.replay_ratio, recipe.seed)
    if not records:
        raise FinetuneError(f"recipe {recipe.name}: the training files hold no records")
    tokenizer = getattr(processor, "tokenizer", processor)
    encoder = data.ConversationEncoder(tokenizer, tokens_per_image_of(processor, model), recipe.max_length)
    samples = data.encode_records(records, encoder, image_cache_dir(recipe, output_dir), progress=_is_main_process())
    loader = data.processor_image_loader(processor.image_processor)
    return data.ConversationDataset(samples, loader, recipe.max_length, pack=recipe.pack)


def add_recipe_grid_places(model: Any, processor: Any, recipe: Recipe) -> None:
    """Give ``model`` the recipe's grid places (longllava.modeling.enable_grid_places, seeded by the recipe),
    unless it has them already with the same number of places."""
    from longllava import protocol
    from longllava.modeling import enable_grid_places

    have = int(getattr(model.config, "grid_places", 0) or 0)
    if have:
        if have != recipe.grid_places:
            raise FinetuneError(f"recipe {recipe.name}: the base model has grid_places={have}, the recipe asks "
                                f"for {recipe.grid_places}; use the same number or drop grid_places")
        return
    tokenizer = processor.tokenizer
    newline = tokenizer.encode("\n", add_special_tokens=False)
    if len(newline) != 1:
        raise FinetuneError(f"recipe {recipe.name}: grid_places needs a tokenizer with one token for a newline, "
                            f"got {newline}")
    separators = tokenizer.convert_tokens_to_ids([protocol.IMG_START, protocol.IMG_END])
    enable_grid_places(model, recipe.grid_places, newline[0], separators, recipe.grid_place_norm, recipe.seed)


def grow_recipe_language_model(model: Any, recipe: Recipe) -> None:
    """Append the recipe's language-model layers (longllava.modeling.append_language_layers, seeded by the
    recipe), unless the base model has that layout already."""
    from longllava.errors import ModelInputError
    from longllava.modeling import append_language_layers

    growth = recipe.grow_language_model
    text = model.config.text_config
    if (text.num_hidden_layers, text.attn_layer_period, text.attn_layer_offset) == (
            growth["num_hidden_layers"], growth["attn_layer_period"], growth["attn_layer_offset"]):
        return
    try:
        append_language_layers(model, seed=recipe.seed, **growth)
    except ModelInputError as error:
        raise FinetuneError(f"recipe {recipe.name}: grow_language_model: {error}") from error


def run_training(recipe: Recipe, resume: bool = False, callbacks: Sequence[Any] = ()) -> dict:
    """Train as the recipe says; returns the summary written to ``training_summary.json``."""
    import torch

    from longllava.loading import load_model

    output_dir = Path(recipe.output_dir)
    checkpoint = last_checkpoint(output_dir) if output_dir.is_dir() else None
    if resume and checkpoint is None:
        raise FinetuneError(f"--resume: no checkpoint-* folder in {output_dir}; run without --resume first")
    if not resume and checkpoint is not None:
        raise FinetuneError(
            f"{output_dir} already holds {checkpoint.name}; pass --resume to continue, or choose another output_dir"
        )
    output_dir.mkdir(parents=True, exist_ok=True)
    base_path = resolve_base_model(recipe, output_dir)
    args = training_arguments(recipe, output_dir)  # before loading: ZeRO-3 partitions at load time
    torch.manual_seed(recipe.seed)
    if args.deepspeed:
        import deepspeed

        deepspeed.init_distributed()  # so zero.Init at load time sees the real world size (CPU ranks too)
    model, processor = load_model(base_path)
    if recipe.projector_init_head and not resume:
        from finetune.vision import init_projector_from_head

        init_projector_from_head(model, recipe.projector_init_head, recipe.projector_init_scale)
    if recipe.grid_places and not resume:
        add_recipe_grid_places(model, processor, recipe)
    if recipe.grow_language_model and not resume:
        grow_recipe_language_model(model, recipe)
    run = _vision_run if recipe.stage == "vision" else _conversation_run
    trainer, dataset, trained, save = run(recipe, model, processor, args, output_dir, callbacks)
    result = trainer.train(resume_from_checkpoint=str(checkpoint) if resume else None)
    _set_use_cache(model, True)  # the cache is off only while training; the saved model generates with it
    final_dir = output_dir / ("adapter" if recipe.mode == "lora" else "model")
    save(final_dir)
    if trainer.is_world_process_zero():
        processor.save_pretrained(str(final_dir))
        write_inference_defaults(final_dir, recipe.render)
        if recipe.mode == "lora":
            _point_adapter_at_base(final_dir, base_path)
        save_tower_feature_cache(trained)  # after the model: a failed cache write loses no training
    losses = [r["loss"] for r in read_loss_csv(output_dir / "loss.csv")]
    summary = {
        "recipe": recipe.name, "mode": recipe.mode, "stage": recipe.stage, "base_model": base_path,
        "saved_to": str(final_dir), "global_step": trainer.state.global_step,
        "resumed_from": str(checkpoint) if resume else None, "train_samples": len(getattr(dataset, "samples", dataset)),
        "train_examples_after_packing": len(dataset), "first_loss": losses[0] if losses else None,
        "last_loss": losses[-1] if losses else None,
        # Trainer's mean loss covers only the steps this call ran: from the checkpoint's step on a resume
        "train_loss": result.training_loss, "train_loss_since_step": _checkpoint_step(checkpoint) if resume else 0,
        "trainable_parameters": sum(p.numel() for p in trained.parameters() if p.requires_grad),
        "tower_feature_cache": tower_cache_stats(trained),
    }
    if trainer.is_world_process_zero():
        (output_dir / "training_summary.json").write_text(json.dumps(summary, indent=2))
    _close_process_group()
    return summary


def _close_process_group() -> None:
    """Wait for every rank, then tear the process group down before returning. gloo's worker threads can
    still outlive this and abort a rank at interpreter exit; `longllava finetune` therefore ends a finished
    rank with `finetune.cli.end_rank_process`, which skips finalization."""
    import torch

    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


def _write_resolved_recipe(recipe: Recipe, output_dir: Path) -> None:
    if _is_main_process():
        (output_dir / "recipe.yaml").write_text(yaml.safe_dump(asdict(recipe), sort_keys=False))


def _loss_logger(recipe: Recipe, output_dir: Path) -> Any:
    return _loss_callback_class()(output_dir, f"{recipe.name} ({recipe.mode}, {recipe.stage})")


def _conversation_run(recipe: Recipe, model: Any, processor: Any, args: Any, output_dir: Path,
                      callbacks: Sequence[Any]) -> tuple[Any, Any, Any, Callable[[Path], None]]:
    """Trainer over conversation records (stages align / sft / multi): (trainer, dataset, trained model,
    saver of the final model or adapter)."""
    from finetune import data

    if args.deepspeed and (args.hf_deepspeed_config.is_zero3() if args.hf_deepspeed_config else False):
        register_moe_leaf_modules(model)
    model = prepare_model(recipe, model)
    install_fast_scan_if_available()
    attach_tower_feature_cache(model, image_cache_dir(recipe, output_dir))
    dataset = build_train_dataset(recipe, processor, model, output_dir)
    tokenizer = getattr(processor, "tokenizer", processor)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    _write_resolved_recipe(recipe, output_dir)
    trainer = _trainer_class()(
        model=model, args=args, train_dataset=dataset, data_collator=data.Collator(int(pad_id)),
        callbacks=[_loss_logger(recipe, output_dir), *callbacks], loss_average=recipe.loss_average,
    )
    return trainer, dataset, model, lambda final_dir: trainer.save_model(str(final_dir))


def _vision_run(recipe: Recipe, model: Any, processor: Any, args: Any, output_dir: Path,
                callbacks: Sequence[Any]) -> tuple[Any, Any, Any, Callable[[Path], None]]:
    """Trainer over labelled images or bags of them (stage vision): the model's vision tower under a linear
    multi-label head (:mod:`finetune.vision`); everything else stays frozen. Its saver writes the whole
    LongLLaVA model (tower trained) to the final folder and the head beside it."""
    from finetune import vision

    records = [r for path in recipe.train_data for r in vision.load_labelled_images(path, recipe.image_root)]
    if not records:
        raise FinetuneError(f"recipe {recipe.name}: the training files hold no records")
    vocabulary = vision.label_vocabulary(records)
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    label_weights = vision.label_weight_vector(vocabulary, recipe.vision_label_weights)
    head = vision.vision_label_head(model, len(vocabulary), recipe.seed, recipe.vision_token_loss_weight,
                                    label_weights)
    for parameter in head.parameters():
        parameter.requires_grad_(True)
    with_tokens = recipe.vision_token_loss_weight > 0 and any(r.token_labels is not None for r in records)
    token_grid = head.pooled_grid if with_tokens else None
    dataset = vision.LabelledImageDataset(records, vocabulary, processor.image_processor, token_grid)
    _write_resolved_recipe(recipe, output_dir)
    trainer = _trainer_class()(model=head, args=args, train_dataset=dataset, data_collator=vision.collate_bags,
                               callbacks=[_loss_logger(recipe, output_dir), *callbacks], loss_average=None)

    def save(final_dir: Path) -> None:
        if trainer.is_world_process_zero():
            final_dir.mkdir(parents=True, exist_ok=True)
            model.save_pretrained(str(final_dir))
            vision.save_head(head, vocabulary, final_dir.parent)

    return trainer, dataset, head, save


INFERENCE_DEFAULTS_FILE = "longllava_defaults.json"


def write_inference_defaults(model_dir: Path, render: dict) -> None:
    """Record the render options the model was trained with (CT slice count / size, tile size, tile cap)
    in ``MODEL/longllava_defaults.json``, so evaluation and the apps feed it inputs it can handle."""
    if render:
        (model_dir / INFERENCE_DEFAULTS_FILE).write_text(json.dumps({"render": dict(render)}, indent=2) + "\n")


def attach_tower_feature_cache(model: Any, cache_dir: Path | None = None, max_bytes: int = 2 * 2**30) -> Any:
    """Give ``model``'s LongLLaVA body a :class:`~longllava.modeling.TowerFeatureCache` when its vision tower
    sits on the CPU and is frozen (there it costs about a tenth of a step; on a GPU it is cheap and memory
    is better spent on activations); returns the cache or None. With ``cache_dir`` the cache starts from
    ``cache_dir/tower_features-<tower digest>.safetensors`` when an earlier stage on the same tower wrote
    one (:func:`save_tower_feature_cache`), so stages 2-4 of a chain encode each image once in all."""
    from longllava.modeling import LongLlavaModel, TowerFeatureCache, tower_digest

    body = next((module for module in model.modules() if isinstance(module, LongLlavaModel)), None)
    if body is None or next(body.vision_tower.parameters()).device.type != "cpu" or not body.vision_tower_frozen():
        return None
    path = Path(cache_dir) / f"tower_features-{tower_digest(body)}.safetensors" if cache_dir is not None else None
    cache = TowerFeatureCache(max_bytes, path)
    if path is not None and path.is_file():
        cache.load(path)
    body.tower_feature_cache = cache
    return cache


def _tower_feature_cache_of(model: Any) -> Any:
    return next((module.tower_feature_cache for module in model.modules()
                 if getattr(module, "tower_feature_cache", None) is not None), None)


def save_tower_feature_cache(model: Any) -> None:
    """Write the model's tower feature cache where :func:`attach_tower_feature_cache` reads it back."""
    import warnings

    cache = _tower_feature_cache_of(model)
    if cache is None or cache.path is None:
        return
    try:
        cache.save(cache.path)
    except OSError as error:  # only a cache: the next stage encodes the images again
        warnings.warn(f"could not write the tower feature cache {cache.path} ({error}); the next stage on this "
                      "tower will encode its images again. Free disk space or set image_cache_dir elsewhere.",
                      stacklevel=2)


def tower_cache_stats(model: Any) -> dict | None:
    """Hits, misses and stored images of the model's tower feature cache (None without one)."""
    cache = _tower_feature_cache_of(model)
    if cache is None:
        return None
    return {"hits": cache.hits, "misses": cache.misses, "loaded_images": cache.loaded,
            "stored_images": len(cache), "stored_mb": round(cache.stored_bytes / 2**20, 1)}


def install_fast_scan_if_available() -> None:
    """Route Jamba's Mamba layers through ``longllava.scan`` (transformers' CPU fallback loops over time in
    Python: minutes per step for a demo-sized model); a no-op where the module is absent."""
    try:
        from longllava.scan import install_fast_scan
    except ImportError:
        return
    install_fast_scan()


def _point_adapter_at_base(adapter_dir: Path, base_path: str) -> None:
    config_path = adapter_dir / "adapter_config.json"
    if config_path.is_file():
        config = json.loads(config_path.read_text())
        config["base_model_name_or_path"] = str(Path(base_path).resolve()) if Path(base_path).exists() else base_path
        config_path.write_text(json.dumps(config, indent=2))
