"""padd: Path-Aligned Decompression Distillation — turn a dense teacher into a standard MoE student.

The public functions are importable from the package top (`padd.grade(prediction, gold)`,
`padd.balanced_kmeans(x, k)`, the Phase B losses); each module loads on first use, so
`import padd` and `padd --help` stay fast.
"""

from __future__ import annotations

import importlib
import warnings

# A student without a shared expert holds a zero-width `shared_experts` MLP (n_shared_experts=0);
# torch warns each time one is built. It is expected and harmless.
warnings.filterwarnings("ignore", message="Initializing zero-element tensors")

__version__ = "0.1.0"

# public name -> the module that defines it
_PUBLIC = {
    "grade": "padd.grading",
    "last_boxed": "padd.grading",
    "load_problems": "padd.data",
    "balanced_kmeans": "padd.stage1.cluster",
    "monotone_layer_map": "padd.stage1.layer_map",
    "match_clusters": "padd.stage1.seed",
    "group_advantages": "padd.losses",
    "token_logps": "padd.losses",
    "pr_grpo_loss": "padd.losses",
    "rspo_gmpo_loss": "padd.losses",
    "adaptive_kd_loss": "padd.losses",
    "distill_kl_loss": "padd.losses",
    "token_gamma": "padd.losses",
    "update_routing_bias": "padd.losses",
    "nmi": "padd.metrics",
    "esi": "padd.metrics",
    "gamma_step": "padd.metrics",
    "load_stats": "padd.metrics",
}
__all__ = ["__version__", *_PUBLIC]


def __getattr__(name: str):
    if name not in _PUBLIC:
        raise AttributeError(f"module 'padd' has no attribute {name!r}")
    value = getattr(importlib.import_module(_PUBLIC[name]), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
