"""Stage ``vision``: pretrain the vision tower on labelled single images before any text stage.

A vision tower trained from random weights learns far faster from a direct per-image loss than through
a randomly initialised projector and LLM (the demo model's CT and satellite answers stayed blind after
hours of text-only training; with a label head its slice features separate within minutes). This stage
is that CLIP-pretraining substitute: every token of the tower's pooled patch grid -- exactly the features
the projector later receives -- goes through one shared linear map to label logits, pooled over the grid
(:class:`VisionLabelHead`) and trained with binary cross-entropy; the head is discarded for the text
stages (it is saved beside the model for measuring).

Records (a JSON list or JSONL), one image each and the names of the labels that hold for it::

    {"id": "ct_0001_s03", "images": ["slice.png"], "labels": ["ct lung nodule", "ct lung nodule left"]}

A record with several images is a *bag* (multiple-instance learning): its labels hold for the set -- at
least one image shows each -- and the head pools its logits over every token of every image, so a
study's slices can be trained against the study's findings.

A single-image record may also say *where* its labels are: ``token_labels`` maps label names to the
cells (row-major) of the model's ``token_grid`` x ``token_grid`` pooled grid that show them (an empty list:
no cell does), e.g. ``"token_grid": 5, "token_labels": {"ct lung nodule": [13], "ct consolidation": []}``.
With the recipe's ``vision_token_loss_weight`` above 0 each named label's per-token logits are trained
against those cells too (binary cross-entropy over the tokens, added to the pooled loss times the weight),
so a small finding's evidence is put into the token that sees it instead of being left to the pooled
(multiple-instance) loss alone; ``finetune.demo_data`` writes them for every CT slab from the phantoms'
label maps. The recipe's ``vision_label_weights`` (label-name prefix -> weight, e.g. ``{"niah shape": 4}``)
scale chosen labels' cross-entropy terms in both losses.

The label vocabulary is the sorted set of names in the training files; an image with ``labels: []``
is a negative for every label. Outputs: ``OUTPUT/model`` (the whole LongLLaVA model, only its vision
tower changed), ``OUTPUT/vision_head.safetensors`` + ``OUTPUT/vision_labels.json`` (the head and its
label order), plus the usual ``loss.csv``/``loss.png``, ``recipe.yaml`` and ``training_summary.json``.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from finetune.data import DataError, processor_image_loader, read_json_records

VISION_HEAD_FILE = "vision_head.safetensors"
VISION_LABELS_FILE = "vision_labels.json"


@dataclass(frozen=True)
class LabelledImage:
    """One image and the names of the labels that hold for it; ``where`` names file and line."""

    id: str
    images: tuple[Path, ...]
    labels: tuple[str, ...]
    where: str
    # per-token targets of a single image: label -> the row-major cells of its token_grid x token_grid
    # pooled grid that show it (an empty list: none does); labels not named here have no token target
    token_labels: dict[str, tuple[int, ...]] | None = None
    token_grid: int | None = None

    @property
    def image(self) -> Path:
        """The record's one image; a bag has no single image."""
        if len(self.images) != 1:
            raise DataError(f"{self.where}: a bag of {len(self.images)} images has no single image")
        return self.images[0]


def parse_labelled_image(raw: dict, where: str, root: Path) -> LabelledImage:
    images = raw.get("images", raw.get("image"))
    images = [images] if isinstance(images, str) else images
    if not isinstance(images, list) or not images or not all(isinstance(image, str) for image in images):
        raise DataError(f"{where}: a vision-stage record needs a list of image paths in 'images' (one image, "
                        f"or several for a bag), got {images!r}")
    labels = raw.get("labels")
    if not isinstance(labels, list) or not all(isinstance(name, str) and name for name in labels):
        raise DataError(f"{where}: 'labels' must be a list of label names (an empty list for none), got {labels!r}")
    paths = tuple(Path(image) if Path(image).is_absolute() else root / image for image in images)
    for path in paths:
        if not path.is_file():
            raise DataError(f"{where}: image {path} does not exist; fix the path or the image_root")
    token_labels, token_grid = _parse_token_labels(raw, where, len(paths))
    return LabelledImage(str(raw.get("id", where)), paths, tuple(labels), where, token_labels, token_grid)


