"""Sampling completions for Phase B and evaluation: the `Rollout` batch and its two backends,
transformers' `generate` on the training model (`rollout.TransformersRollout`) and a vLLM engine
(`vllm.VLLMRollout`)."""

from __future__ import annotations

from padd.generation.rollout import RolloutBackend, TransformersRollout
from padd.generation.vllm import VLLMRollout, engine_length
from padd.routing import moe_layer_indices


def rollout_backend(cfg, model, tokenizer, *, rank: int, main: bool, sharded: bool) -> RolloutBackend:
    """The backend `cfg.rollout` (a TrainConfig) names, sampling from `model` on this rank."""
    if cfg.rollout == "transformers":
        # Sharded, every rank must run as many forwards as the slowest: generate keeps them in step.
        return TransformersRollout(model, tokenizer, synced=sharded, record_routing=True)
    length = engine_length(getattr(model.config, "max_position_embeddings", None), cfg.max_new_tokens)
    return VLLMRollout(
        cfg.student,
        tokenizer,
        moe_layers=moe_layer_indices(model),
        device=cfg.device,
        dtype="bfloat16" if cfg.precision == "bf16" else "float32",
        gpu_memory_utilization=cfg.vllm_gpu_memory,
        max_model_len=cfg.vllm_max_model_len or length,
        require_routing=cfg.routing_replay,
        seed=cfg.seed * 1_000_003 + rank,
        progress=cfg.progress and main,
    )
