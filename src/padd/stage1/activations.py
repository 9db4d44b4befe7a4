"""Co-activation statistics (docs/method.md §3 steps 1-2): run the teacher, record |act(gate(x)) * up(x)| per neuron.

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

from padd.distributed import Dist


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


def owned_layers(layers: list[int], ranks: Dist) -> list[int]:
    """The layers this rank clusters when Stage I runs on several processes (round-robin)."""
    return layers[ranks.rank :: ranks.world]


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
    ranks: Dist | None = None,
) -> dict[int, LayerStats]:
    """Stream `windows` [n_windows, seq_len] through `model`; return neuron statistics per layer.

    On several ranks each runs every world-th batch and the sums are reduced onto the rank that
    owns the layer (`owned_layers`), which alone gets it back. Each batch draws its projection rows
    from its global index, so the result equals one process's up to float summation order.

    Args:
        model: a dense causal LM whose `model.layers[i].mlp.down_proj` input is the intermediate activation.
        proj_dim: width of the random projection; 0 or >= the token count keeps the raw N-dim vectors.
        layers: layer indices to record (default: all).
        ranks: this process's place in a multi-process run (default: a single process).
    """
    ranks = ranks or Dist()
    device = next(model.parameters()).device
    all_layers = model.model.layers
    layers = list(range(len(all_layers))) if layers is None else layers
    n_tokens = windows.numel()
    project = 0 < proj_dim < n_tokens
    width = proj_dim if project else n_tokens
    # Made up front, not on first use: a rank with no batch must still join every reduction.
    acc = {i: _Accumulator(all_layers[i].mlp.down_proj.in_features, width, device) for i in layers}
    _stream_activations(
        model,
        windows,
        acc,
        layers,
        project=project,
        proj_dim=proj_dim,
        batch_size=batch_size,
        seed=seed,
        progress=progress,
        ranks=ranks,
    )
    _reduce_onto_owners(acc, layers, ranks)
    return {i: _normalised(acc[i], n_tokens) for i in owned_layers(layers, ranks)}


def _recording_hook(st: _Accumulator, cursor: dict, project: bool):
    """A down_proj forward pre-hook adding its input's |activations| ([tokens, d_ff]) to `st`: projected by
    cursor["proj"] when `project`, else written as the columns from token cursor["pos"] on."""

    def fn(module, inputs):
        a = inputs[0].detach().float().abs().reshape(-1, inputs[0].shape[-1])  # [tokens, d_ff]
        start = cursor["pos"]
        if project:
            st.feat.addmm_(a.T, cursor["proj"])
        else:
            st.feat[:, start : start + a.shape[0]] = a.T
        st.sq += (a.double() ** 2).sum(0)
        st.active += (a > a.median(dim=1, keepdim=True).values).sum(0).double()

    return fn


def _stream_activations(
    model: torch.nn.Module,
    windows: torch.LongTensor,
    acc: dict[int, _Accumulator],
    layers: list[int],
    *,
    project: bool,
    proj_dim: int,
    batch_size: int,
    seed: int,
    progress: bool,
    ranks: Dist,
) -> None:
    """Run this rank's batches (every world-th) of `windows` through the decoder stack, adding the
    activations of each of `layers` to its accumulator in `acc`, projected to `proj_dim` columns when
    `project`. Leaves the model's hooks and train/eval mode as they were."""
    device = next(model.parameters()).device
    all_layers = model.model.layers
    cursor = {"pos": 0, "proj": None}
    handles = [
        all_layers[i].mlp.down_proj.register_forward_pre_hook(_recording_hook(acc[i], cursor, project)) for i in layers
    ]
    was_training = model.training
    model.eval()
    # The decoder stack alone: the LM head's logits are never needed here (1/14 of a 7B's forward).
    body = model.model
    starts = list(range(0, windows.shape[0], batch_size))
    try:
        bar = tqdm(total=windows.numel(), desc="activations", unit="tok", disable=not (progress and ranks.main))
        for b in range(ranks.rank, len(starts), ranks.world):
            batch = windows[starts[b] : starts[b] + batch_size].to(device)
            cursor["pos"] = starts[b] * windows.shape[1]
            if project:  # rows of the projection for exactly these tokens, reproducible per batch
                cursor["proj"] = _projection(batch.numel(), proj_dim, seed * 1_000_003 + b, device)
            body(input_ids=batch, use_cache=False)
            bar.update(batch.numel() * ranks.world)
        bar.close()
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)


def _reduce_onto_owners(acc: dict[int, _Accumulator], layers: list[int], ranks: Dist) -> None:
    """Sum every layer's accumulator over the ranks onto the rank that owns it (`owned_layers`), in
    `layers` order on every rank; drops from `acc` the layers this rank does not own."""
    mine = owned_layers(layers, ranks)
    for j, i in enumerate(layers):
        owner = j % ranks.world
        for total in (acc[i].feat, acc[i].sq, acc[i].active):
            ranks.reduce_sum(total, dst=owner)
        if i not in mine:
            del acc[i]  # a partial sum: free it before the next layer's reduction


def _normalised(st: _Accumulator, n_tokens: int) -> LayerStats:
    """A layer's statistics from its summed accumulator: features scaled to unit L2 norm, activity
    as a share of the `n_tokens` tokens."""
    norm = st.sq.sqrt().clamp_min(1e-12).float()
    return LayerStats(features=st.feat / norm[:, None], active_frac=(st.active / n_tokens).float())