def _parse_token_labels(raw: dict, where: str, n_images: int) -> tuple[dict[str, tuple[int, ...]] | None, int | None]:
    if "token_labels" not in raw:
        return None, None
    token_labels, grid = raw["token_labels"], raw.get("token_grid")
    if n_images != 1:
        raise DataError(f"{where}: 'token_labels' are per-token targets of one image; a bag of {n_images} "
                        "images cannot have them")
    if not isinstance(grid, int) or grid < 1:
        raise DataError(f"{where}: 'token_labels' need 'token_grid', the side of the pooled token grid "
                        f"(e.g. 5 for 5 x 5 tokens), got {grid!r}")
    if not isinstance(token_labels, dict):
        raise DataError(f"{where}: 'token_labels' must map label names to lists of token cells, got {token_labels!r}")
    parsed = {}
    for name, cells in token_labels.items():
        if not isinstance(cells, list) or not all(isinstance(c, int) and 0 <= c < grid * grid for c in cells):
            raise DataError(f"{where}: token_labels[{name!r}] must list cells 0..{grid * grid - 1} of the "
                            f"{grid} x {grid} grid, got {cells!r}")
        parsed[name] = tuple(cells)
    return parsed, grid


def load_labelled_images(path: str | Path, image_root: str | Path | None = None) -> list[LabelledImage]:
    """The records of one vision-stage data file; relative image paths start at ``image_root``
    (default: the file's folder)."""
    root = Path(image_root) if image_root else Path(path).parent
    return [parse_labelled_image(raw, where, root) for where, raw in read_json_records(path)]


def label_vocabulary(records: Sequence[LabelledImage]) -> list[str]:
    """Every label name the records give, in ``labels`` or as a key of ``token_labels``, sorted."""
    names = {name for record in records for name in record.labels}
    names = sorted(names | {name for record in records for name in (record.token_labels or {})})
    if not names:
        raise DataError("the vision-stage records name no labels at all; every record has 'labels': []")
    return names


def multi_hot(labels: Sequence[str], vocabulary: Sequence[str]) -> torch.Tensor:
    index = {name: i for i, name in enumerate(vocabulary)}
    target = torch.zeros(len(vocabulary))
    for name in labels:
        if name not in index:
            raise DataError(f"label {name!r} is not in the head's vocabulary ({len(vocabulary)} labels)")
        target[index[name]] = 1.0
    return target


