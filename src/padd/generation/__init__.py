"""Sampling completions for Phase B and evaluation: the `Rollout` batch and its backends,
transformers' `generate` on the training model (`rollout.TransformersRollout`), a vLLM engine
beside the trainer (`vllm.VLLMRollout`) and a vLLM server of its own (`vllm_server.VLLMServerRollout`)."""

from __future__ import annotations

from padd.generation.rollout import RolloutBackend, TransformersRollout
from padd.generation.vllm import VLLMRollout, engine_length
from padd.routing import moe_layer_indices


def rollout_backend(cfg, model, tokenizer, *, dist, sharded: bool) -> RolloutBackend:
    """The backend `cfg.rollout` (a TrainConfig) names, sampling from `model` on this rank
    (`dist`: padd.distributed.Dist)."""
    if cfg.rollout == "transformers":
        # Sharded, every rank must run as many forwards as the slowest: generate keeps them in step.
        return TransformersRollout(model, tokenizer, synced=sharded, record_routing=True)
    if cfg.rollout == "vllm-server":
        from padd.generation.vllm_server import VLLMServerRollout

        return VLLMServerRollout(
            cfg.vllm_server_url,
            cfg.student,
            tokenizer,
            model,
            weights_dir=cfg.out,
            max_new_tokens=cfg.max_new_tokens,
            dist=dist,
            device=dist.device(cfg.device),  # the collectives' device (not the weights': CPU under --offload)
        )
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
        sleep=cfg.vllm_sleep,
        seed=cfg.seed * 1_000_003 + dist.rank,
        progress=cfg.progress and dist.main,
    )
