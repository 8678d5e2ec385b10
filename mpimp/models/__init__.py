"""Reference models built from mpimp's tensor-parallel layers."""

from __future__ import annotations

from .gpt import GPT, GPTConfig, PipelineParts, gather_logits, gpt_pipeline_layers

__all__ = ["GPT", "GPTConfig", "PipelineParts", "gather_logits", "gpt_pipeline_layers"]
