"""Bit-reproducible training on a CPU at a given thread count.

The one nondeterministic kernel padd's CPU runs meet is the accumulating `index_put_` that
autograd runs for the backward of advanced indexing (the experts' token gather, the embedding):
its parallel kernel adds rows in whatever order the threads reach them, so at 2+ threads two runs
of the same warm-up or Phase B drift apart from the first step. PyTorch's deterministic mode takes
its sorted, fixed-order path instead, which measured as fast here (a tiny-world warm-up of 65,536
tokens: 8.0 s against 8.5-10.4 s at 2 threads).

Only on a CPU: on CUDA the mode would also need CUBLAS_WORKSPACE_CONFIG and raise in kernels that
have no deterministic version, and it has not run there.
"""

from __future__ import annotations

import torch


def deterministic_kernels(device: str | torch.device) -> None:
    """Make this process's CPU kernels deterministic (torch.use_deterministic_algorithms) when the
    run trains on `device` = cpu; a kernel without a deterministic version warns instead of raising."""
    if torch.device(device).type == "cpu":
        torch.use_deterministic_algorithms(True, warn_only=True)
        # The mode would also fill every torch.empty with NaN, which costs a write of each new
        # tensor (accelerate's init_empty_weights creates each parameter on the CPU before moving
        # it to the meta device: counting Qwen2.5-Math-7B's parameters took 4.6 s instead of
        # 0.15 s); padd reads no memory it has not written, so the fill is off.
        torch.utils.deterministic.fill_uninitialized_memory = False
