"""LongLLaVA: hybrid Mamba/Transformer multimodal model core (knows nothing about CT or satellites)."""

__version__ = "0.1.0"
