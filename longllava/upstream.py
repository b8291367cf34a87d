"""Convert a checkpoint in the original LongLLaVA layout (``llava_jamba``) into a LongLLaVA model folder.

Upstream layout (the original project's ``LlavaJambaForCausalLM`` on the Jamba code it ships, which
is AI21's Jamba-v0.1 remote code; a Jamba config with LLaVA's ``mm_*`` fields on top):

* config.json: ``model_type: llava_jamba``, Jamba fields (``hidden_size``, ``num_experts``, ``n_ctx``,
  ``mamba_inner_layernorms``, ...), ``mm_vision_tower``, ``mm_projector_type: mlp2x_gelu``,
  ``mm_vision_select_layer: -2``, ``mm_vision_select_feature: patch``, ``resamplePooling: 2d``
  (24x24 -> 12x12, applied to CLIP features before the projector);
* weights: ``model.embed_tokens``, ``model.layers.*`` and ``model.final_layernorm`` (Jamba),
  ``model.vision_tower.vision_tower.vision_model.*`` (CLIP; may be absent, then it comes from the
  local CLIP folder), ``model.mm_projector.{0,2}.*``, ``lm_head.weight``. Every feed-forward block is
  a ``moe`` module with one module per expert, ``moe.experts.{e}.{gate_proj,up_proj,down_proj}.weight``,
  and ``moe.router.weight`` when it has more than one expert; ``pre_moe_layernorm``;
  ``mamba.B_layernorm`` / ``mamba.C_layernorm``. The transformers 4 Jamba names (``feed_forward``,
  ``pre_ff_layernorm``, ``b_layernorm``, dense ``feed_forward.gate_proj``) are accepted too.

Our layout is transformers' LLaVA with a Jamba text model (transformers 5 Jamba code):

* ``model.language_model.*`` for the Jamba body;
* experts fused per layer (``JambaExperts``): ``feed_forward.experts.gate_up_proj`` of shape
  (E, 2*I, H) = per expert ``cat([gate_proj.weight, up_proj.weight], dim=0)`` (the forward pass
  splits ``linear(x, gate_up_proj[e]).chunk(2, dim=-1)`` into gate, up), and
  ``feed_forward.experts.down_proj`` (E, H, I) = the stacked ``down_proj.weight``;
* ``model.vision_tower.*`` (transformers 5's CLIPVisionModel has no ``vision_model.`` level);
  ``model.multi_modal_projector.linear_{1,2}.*``.

A layer with one expert (LongLLaVA-9B keeps expert 0) is a dense ``JambaMLP``: per-expert keys
``experts.0.*`` become ``feed_forward.{gate,up,down}_proj.weight`` and a one-expert router is dropped
(softmax over one expert is 1, so the output is unchanged). Every source tensor is either mapped or
dropped with a reason; anything else is an error, and the result is checked to cover every weight of
the model.
"""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
from transformers import CLIPVisionConfig, JambaConfig

from longllava.config import LongLlavaConfig
from longllava.errors import ModelInputError

UPSTREAM_MODEL_TYPE = "llava_jamba"
VISION_PREFIX = "model.vision_tower.vision_tower.vision_model."
_SOURCE_RENAMES = (  # AI21 remote-code names -> transformers names
    (re.compile(r"\.moe\."), ".feed_forward."),
    (re.compile(r"\.pre_moe_layernorm\."), ".pre_ff_layernorm."),
    (re.compile(r"\.mamba\.B_layernorm\."), ".mamba.b_layernorm."),
    (re.compile(r"\.mamba\.C_layernorm\."), ".mamba.c_layernorm."),
)
_EXPERT_KEY = re.compile(r"^model\.layers\.(\d+)\.feed_forward\.experts\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight$")
_ROUTER_KEY = re.compile(r"^model\.layers\.(\d+)\.feed_forward\.router\.weight$")
_DEFAULT_MAX_SHARD_BYTES = 4 << 30


