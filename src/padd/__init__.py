"""padd: Path-Aligned Decompression Distillation — turn a dense teacher into a standard MoE student."""

import warnings

from padd.stage1.cluster import balanced_kmeans

# A student without a shared expert holds a zero-width `shared_experts` MLP (n_shared_experts=0);
# torch warns each time one is built. It is expected and harmless.
warnings.filterwarnings("ignore", message="Initializing zero-element tensors")

__version__ = "0.1.0"
__all__ = ["balanced_kmeans", "__version__"]
