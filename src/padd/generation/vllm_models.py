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
