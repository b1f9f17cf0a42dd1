"""Reference models for lpdist experiments: ``llama`` (Llama with size presets)."""

from lpdist.models.llama import (
    PRESETS,
    Llama,
    LlamaConfig,
    SwiGLUMLP,
    count_parameters,
    flops_per_token,
    preset,
)

__all__ = ["PRESETS", "Llama", "LlamaConfig", "SwiGLUMLP", "count_parameters", "flops_per_token", "preset"]