@dataclass
class ConversionReport:
    """What happened to every source tensor."""

    source: Path
    destination: Path
    n_source_tensors: int = 0
    n_written_tensors: int = 0
    fused_expert_layers: int = 0
    dropped: dict[str, str] = field(default_factory=dict)
    added_image_token: bool = False
    vocab_size: int = 0

    def to_dict(self) -> dict[str, Any]:
        return {
            "source": str(self.source),
            "destination": str(self.destination),
            "source_tensors": self.n_source_tensors,
            "written_tensors": self.n_written_tensors,
            "fused_expert_layers": self.fused_expert_layers,
            "dropped": self.dropped,
            "added_image_token": self.added_image_token,
            "vocab_size": self.vocab_size,
        }


class _TensorSource:
    """Lazy access to the tensors of a checkpoint folder (safetensors, single or sharded; or .bin)."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.key_to_file: dict[str, Path] = {}
        self._bin_cache: dict[Path, dict[str, torch.Tensor]] = {}
        files = sorted(folder.glob("*.safetensors")) or sorted(folder.glob("pytorch_model*.bin"))
        if not files:
            raise ModelInputError(f"{folder} has no *.safetensors or pytorch_model*.bin: the weights are missing")
        for path in files:
            for key in self._keys_of(path):
                self.key_to_file[key] = path

    def _keys_of(self, path: Path) -> list[str]:
        if path.suffix == ".safetensors":
            from safetensors import safe_open

            with safe_open(path, framework="pt") as handle:
                return list(handle.keys())
        return list(self._load_bin(path))

    def _load_bin(self, path: Path) -> dict[str, torch.Tensor]:
        if path not in self._bin_cache:
            self._bin_cache[path] = torch.load(path, map_location="cpu", weights_only=True)
        return self._bin_cache[path]

    def keys(self) -> list[str]:
        return list(self.key_to_file)

    def get(self, key: str) -> torch.Tensor:
        path = self.key_to_file[key]
        if path.suffix == ".safetensors":
            from safetensors import safe_open

            with safe_open(path, framework="pt") as handle:
                return handle.get_tensor(key)
        return self._load_bin(path)[key]

    def shape(self, key: str) -> tuple[int, ...]:
        path = self.key_to_file[key]
        if path.suffix == ".safetensors":
            from safetensors import safe_open

            with safe_open(path, framework="pt") as handle:
                return tuple(handle.get_slice(key).get_shape())
        return tuple(self._load_bin(path)[key].shape)


def read_upstream_config(folder: Path) -> dict[str, Any]:
    config_path = folder / "config.json"
    if not folder.is_dir():
        raise ModelInputError(f"upstream checkpoint folder {folder} does not exist")
    if not config_path.is_file():
        raise ModelInputError(f"{folder} has no config.json: not an upstream LongLLaVA checkpoint")
    try:
        config = json.loads(config_path.read_text())
    except json.JSONDecodeError as error:
        raise ModelInputError(f"{config_path} is not valid JSON ({error})") from None
    if config.get("model_type") != UPSTREAM_MODEL_TYPE:
        raise ModelInputError(
            f"{config_path} has model_type {config.get('model_type')!r}, expected {UPSTREAM_MODEL_TYPE!r} "
            "(the original LongLLaVA layout)"
        )
    return config


def _text_config(upstream: dict[str, Any]) -> JambaConfig:
    """The Jamba fields of an upstream config (AI21's ``n_ctx`` is ``max_position_embeddings``)."""
    if upstream.get("mamba_inner_layernorms", True) is False:
        raise ModelInputError(
            "mamba_inner_layernorms is false: transformers' Jamba always normalises dt/B/C, so this "
            "checkpoint cannot be converted exactly"
        )
    names = {f.name for f in fields(JambaConfig)} - {"transformers_version", "architectures", "dtype"}
    kwargs = {k: v for k, v in upstream.items() if k in names}
    if "n_ctx" in upstream and "max_position_embeddings" not in upstream:
        kwargs["max_position_embeddings"] = upstream["n_ctx"]
    return JambaConfig(**kwargs)


def _local_clip_folder(upstream: dict[str, Any], vision_tower: Path | None) -> Path | None:
    """``--vision-tower`` if given, else ``mm_vision_tower`` when it names a local folder with config.json."""
    if vision_tower is not None:
        if not (vision_tower / "config.json").is_file():
            raise ModelInputError(f"--vision-tower {vision_tower} has no config.json: pass a local CLIP folder")
        return vision_tower
    named = upstream.get("mm_vision_tower")
    if named and (Path(named).expanduser() / "config.json").is_file():
        return Path(named).expanduser()
    return None


def _vision_config(upstream: dict[str, Any], weights: _TensorSource, vision_tower: Path | None) -> CLIPVisionConfig:
    """CLIP config: a local CLIP folder if given (or named by mm_vision_tower), else inferred from shapes."""
    clip_folder = _local_clip_folder(upstream, vision_tower)
    if clip_folder is not None:
        return CLIPVisionConfig.from_pretrained(clip_folder)
    patch_key = VISION_PREFIX + "embeddings.patch_embedding.weight"
    position_key = VISION_PREFIX + "embeddings.position_embedding.weight"
    if patch_key not in weights.key_to_file:
        raise ModelInputError(
            f"{weights.folder} has no vision tower weights ({patch_key}): pass --vision-tower with a local CLIP folder"
        )
    hidden, _, patch, _ = weights.shape(patch_key)
    n_positions = weights.shape(position_key)[0]
    grid = int(round((n_positions - 1) ** 0.5))
    layer_ids = {int(m.group(1)) for k in weights.keys() if (m := re.match(re.escape(VISION_PREFIX) + r"encoder\.layers\.(\d+)\.", k))}
    intermediate = weights.shape(VISION_PREFIX + "encoder.layers.0.mlp.fc1.weight")[0]
    return CLIPVisionConfig(
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=len(layer_ids),
        num_attention_heads=max(1, hidden // 64),
        patch_size=patch,
        image_size=grid * patch,
        projection_dim=upstream.get("mm_projection_dim", 768),
        hidden_act="quick_gelu",
    )


def convert_config(
    upstream: dict[str, Any], weights: _TensorSource, vision_tower: Path | None = None
) -> LongLlavaConfig:
    """Upstream ``llava_jamba`` config -> :class:`LongLlavaConfig` (checks projector, layer, pooling)."""
    projector = upstream.get("mm_projector_type", "mlp2x_gelu")
    if projector != "mlp2x_gelu":
        raise ModelInputError(f"mm_projector_type {projector!r} is not supported: only mlp2x_gelu")
    select_layer = upstream.get("mm_vision_select_layer", -2)
    if upstream.get("mm_vision_select_feature", "patch") != "patch":
        raise ModelInputError("mm_vision_select_feature must be 'patch' (CLS dropped)")
    vision = _vision_config(upstream, weights, vision_tower)
    patch_grid = vision.image_size // vision.patch_size
    pooling = upstream.get("resamplePooling")
    if pooling == "2d":
        pooled_grid = patch_grid // 2
    elif pooling in (None, "none", ""):
        pooled_grid = patch_grid
    else:
        raise ModelInputError(f"resamplePooling {pooling!r} is not supported: use '2d' (or none)")
    return LongLlavaConfig(
        vision_config=vision,
        text_config=_text_config(upstream),
        vision_feature_layer=select_layer,
        pooled_grid=pooled_grid,
        image_token_index=upstream.get("image_token_index", 0),
        tie_word_embeddings=bool(upstream.get("tie_word_embeddings", False)),
    )


def normalize_source_key(key: str) -> str:
    """AI21 remote-code Jamba names (``moe``, ``pre_moe_layernorm``, ``B_layernorm``) -> transformers names."""
    if not key.startswith("model.layers."):
        return key
    for pattern, replacement in _SOURCE_RENAMES:
        key = pattern.sub(replacement, key)
    return key


def _direct_name(key: str) -> str | None:
    """Target name of a one-to-one upstream key (None if it is not one)."""
    if key.startswith(VISION_PREFIX):
        return "model.vision_tower." + key[len(VISION_PREFIX) :]
    projector = re.match(r"^model\.mm_projector\.([02])\.(weight|bias)$", key)
    if projector:
        layer = {"0": "linear_1", "2": "linear_2"}[projector.group(1)]
        return f"model.multi_modal_projector.{layer}.{projector.group(2)}"
    if key == "lm_head.weight":
        return key
    if key.startswith("model.layers.") or key in ("model.embed_tokens.weight", "model.final_layernorm.weight"):
        return "model.language_model." + key[len("model.") :]
    return None


Recipe = Callable[[], torch.Tensor]


def plan_conversion(
    weights: _TensorSource, config: LongLlavaConfig, report: ConversionReport
) -> dict[str, Recipe]:
    """Target key -> a function producing its tensor; fills ``report.dropped``; errors on unknown keys."""
    text = config.text_config
    layer_experts = text.layers_num_experts
    recipes: dict[str, Recipe] = {}
    experts: dict[int, dict[int, dict[str, str]]] = {}
    for key in weights.keys():
        name = normalize_source_key(key)
        expert = _EXPERT_KEY.match(name)
        router = _ROUTER_KEY.match(name)
        if expert:
            layer, index, proj = int(expert.group(1)), int(expert.group(2)), expert.group(3)
            experts.setdefault(layer, {}).setdefault(index, {})[proj] = key
        elif router and layer_experts[int(router.group(1))] == 1:
            report.dropped[key] = "router of a one-expert layer (softmax over one expert is 1)"
        elif key.endswith("embeddings.position_ids"):
            report.dropped[key] = "position_ids buffer (recomputed by CLIP)"
        elif (target := _direct_name(name)) is not None:
            recipes[target] = lambda key=key: weights.get(key)
        else:
            raise ModelInputError(f"{weights.folder}: unexpected weight {key!r} in the upstream checkpoint")
    for layer, per_expert in sorted(experts.items()):
        recipes.update(_expert_recipes(weights, layer, per_expert, layer_experts[layer], report))
    return recipes


def _expert_recipes(
    weights: _TensorSource, layer: int, per_expert: dict[int, dict[str, str]], n_experts: int, report: ConversionReport
) -> dict[str, Recipe]:
    prefix = f"model.language_model.layers.{layer}.feed_forward"
    found = sorted(per_expert)
    if n_experts == 1:
        if found != [0]:
            raise ModelInputError(f"layer {layer} is dense (num_experts 1) but the checkpoint has experts {found}")
        keys = per_expert[0]
        return {f"{prefix}.{proj}.weight": (lambda k=keys[proj]: weights.get(k)) for proj in keys}
    if found != list(range(n_experts)) or any(len(p) != 3 for p in per_expert.values()):
        raise ModelInputError(
            f"layer {layer} should have experts 0..{n_experts - 1} with gate/up/down weights, found {found}"
        )
    report.fused_expert_layers += 1

    def gate_up() -> torch.Tensor:
        # per expert (I, H) gate and (I, H) up -> (2I, H); stacked -> (E, 2I, H)
        return torch.stack(
            [torch.cat([weights.get(p["gate_proj"]), weights.get(p["up_proj"])], dim=0) for _, p in sorted(per_expert.items())]
        )

    def down() -> torch.Tensor:
        # per expert (H, I) -> (E, H, I)
        return torch.stack([weights.get(p["down_proj"]) for _, p in sorted(per_expert.items())])

    return {f"{prefix}.experts.gate_up_proj": gate_up, f"{prefix}.experts.down_proj": down}


_CLIP_UNUSED = re.compile(r"^(text_model\.|text_projection\.|visual_projection\.|logit_scale$)")
_CLIP_VISION_TOP = ("embeddings.", "encoder.", "pre_layrnorm.", "post_layernorm.")


def plan_vision_tower_from_clip(clip_folder: Path, report: ConversionReport) -> dict[str, Recipe]:
    """Vision-tower weights from a local CLIP folder, for upstream checkpoints saved without them.

    Accepts a CLIPModel checkpoint (``vision_model.*``; the text tower, projections and logit scale are
    dropped as unused) or a CLIPVisionModel saved by transformers 5 (``embeddings.*``, ``encoder.*``...).
    """
    source = _TensorSource(clip_folder)
    recipes: dict[str, Recipe] = {}
    for key in source.keys():
        name = key[len("vision_model.") :] if key.startswith("vision_model.") else key
        if _CLIP_UNUSED.match(key):
            report.dropped[f"{clip_folder.name}:{key}"] = "CLIP text tower / projections (unused by LongLLaVA)"
        elif name.endswith("embeddings.position_ids"):
            report.dropped[f"{clip_folder.name}:{key}"] = "position_ids buffer (recomputed by CLIP)"
        elif name.startswith(_CLIP_VISION_TOP):
            recipes["model.vision_tower." + name] = lambda key=key: source.get(key)
        else:
            raise ModelInputError(f"{clip_folder}: unexpected weight {key!r} in the CLIP checkpoint")
    report.n_source_tensors += len(source.keys())
    return recipes


def _expected_shapes(config: LongLlavaConfig) -> dict[str, tuple[int, ...]]:
    from longllava.modeling import LongLlavaForConditionalGeneration

    with torch.device("meta"):
        model = LongLlavaForConditionalGeneration(config)
    return {name: tuple(t.shape) for name, t in model.state_dict().items()}


def _prepare_tokenizer(src: Path, tokenizer_dir: Path | None, config: LongLlavaConfig, report: ConversionReport) -> Any:
    from transformers import AutoTokenizer

    from longllava import protocol

    folder = tokenizer_dir or src
    if not (folder / "tokenizer.json").is_file() and not (folder / "tokenizer_config.json").is_file():
        raise ModelInputError(f"{folder} has no tokenizer files (tokenizer.json): pass --tokenizer with a tokenizer folder")
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder)
    except (OSError, ValueError, ImportError, KeyError, TypeError) as error:
        first_line = (str(error).strip().splitlines() or [type(error).__name__])[0]
        raise ModelInputError(
            f"cannot load the tokenizer in {folder} ({first_line}); a tokenizer.model-only (sentencepiece) "
            "tokenizer needs the sentencepiece package, or pass --tokenizer with a folder holding tokenizer.json"
        ) from None
    if protocol.IMAGE_TOKEN not in tokenizer.get_vocab():
        tokenizer.add_special_tokens({"additional_special_tokens": [protocol.IMAGE_TOKEN]})
        report.added_image_token = True
    if not tokenizer.chat_template:
        tokenizer.chat_template = protocol.CHAT_TEMPLATE
    config.image_token_id = tokenizer.convert_tokens_to_ids(protocol.IMAGE_TOKEN)
    return tokenizer


def _resize_vocab(recipes: dict[str, Recipe], config: LongLlavaConfig, n_tokens: int) -> None:
    """Grow embeddings/lm_head to cover added tokens (new rows = mean of the old rows)."""
    old = config.text_config.vocab_size
    if n_tokens <= old:
        return
    new = -(-n_tokens // 64) * 64
    for key in ("model.language_model.embed_tokens.weight", "lm_head.weight"):
        if key not in recipes:
            continue
        produce = recipes[key]

        def padded(produce: Recipe = produce) -> torch.Tensor:
            weight = produce()  # (old, H) -> (new, H)
            extra = weight.float().mean(dim=0, keepdim=True).expand(new - old, -1).to(weight.dtype)
            return torch.cat([weight, extra], dim=0)

        recipes[key] = padded
    config.text_config.vocab_size = new


def convert_upstream(
    src: str | Path,
    dst: str | Path,
    vision_tower: str | Path | None = None,
    tokenizer: str | Path | None = None,
    dtype: torch.dtype | None = None,
    max_shard_bytes: int = _DEFAULT_MAX_SHARD_BYTES,
    overwrite: bool = False,
) -> ConversionReport:
    """Convert an upstream LongLLaVA folder ``src`` into a model folder ``dst`` loadable by ``load_model``."""
    src, dst = Path(src).expanduser(), Path(dst).expanduser()
    upstream = read_upstream_config(src)
    if dst.exists() and any(dst.iterdir()) and not overwrite:
        raise ModelInputError(f"destination {dst} exists and is not empty: choose a new folder or pass --overwrite")
    weights = _TensorSource(src)
    report = ConversionReport(source=src, destination=dst, n_source_tensors=len(weights.keys()))
    config = convert_config(upstream, weights, Path(vision_tower) if vision_tower else None)
    recipes = plan_conversion(weights, config, report)
    if not any(key.startswith(VISION_PREFIX) for key in weights.keys()):
        clip_folder = _local_clip_folder(upstream, Path(vision_tower) if vision_tower else None)
        if clip_folder is None:
            raise ModelInputError(
                f"{src} has no vision tower weights ({VISION_PREFIX}*) and mm_vision_tower is not a local folder: "
                "pass --vision-tower with a local CLIP folder"
            )
        recipes.update(plan_vision_tower_from_clip(clip_folder, report))
    processor_tokenizer = _prepare_tokenizer(src, Path(tokenizer) if tokenizer else None, config, report)
    _resize_vocab(recipes, config, len(processor_tokenizer))
    expected = _expected_shapes(config)
    missing, unexpected = sorted(set(expected) - set(recipes)), sorted(set(recipes) - set(expected))
    if missing or unexpected:
        detail = f"missing {missing[:3]}" if missing else f"unexpected {unexpected[:3]}"
        raise ModelInputError(f"{src}: converted weights do not match the model ({detail})")
    dst.mkdir(parents=True, exist_ok=True)
    report.n_written_tensors = _write_shards(recipes, expected, dst, dtype, max_shard_bytes)
    report.vocab_size = config.text_config.vocab_size
    config.architectures = ["LongLlavaForConditionalGeneration"]
    config.save_pretrained(dst)
    _save_processor(config, processor_tokenizer, dst)
    _write_generation_config(src, dst, processor_tokenizer)
    return report


def _write_shards(
    recipes: dict[str, Recipe], expected: dict[str, tuple[int, ...]], dst: Path, dtype: torch.dtype | None, max_bytes: int
) -> int:
    """Produce tensors one at a time and write them in shards of at most ``max_bytes``."""
    from safetensors.torch import save_file

    shards: list[list[str]] = []
    current: dict[str, torch.Tensor] = {}
    current_bytes = total_bytes = 0
    for key in sorted(recipes):
        tensor = recipes[key]()
        if tuple(tensor.shape) != expected[key]:
            raise ModelInputError(f"{key}: converted shape {tuple(tensor.shape)} does not match the model {expected[key]}")
        tensor = (tensor.to(dtype) if dtype is not None else tensor).contiguous()
        n_bytes = tensor.numel() * tensor.element_size()
        if current and current_bytes + n_bytes > max_bytes:
            save_file(current, dst / f"shard-{len(shards):05d}.tmp", metadata={"format": "pt"})
            shards.append(list(current))
            current, current_bytes = {}, 0
        current[key] = tensor
        current_bytes += n_bytes
        total_bytes += n_bytes
    if not shards:
        save_file(current, dst / "model.safetensors", metadata={"format": "pt"})
        return len(current)
    save_file(current, dst / f"shard-{len(shards):05d}.tmp", metadata={"format": "pt"})
    shards.append(list(current))
    weight_map = {}
    for i, keys in enumerate(shards):
        final = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        (dst / f"shard-{i:05d}.tmp").rename(dst / final)
        weight_map.update({key: final for key in keys})
    index = {"metadata": {"total_size": total_bytes}, "weight_map": weight_map}
    (dst / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    return len(weight_map)


def _save_processor(config: LongLlavaConfig, tokenizer: Any, dst: Path) -> None:
    from longllava.processor import LongLlavaProcessor

    LongLlavaProcessor.from_config(config, tokenizer).save_pretrained(dst)


def _write_generation_config(src: Path, dst: Path, tokenizer: Any) -> None:
    """Upstream generation_config.json if present, else one with the tokenizer's bos/eos/pad ids."""
    from transformers import GenerationConfig

    if (src / "generation_config.json").is_file():
        shutil.copy(src / "generation_config.json", dst / "generation_config.json")
        return
    GenerationConfig(
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id
    ).save_pretrained(dst)
