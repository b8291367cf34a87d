"""Fine-tuning and evaluation of LongLLaVA models: data, training (LoRA or full), merging, scoring."""

from __future__ import annotations

from longllava.errors import UserInputError


class FinetuneError(UserInputError):
    """Bad recipe, training data, checkpoint folder or evaluation set given to ``finetune``."""
