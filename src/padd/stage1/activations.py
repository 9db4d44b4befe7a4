"""Co-activation statistics (SPEC §3 steps 1-2): run the teacher, record |act(gate(x)) * up(x)| per neuron.

Neuron j's feature is its |activation| over the N sampled tokens, L2-normalised, so that Euclidean
distance measures co-activation dissimilarity. With `proj_dim` > 0 the N-dim vector is reduced by a
Gaussian random projection as it streams in (Johnson-Lindenstrauss keeps distances), so memory is
O(layers x d_ff x proj_dim) whatever N is. Normalising after projecting is exact: it is a per-neuron
scale, and the squared norm is accumulated on the side.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from tqdm.auto import tqdm


@dataclass
class LayerStats:
    """features: [d_ff, p] L2-normalised neuron features; active_frac: [d_ff] share of tokens on
    which the neuron's |activation| exceeds that token's median over neurons (its universality)."""

    features: torch.Tensor
    active_frac: torch.Tensor


class _Accumulator:
    def __init__(self, d_ff: int, width: int, device: torch.device):
        self.feat = torch.zeros(d_ff, width, device=device)
        self.sq = torch.zeros(d_ff, device=device, dtype=torch.float64)
        self.active = torch.zeros(d_ff, device=device, dtype=torch.float64)


def _projection(rows: int, proj_dim: int, seed: int, device: torch.device) -> torch.Tensor:
    gen = torch.Generator(device="cpu").manual_seed(seed)
    return (torch.randn(rows, proj_dim, generator=gen) / proj_dim**0.5).to(device)


@torch.no_grad()
def collect_layer_stats(
    model: torch.nn.Module,
    windows: torch.LongTensor,
    *,
    proj_dim: int = 512,
    batch_size: int = 8,
    seed: int = 0,
    layers: list[int] | None = None,
    progress: bool = True,
) -> dict[int, LayerStats]:
    """Stream `windows` [n_windows, seq_len] through `model`; return neuron statistics per layer.

    Args:
        model: a dense causal LM whose `model.layers[i].mlp.down_proj` input is the intermediate activation.
        proj_dim: width of the random projection; 0 or >= the token count keeps the raw N-dim vectors.
        layers: layer indices to record (default: all).
    """
    device = next(model.parameters()).device
    all_layers = model.model.layers
    layers = list(range(len(all_layers))) if layers is None else layers
    n_tokens = windows.numel()
    project = 0 < proj_dim < n_tokens
    width = proj_dim if project else n_tokens
    acc: dict[int, _Accumulator] = {}
    cursor = {"pos": 0, "proj": None}

    def hook(layer_idx):
        def fn(module, inputs):
            a = inputs[0].detach().float().abs().reshape(-1, inputs[0].shape[-1])  # [tokens, d_ff]
            st = acc.setdefault(layer_idx, _Accumulator(a.shape[1], width, device))
            start = cursor["pos"]
            if project:
                st.feat.addmm_(a.T, cursor["proj"])
            else:
                st.feat[:, start : start + a.shape[0]] = a.T
            st.sq += (a.double() ** 2).sum(0)
            st.active += (a > a.median(dim=1, keepdim=True).values).sum(0).double()

        return fn

    handles = [all_layers[i].mlp.down_proj.register_forward_pre_hook(hook(i)) for i in layers]
    was_training = model.training
    model.eval()
    try:
        bar = tqdm(total=n_tokens, desc="activations", unit="tok", disable=not progress)
        for b, start in enumerate(range(0, windows.shape[0], batch_size)):
            batch = windows[start : start + batch_size].to(device)
            if project:  # rows of the projection for exactly these tokens, reproducible per batch
                cursor["proj"] = _projection(batch.numel(), proj_dim, seed * 1_000_003 + b, device)
            model(input_ids=batch, use_cache=False)
            cursor["pos"] += batch.numel()
            bar.update(batch.numel())
        bar.close()
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    out = {}
    for i, st in acc.items():
        norm = st.sq.sqrt().clamp_min(1e-12).float()
        out[i] = LayerStats(features=st.feat / norm[:, None], active_frac=(st.active / n_tokens).float())
    return out
