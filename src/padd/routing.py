"""Hooks on the student's `mlp.gate` routers (transformers' Glm4MoeTopkRouter), never a forked model.

A router returns (router_logits [T, E], topk_weights [T, K], topk_indices [T, K]); PADD reads and,
for the warm-up, replaces that triple through forward hooks.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

import torch

from padd import router_adapter
from padd.checks import is_moe_config
from padd.distributed import full_tensor


def moe_layer_indices(model: torch.nn.Module) -> list[int]:
    """Decoder-layer index of every MoE layer, in order (leading dense layers have no router); none
    for a dense model. The architecture's layout comes from padd.router_adapter."""
    if not is_moe_config(model.config.to_dict()):
        return []
    return router_adapter.moe_layer_indices(model.config)


def moe_gates(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The router module of every MoE layer, in layer order."""
    return router_adapter.routers(model) if moe_layer_indices(model) else []


class UniformRandomRouting:
    """Route every token to K experts drawn uniformly at random, with equal weights (docs/method.md §3 step 5).

    Weights are the zero-router weights (routed_scaling_factor / K for a padd student, whose gate
    scaling then makes the expected FFN output the teacher's). The router still runs (its logits are
    returned unchanged) but decides nothing.

    The draw is made for a whole batch at once (`draw`), layer by layer, and each forward over a
    part of it (`rows`) takes its own tokens' rows: micro-batches of one batch route exactly as the
    whole batch would, and activation checkpointing's recompute routes as the forward did.

        routing = UniformRandomRouting(model, generator)
        routing.draw(n_tokens)               # [n_tokens, E] noise per MoE layer
        with routing.rows(start): forward    # tokens start ... of the drawn batch
    """

    def __init__(self, model: torch.nn.Module, generator: torch.Generator | None = None):
        self.config, self.gates, self.generator = model.config, moe_gates(model), generator
        self.k, self.n_experts = router_adapter.top_k(self.config), router_adapter.num_experts(self.config)
        self.noise: list[torch.Tensor] = []
        self.start = 0

    def draw(self, n_tokens: int) -> UniformRandomRouting:
        """Draw the selection of `n_tokens` tokens in every MoE layer (on the CPU generator, so it
        does not depend on the device)."""
        self.noise = [torch.rand(n_tokens, self.n_experts, generator=self.generator) for _ in self.gates]
        return self

    def _hook(self, layer: int):
        def fn(gate, inputs, output):
            logits, _, _ = output
            n_tokens = logits.shape[0]
            noise = self.noise[layer][self.start : self.start + n_tokens]
            if noise.shape[0] != n_tokens:
                raise ValueError(f"uniform routing drew {self.noise[layer].shape[0]} tokens; the forward needs more")
            indices = noise.to(logits.device).topk(self.k, dim=-1).indices
            # what a zero router gives K experts (E/K each for Glm4Moe's scaling, 1/K for softmax routers)
            zero = torch.zeros(n_tokens, self.n_experts, device=logits.device)
            weights, _ = router_adapter.route(self.config, zero, indices=indices)
            return logits, weights.to(logits.dtype), indices

        return fn

    @contextlib.contextmanager
    def rows(self, start: int = 0) -> Iterator[None]:
        """Forwards inside route the drawn tokens from `start` on (the tokens in [B, T] row order)."""
        self.start = start
        handles = [g.register_forward_hook(self._hook(i)) for i, g in enumerate(self.gates)]
        try:
            yield
        finally:
            for h in handles:
                h.remove()


class _GateHooks:
    """Forward hooks on every MoE router for the life of a `with` block (subclasses register them in
    `__enter__` into `_handles`); leaving the block removes them."""

    _handles: list

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []


class RouterRecorder(_GateHooks):
    """Record every MoE layer's router output during forwards (a context manager).

    After a forward over [B, T] tokens, `logits` holds one [B*T, E] float32 tensor per layer (the raw
    router logits, before the selection bias) and `topk` one [B*T, K] tensor of selected experts;
    with `keep_inputs`, `inputs` holds each router's input [B*T, H] (detached), so that log-scores
    under other router weights can be computed (`log_scores_under`).
    Recording keeps the autograd graph of the logits only when `keep_grad` is set; without
    `keep_logits` only the top-K is kept (across many forwards, e.g. a `generate` call, `topk` holds
    each forward's layers in order).
    """

    def __init__(
        self, model: torch.nn.Module, keep_grad: bool = False, keep_inputs: bool = False, keep_logits: bool = True
    ):
        self.gates = moe_gates(model)
        self.config = model.config
        self.keep_grad = keep_grad
        self.keep_inputs = keep_inputs
        self.keep_logits = keep_logits
        self.logits: list[torch.Tensor] = []
        self.topk: list[torch.Tensor] = []
        self.inputs: list[torch.Tensor] = []
        self._handles: list = []

    def _hook(self, gate, inputs, output):
        logits, _, indices = output
        if self.keep_logits:
            self.logits.append(logits if self.keep_grad else logits.detach())
        self.topk.append(indices.detach())
        if self.keep_inputs:
            self.inputs.append(inputs[0].detach().reshape(-1, inputs[0].shape[-1]))

    def clear(self) -> None:
        self.logits.clear()
        self.topk.clear()
        self.inputs.clear()

    def __enter__(self) -> RouterRecorder:
        self.clear()
        self._handles = [g.register_forward_hook(self._hook) for g in self.gates]
        return self

    def stacked(self, batch_shape: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        """(log normalised router scores [L, B, T, E], top-K experts [L, B, T, K]) of the last forward."""
        n_layers = len(self.gates)
        if len(self.logits) != n_layers:
            raise RuntimeError(
                f"recorded {len(self.logits)} router calls, expected {n_layers}: run exactly one forward"
            )
        logp = torch.stack([router_adapter.log_scores(self.config, lg) for lg in self.logits])
        logp = logp.view(n_layers, *batch_shape, -1)
        topk = torch.stack(self.topk).view(n_layers, *batch_shape, -1)
        return logp, topk

    def selections(self, batch_shape: tuple[int, int]) -> torch.Tensor:
        """Top-K experts [L, B, T, K] of the last forward over [B, T] tokens (works without keep_logits)."""
        n_layers = len(self.gates)
        if len(self.topk) != n_layers:
            raise RuntimeError(f"recorded {len(self.topk)} router calls, expected {n_layers}: run exactly one forward")
        return torch.stack(self.topk).view(n_layers, *batch_shape, -1)

    def log_scores_under(self, weights: list[torch.Tensor], batch_shape: tuple[int, int]) -> torch.Tensor:
        """log normalised scores [L, B, T, E] that routers with `weights` ([E, H] per layer) would give
        the recorded inputs (needs keep_inputs)."""
        if len(self.inputs) != len(weights):
            raise RuntimeError("log_scores_under needs one recorded forward with keep_inputs=True")
        logp = [
            router_adapter.log_scores(self.config, h.float() @ w.float().T)
            for h, w in zip(self.inputs, weights, strict=True)
        ]
        return torch.stack(logp).view(len(weights), *batch_shape, -1)


class TokenGammaMeter(_GateHooks):
    """Per-token router shift Γ (docs/method.md §4 III, RSPO's definition) measured during one forward.

    Both routers are evaluated on that forward's own router inputs h: at MoE layer l, the mean over
    the rollout-time top-K experts `topk_old[l]` of |log p_now(e|h) - log p_anchor(e|h)|, p the
    normalised router scores, the anchor being the rollout-time router (or the router before the
    last optimizer step). Then the mean over layers. Comparing scores recorded on rollout-time
    inputs would also count every change of the hidden states in earlier layers.

    Positions: the forward runs over [N, P + C] tokens; Γ is kept for the C positions whose logits
    predict the completion tokens (P - 1 ... P + C - 2), the routing that produced each token's
    probability. Only [L, N, C] values are kept, never the router inputs.

    Args:
        anchor: per MoE layer, the anchor router's weight [E, H] (whole, not sharded).
        topk_old: [L, N, C, K] experts selected at rollout time at those positions, or None when the
            forward's own selection is the rollout-time one (one update per rollout batch: the student
            that sampled is the one running this forward).
        n_prompt / n_completion: P, the width of the left-padded prompts, and C.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        anchor: list[torch.Tensor],
        topk_old: torch.Tensor | None,
        n_prompt: int,
        n_completion: int,
    ):
        self.gates, self.config = moe_gates(model), model.config
        layers = len(self.gates) if topk_old is None else topk_old.shape[0]
        if len(anchor) != len(self.gates) or layers != len(self.gates):
            raise ValueError(f"{len(anchor)} anchor routers / {layers} top-K layers for {len(self.gates)}")
        self.anchor, self.topk_old, self.n_prompt, self.n_completion = anchor, topk_old, n_prompt, n_completion
        self.per_layer: list[torch.Tensor | None] = [None] * len(self.gates)
        self._handles: list = []

    def _hook(self, layer: int):
        def fn(gate, inputs, output):
            # autocast off: other hooks (routers_in_fp32's) may have turned it back on by now, and a
            # bf16 anchor against the float32 router would measure rounding (~1e-2), not Γ (~1e-4)
            with torch.no_grad(), torch.autocast(inputs[0].device.type, enabled=False):
                h = inputs[0].reshape(-1, inputs[0].shape[-1])
                p, c = self.n_prompt, self.n_completion
                n = h.shape[0] // (p + c)
                now = output[0].detach()  # the router's own float32 logits on h
                # the same op as the router's (F.linear in float32): equal weights give Γ = 0 exactly
                bias = getattr(gate, "bias", None)  # gpt_oss routers have a linear bias
                bias = None if bias is None else bias.detach().float()
                old = torch.nn.functional.linear(h.float(), self.anchor[layer].to(h.device).float(), bias)
                now, old = (
                    router_adapter.log_scores(self.config, x).view(n, -1, x.shape[-1])[:, p - 1 : p + c - 1]
                    for x in (now, old)
                )
                if self.topk_old is None:  # the experts this forward selected (the gate's third output)
                    index = output[2].detach().view(n, p + c, -1)[:, p - 1 : p + c - 1].long()
                else:
                    index = self.topk_old[layer].to(h.device).long()
                self.per_layer[layer] = (now - old).abs().gather(-1, index).mean(-1)  # [N, C]

        return fn

    def token_gamma(self) -> torch.Tensor:
        """[N, C] Γ, the mean over MoE layers, of the last forward."""
        if any(x is None for x in self.per_layer):
            raise RuntimeError("TokenGammaMeter: run one forward inside the context first")
        return torch.stack(self.per_layer).mean(0)

    def __enter__(self) -> TokenGammaMeter:
        self.per_layer = [None] * len(self.gates)
        self._handles = [g.register_forward_hook(self._hook(i)) for i, g in enumerate(self.gates)]
        return self


@torch.no_grad()
def selection_stats(config, logits: torch.Tensor, bias: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """How far the selection-only bias is from acting, and how often it acts (the top-K over the
    architecture's selection scores + bias; group limits left out).

    Args:
        logits: [N, E] router logits of N tokens; bias: [E] the layer's selection bias; K < E.

    Returns:
        (gap [N]: the K-th minus the (K+1)-th selection score, the bias spread needed to swap them;
        changed [N] bool: the biased top-K set differs from the unbiased one).
    """
    k = router_adapter.top_k(config)
    scores = router_adapter.selection_scores(config, logits)
    ranked = scores.topk(k + 1, dim=-1).values
    gap = ranked[:, k - 1] - ranked[:, k]
    plain = scores.topk(k, dim=-1).indices.sort(-1).values
    biased = (scores + bias.to(scores.device).float()).topk(k, dim=-1).indices.sort(-1).values
    return gap, (plain != biased).any(-1)


# The selection bias of an architecture without a native one: a buffer on its router, not saved with
# the checkpoint (the student stays a stock one), applied by a forward hook that redoes the top-K.
SELECTION_BIAS = "padd_selection_bias"


def selection_biases(model: torch.nn.Module) -> list[torch.Tensor]:
    """Per MoE layer, the [E] selection-only bias stage IV moves: the router's own
    `e_score_correction_bias` where the architecture has one, else a non-persistent buffer applied
    by a hook (attached on first call) that reselects the top-K over scores + bias, leaving the
    weights the router's own for the chosen experts."""
    config = model.config
    if not moe_layer_indices(model):
        return []
    if router_adapter.router_kind(config).native_bias:
        return [gate.e_score_correction_bias for gate in moe_gates(model)]
    biases = []
    for gate in moe_gates(model):
        if not hasattr(gate, SELECTION_BIAS):
            gate.register_buffer(
                SELECTION_BIAS,
                torch.zeros(router_adapter.num_experts(config), device=gate.weight.device),
                persistent=False,
            )
            gate.register_forward_hook(_biased_selection(config))
        biases.append(getattr(gate, SELECTION_BIAS))
    return biases


BIAS_FILE = "padd_routing_bias.safetensors"


def save_selection_bias(model: torch.nn.Module, folder) -> bool:
    """Write the bias padd added to a router without a native one beside a checkpoint
    (`padd_routing_bias.safetensors`, one [E] tensor per MoE layer); returns whether there was one.
    A native bias is part of the checkpoint already. A server that ignores the file serves the
    stock routing (vLLM does)."""
    from safetensors.torch import save_file

    gates = moe_gates(model)
    if not gates or not hasattr(gates[0], SELECTION_BIAS):
        return False
    tensors = {str(i): getattr(g, SELECTION_BIAS).detach().cpu().contiguous() for i, g in enumerate(gates)}
    save_file(tensors, str(Path(folder) / BIAS_FILE))
    return True


def load_selection_bias(model: torch.nn.Module, folder) -> bool:
    """Apply a saved `padd_routing_bias.safetensors` from `folder` to `model`; returns whether one was there."""
    from safetensors.torch import load_file

    path = Path(folder) / BIAS_FILE
    if not path.is_file():
        return False
    saved = load_file(str(path))
    biases = selection_biases(model)
    if len(saved) != len(biases):
        raise ValueError(f"{path} holds {len(saved)} layers of routing bias for {len(biases)} MoE layers")
    for i, bias in enumerate(biases):
        bias.copy_(saved[str(i)].to(bias.device, bias.dtype))
    return True


def _biased_selection(config):
    def hook(gate, inputs, output):
        bias = getattr(gate, SELECTION_BIAS)
        if not bool(bias.any()):  # an untouched bias changes nothing: keep the stock output
            return None
        logits, weights, _ = output
        bias = bias.to(logits.device)  # created beside the weights, which --offload keeps on the CPU
        chosen, indices = router_adapter.route(config, logits, bias=bias)
        return logits, chosen.to(weights.dtype), indices

    return hook


class RoutingReplay(_GateHooks):
    """Routing replay (R3), a context manager: MoE layers use the expert selection `topk` instead of
    their own, with weights recomputed from the live router scores, so the router keeps its gradient.

    Whether replaying or not (`replay=False` only measures), it counts the token-layer selections
    where the router's own top-K set differs from `topk`, over the positions `count_mask` marks and
    `topk` knows: after a forward, `differ` and `counted` hold those numbers.

    Args:
        topk: [L, B, T, K] experts per layer and token of the coming forward over [B, T]; rows of -1
            (unknown) keep the router's own choice.
        count_mask: [B, T] positions to count (e.g. the attention mask); None counts nothing.
    """

    def __init__(self, model: torch.nn.Module, topk: torch.Tensor, count_mask=None, replay: bool = True):
        self.gates, self.config = moe_gates(model), model.config
        self.topk, self.count_mask, self.replay = topk, count_mask, replay
        self.differ = 0
        self.counted = 0
        self._handles: list = []

    def _hook(self, layer: int):
        def fn(gate, inputs, output):
            logits, weights, own = output
            want = self.topk[layer].reshape(-1, own.shape[-1]).to(own.device, own.dtype)
            known = (want >= 0).all(-1)
            if self.count_mask is not None:
                counted = known & self.count_mask.reshape(-1).to(own.device).bool()
                same = (own.sort(-1).values == want.sort(-1).values).all(-1)
                self.differ += int((counted & ~same).sum())
                self.counted += int(counted.sum())
            if not self.replay:
                return None
            index = torch.where(known[:, None], want, own)
            # the router's own weighting applied to the replayed experts
            chosen, _ = router_adapter.route(self.config, logits, indices=index)
            return logits, chosen.to(weights.dtype), index

        return fn

    def __enter__(self) -> RoutingReplay:
        if self.topk.shape[0] != len(self.gates):
            raise ValueError(f"routing replay got {self.topk.shape[0]} layers of selections for {len(self.gates)}")
        self._handles = [g.register_forward_hook(self._hook(i)) for i, g in enumerate(self.gates)]
        return self


def router_log_scores(logits: torch.Tensor) -> torch.Tensor:
    """log p(e | h) of the normalised sigmoid router scores p = σ(z) / Σ_e σ(z): [N, E] -> [N, E]."""
    log_sig = torch.nn.functional.logsigmoid(logits.float())
    return log_sig - torch.logsumexp(log_sig, dim=-1, keepdim=True)


def expert_load(topk: torch.Tensor, n_experts: int, weights: torch.Tensor | None = None) -> torch.Tensor:
    """Per-layer counts of (token, slot) pairs per expert: topk [L, N, K] (+ weights [N]) -> [L, E].

    With `weights` (e.g. a 0/1 mask or per-token advantages) each token's slots count that much.
    """
    n_layers = topk.shape[0]
    flat = topk.reshape(n_layers, -1).long()
    w = (
        None
        if weights is None
        else weights.reshape(1, -1, 1).expand(n_layers, -1, topk.shape[-1]).reshape(n_layers, -1).float()
    )
    out = torch.zeros(n_layers, n_experts, dtype=torch.float32, device=topk.device)
    return out.scatter_add_(1, flat, torch.ones_like(flat, dtype=torch.float32) if w is None else w)


def router_weights(model: torch.nn.Module) -> list[torch.Tensor]:
    """Detached copies of every MoE layer's router weight [E, H] (for Γ_step); whole, under FSDP2
    (then a collective)."""
    return [full_tensor(g.weight.detach()).float().clone() for g in moe_gates(model)]


@torch.no_grad()
def bias_action(
    model: torch.nn.Module, router_logits: list[torch.Tensor], batch_shape: tuple[int, int], positions: slice, valid
) -> dict[str, float]:
    """What stage IV's selection bias must bridge and how often it acts, on one forward's tokens.

    Args:
        router_logits: per MoE layer, the [B·T, E] router logits of a forward over `batch_shape` [B, T].
        positions: the T positions to count (the completion positions); valid: [B, len(positions)] bool.

    Returns:
        {"router_gap_median": median top-K score gap, "bias_changed_frac": share of token-layer
        selections the bias changed}; empty when every expert is selected (nothing to change).
    """
    biases, config = selection_biases(model), model.config
    if not biases or router_adapter.top_k(config) >= router_adapter.num_experts(config) or not valid.any():
        return {}
    gaps, changed = [], []
    for bias, logits in zip(biases, router_logits, strict=True):
        per_token = logits.view(*batch_shape, -1)[:, positions][valid]  # [tokens, E]
        gap, flip = selection_stats(config, per_token, bias)
        gaps.append(gap)
        changed.append(flip.float())
    return {"router_gap_median": float(torch.cat(gaps).median()), "bias_changed_frac": float(torch.cat(changed).mean())}


def engine_routing(model: torch.nn.Module, rollout, *, replay: bool, count: bool = False):
    """Over one forward on `rollout` (padd.generation.rollout.Rollout): replay the engine's expert
    selection (`replay`, R3) and, with `count`, measure the trainer's disagreement with it over the
    attended positions; a no-op context when the backend returned no routing."""
    if rollout.routed_experts is None or not (count or replay):
        return contextlib.nullcontext()
    mask = rollout.attention_mask if count else None
    return RoutingReplay(model, rollout.routed_experts, count_mask=mask, replay=replay)
