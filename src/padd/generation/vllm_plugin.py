"""vLLM plugin: serve padd's students that have no shared expert, and take a trainer's weights from a file.

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
vLLM. It also registers the weight-transfer backend `padd_safetensors`
(`padd.generation.vllm_transfer`), which a server started for `padd train --rollout vllm-server`
names in its `--weight-transfer-config`.
"""

from __future__ import annotations

import contextlib

ARCHITECTURE = "Glm4MoeForCausalLM"
TRANSFER_BACKEND = "padd_safetensors"  # padd.generation.vllm_transfer.BACKEND, without importing vLLM's worker code


def register() -> None:
    """Entry point of vLLM's plugin system; vLLM imports the classes only when it builds them."""
    from vllm import ModelRegistry

    ModelRegistry.register_model(ARCHITECTURE, "padd.generation.vllm_models:Glm4MoeForCausalLM")
    try:
        from vllm.distributed.weight_transfer import WeightTransferEngineFactory
    except ImportError:  # a vLLM without the weight-transfer API: only --rollout vllm-server needs it
        return
    with contextlib.suppress(ValueError):  # registered already: plugins may be loaded more than once in a process
        WeightTransferEngineFactory.register_engine(
            TRANSFER_BACKEND, "padd.generation.vllm_transfer", "SafetensorsFileEngine"
        )
