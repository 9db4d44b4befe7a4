"""vLLM plugin: serve padd's students that have no shared expert.

A student of `padd decompose` without `--shared-neurons` (the paper's decomposition: every expert
routed) is a stock `Glm4MoeForCausalLM` whose config says `n_shared_experts: 0`. transformers can
express "no shared expert" only that way: it builds a zero-width shared MLP, which computes nothing,
and its config refuses `n_shared_experts: null`. vLLM does have a "no shared expert" mode
(`n_shared_experts is None`), but reads 0 as a shared MLP of width 0, and its CPU build dies with
SIGFPE on that zero-size matrix.

`register` is listed under vLLM's `vllm.general_plugins` entry point (pyproject.toml), so every vLLM
process in an environment where padd is installed calls it, `vllm serve STUDENT` included. It
registers a subclass of vLLM's own Glm4Moe that builds such a model in vLLM's no-shared-expert mode
and skips the zero-size tensors when loading; any other Glm4Moe checkpoint loads exactly as in stock
vLLM.
"""

from __future__ import annotations

ARCHITECTURE = "Glm4MoeForCausalLM"


def register() -> None:
    """Entry point of vLLM's plugin system; vLLM imports the class only when it builds that architecture."""
    from vllm import ModelRegistry

    ModelRegistry.register_model(ARCHITECTURE, "padd.generation.vllm_models:Glm4MoeForCausalLM")