def token_targets(record: LabelledImage, vocabulary: Sequence[str], grid: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(grid * grid, n_labels)`` per-token targets of a record and the ``(n_labels,)`` mask of the labels
    that have them (all zero for a record without ``token_labels``)."""
    targets, mask = torch.zeros(grid * grid, len(vocabulary)), torch.zeros(len(vocabulary), dtype=torch.bool)
    if record.token_labels is None:
        return targets, mask
    if record.token_grid != grid:
        raise DataError(f"{record.where}: token_grid {record.token_grid} is not the model's pooled grid {grid}; "
                        f"rewrite the records for a {grid} x {grid} grid")
    index = {name: i for i, name in enumerate(vocabulary)}
    for name, cells in record.token_labels.items():
        if name not in index:
            raise DataError(f"{record.where}: token label {name!r} is not in the head's vocabulary "
                            f"({len(vocabulary)} labels)")
        mask[index[name]] = True
        targets[list(cells), index[name]] = 1.0
    return targets, mask


class LabelledImageDataset:
    """Items ``{"pixel_values": (n_images, 3, H, W), "labels": (n_labels,)}`` plus, when ``token_grid`` is
    given, ``token_targets`` (grid * grid, n_labels) and ``token_mask`` (n_labels,) (:func:`token_targets`);
    pixels are read per item. Batch them with :func:`collate_bags`."""

    def __init__(self, records: Sequence[LabelledImage], vocabulary: Sequence[str], image_processor: Any,
                 token_grid: int | None = None) -> None:
        self.records = list(records)
        self.vocabulary = list(vocabulary)
        self.load = processor_image_loader(image_processor)
        self.token_grid = token_grid

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> dict:
        record = self.records[index]
        item = {"pixel_values": self.load(list(record.images)), "labels": multi_hot(record.labels, self.vocabulary)}
        if self.token_grid is not None:
            item["token_targets"], item["token_mask"] = token_targets(record, self.vocabulary, self.token_grid)
        return item


def collate_bags(items: Sequence[dict]) -> dict:
    """Items of :class:`LabelledImageDataset` -> ``pixel_values`` (all images, in order), ``labels``
    (n_records, n_labels) and ``bag_sizes`` (n_records,): how many images each record holds; with token
    targets also ``token_targets`` (n_records, t, n_labels) and ``token_mask`` (n_records, n_labels)."""
    batch = {"pixel_values": torch.cat([item["pixel_values"] for item in items]),
             "labels": torch.stack([item["labels"] for item in items]),
             "bag_sizes": torch.tensor([len(item["pixel_values"]) for item in items])}
    if "token_targets" in items[0]:
        batch["token_targets"] = torch.stack([item["token_targets"] for item in items])
        batch["token_mask"] = torch.stack([item["token_mask"] for item in items])
    return batch


def log_mean_exp(logits: torch.Tensor, dim: int) -> torch.Tensor:
    """The head's pooling, a soft maximum: ``log(mean(exp(logits)))`` over ``dim``."""
    return torch.logsumexp(logits, dim=dim) - math.log(logits.shape[dim])


class VisionLabelHead(nn.Module):
    """Vision tower -> the pooled patch grid the projector sees -> one linear map per token -> logits
    pooled over the grid (log-mean-exp: a soft maximum).

    The same linear map for every token, not one weight per grid position: each image token must carry
    the evidence it sees (a nodule, "fluid on the left") by itself, wherever it sits, because the
    language model that later reads these tokens finds them by content (Jamba's attention layers have no
    position encoding). A head over the flattened grid read the demo's slices just as well but left
    features the language model did not learn to read. Holds the LongLLaVA model's own
    ``vision_tower`` module, so training this updates the model in place.
    """

    def __init__(self, vision_tower: nn.Module, feature_layer: int, pooled_grid: int, n_labels: int,
                 token_loss_weight: float = 1.0, label_weights: torch.Tensor | None = None) -> None:
        super().__init__()
        self.vision_tower = vision_tower
        self.feature_layer = feature_layer
        self.pooled_grid = pooled_grid
        self.token_loss_weight = token_loss_weight
        self.head = nn.Linear(vision_tower.config.hidden_size, n_labels)
        if label_weights is not None and tuple(label_weights.shape) != (n_labels,):
            raise ValueError(f"label_weights of shape {tuple(label_weights.shape)}, expected ({n_labels},)")
        # (n_labels,) weight of each label's cross-entropy terms; follows the head's device, not saved with it
        self.register_buffer("label_weights", None if label_weights is None else label_weights.float(),
                             persistent=False)

    def features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(n, 3, H, W) -> pooled token features (n, pooled_grid**2, width)."""
        from longllava.modeling import pooled_patch_features

        hidden = self.vision_tower(pixel_values, output_hidden_states=True, return_dict=True).hidden_states
        return pooled_patch_features(hidden, self.feature_layer, self.pooled_grid)

    def token_logits(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(n, 3, H, W) -> per-token label logits (n, pooled_grid**2, n_labels)."""
        return self.head(self.features(pixel_values))

    def forward(self, pixel_values: torch.Tensor, labels: torch.Tensor | None = None,
                bag_sizes: torch.Tensor | None = None, token_targets: torch.Tensor | None = None,
                token_mask: torch.Tensor | None = None) -> dict:
        """``bag_sizes`` (n_records,): consecutive images pooled together (default: one per record).
        ``token_targets`` (n_images, t, L) with ``token_mask`` (n_images, L): per-token targets of the
        masked labels (single images only), whose binary cross-entropy over those tokens is added to the
        loss, times ``token_loss_weight``."""
        per_token = self.token_logits(pixel_values)  # (n_images, t, L)
        if bag_sizes is not None and bool((bag_sizes != 1).any()):
            if int(bag_sizes.sum()) != per_token.shape[0]:
                raise ValueError(f"bag sizes add up to {int(bag_sizes.sum())}, but {per_token.shape[0]} images came")
            # each bag's (images * t, L) tokens, pooled alike
            bags = [bag.flatten(0, 1) for bag in per_token.split(bag_sizes.tolist())]
            logits = torch.stack([log_mean_exp(bag, dim=0) for bag in bags])
        else:
            logits = log_mean_exp(per_token, dim=1)  # (n, L)
        weights = self.label_weights
        loss = None if labels is None else nn.functional.binary_cross_entropy_with_logits(
            logits, labels.float(), weight=weights)
        if loss is not None and token_mask is not None and bool(token_mask.any()) and self.token_loss_weight:
            if token_targets is None or token_targets.shape != per_token.shape:
                raise ValueError(f"token targets of shape {None if token_targets is None else tuple(token_targets.shape)}"
                                 f" do not match the token logits {tuple(per_token.shape)} (single images only)")
            chosen = token_mask[:, None, :].expand_as(per_token)  # (n_images, t, L): the labels with targets
            token_weights = None if weights is None else weights.expand_as(per_token)[chosen]
            token_loss = nn.functional.binary_cross_entropy_with_logits(
                per_token[chosen], token_targets[chosen].float(), weight=token_weights)
            loss = loss + self.token_loss_weight * token_loss
        return {"loss": loss, "logits": logits}


def vision_label_head(model: Any, n_labels: int, seed: int, token_loss_weight: float = 1.0,
                      label_weights: torch.Tensor | None = None) -> VisionLabelHead:
    """A head over ``model``'s vision tower (seeded init of the new linear layer)."""
    config = model.config
    torch.manual_seed(seed)
    return VisionLabelHead(model.model.vision_tower, config.vision_feature_layer, config.pooled_grid, n_labels,
                           token_loss_weight, label_weights)


def label_weight_vector(vocabulary: Sequence[str], weights_by_prefix: dict[str, float]) -> torch.Tensor | None:
    """(n_labels,) loss weights: each label takes the weight of the longest prefix in ``weights_by_prefix``
    it starts with, else 1 (None when no weights are given). A prefix no label starts with is an error."""
    if not weights_by_prefix:
        return None
    unused = [prefix for prefix in weights_by_prefix if not any(name.startswith(prefix) for name in vocabulary)]
    if unused:
        raise DataError(f"label weight prefix(es) {', '.join(map(repr, unused))} match no label of the training "
                        f"files ({len(vocabulary)} labels, e.g. {', '.join(map(repr, list(vocabulary)[:4]))})")
    vector = torch.ones(len(vocabulary))
    for i, name in enumerate(vocabulary):
        matching = [prefix for prefix in weights_by_prefix if name.startswith(prefix)]
        if matching:
            vector[i] = float(weights_by_prefix[max(matching, key=len)])
    return vector


def save_head(head: VisionLabelHead, vocabulary: Sequence[str], output_dir: Path) -> None:
    from safetensors.torch import save_file

    save_file({k: v.detach().contiguous() for k, v in head.head.state_dict().items()}, str(output_dir / VISION_HEAD_FILE))
    (output_dir / VISION_LABELS_FILE).write_text(json.dumps(list(vocabulary), indent=1) + "\n")


def load_head(model: Any, run_dir: str | Path) -> tuple[VisionLabelHead, list[str]]:
    """The head a vision stage saved in ``run_dir``, over ``model``'s vision tower, and its labels."""
    from safetensors.torch import load_file

    run_dir = Path(run_dir)
    for name in (VISION_HEAD_FILE, VISION_LABELS_FILE):
        if not (run_dir / name).is_file():
            raise DataError(f"{run_dir / name} is missing: is {run_dir} the output_dir of a stage-'vision' run?")
    vocabulary = json.loads((run_dir / VISION_LABELS_FILE).read_text())
    with torch.random.fork_rng():  # the throwaway init must not reseed the caller's run
        head = vision_label_head(model, len(vocabulary), seed=0)
    head.head.load_state_dict(load_file(str(run_dir / VISION_HEAD_FILE)))
    return head.eval(), vocabulary


@torch.no_grad()
def label_logits(head: VisionLabelHead, records: Sequence[LabelledImage], image_processor: Any,
                 batch_size: int = 64) -> torch.Tensor:
    """(n_records, n_labels) pooled logits of the head on ``records`` (a bag: pooled over its images)."""
    load = processor_image_loader(image_processor)
    chunks = []
    for start in range(0, len(records), batch_size):
        batch = records[start:start + batch_size]
        pixels = load([path for record in batch for path in record.images])
        sizes = torch.tensor([len(record.images) for record in batch])
        chunks.append(head(pixels, bag_sizes=sizes)["logits"])
    return torch.cat(chunks) if chunks else torch.zeros(0, head.head.out_features)


def label_probabilities(head: VisionLabelHead, records: Sequence[LabelledImage], image_processor: Any,
                        batch_size: int = 64) -> torch.Tensor:
    """(n_records, n_labels) sigmoid probabilities of the head on ``records`` (a bag: pooled over its images)."""
    return torch.sigmoid(label_logits(head, records, image_processor, batch_size))


def bag_logits(image_logits: torch.Tensor) -> torch.Tensor:
    """(n_images, L) pooled logits of single images -> (L,) those of the bag of them all: every image has
    the same number of tokens, so the log-mean-exp over all tokens is the log-mean-exp of the images'."""
    return log_mean_exp(image_logits, dim=0)


def init_projector_from_head(model: Any, run_dir: str | Path, scale: float) -> list[str]:
    """Write a vision stage's label head into the first rows of the projector's first layer.

    Row ``i`` of ``multi_modal_projector.linear_1`` becomes ``scale`` times the head's map for label
    ``i`` (weight and bias), so every image token enters the language model with its label evidence as
    clean coordinates of the projector's hidden layer (GELU keeps the positive evidence, damps the rest);
    the other rows keep their values. Returns the label names in row order. Full fine-tuning only: a LoRA
    adapter is saved against the unchanged base model.
    """
    head, vocabulary = load_head(model, run_dir)
    first = model.model.multi_modal_projector.linear_1
    if first.in_features != head.head.in_features or first.out_features < len(vocabulary):
        raise DataError(
            f"{Path(run_dir) / VISION_HEAD_FILE}: a head from {head.head.in_features} features to "
            f"{len(vocabulary)} labels does not fit the projector's first layer ({first.in_features} -> "
            f"{first.out_features}); use the vision stage run of this model's preset"
        )
    with torch.no_grad():
        first.weight[: len(vocabulary)] = scale * head.head.weight
        first.bias[: len(vocabulary)] = scale * head.head.bias
    return vocabulary
