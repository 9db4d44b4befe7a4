"""The vLLM rollout backend: the same `sample` / `sync_weights` as `TransformersRollout`, on a vLLM
engine colocated with the trainer on each GPU (`pip install 'padd[vllm]'`).

The engine loads the student checkpoint as it is (docs/method.md §2: a stock `Glm4MoeForCausalLM`). After
every rollout batch's updates the trainer's weights are pushed into it in place: transformers keeps
experts fused in memory ([E, 2I, H] tensors), so they are first turned back into the checkpoint's
per-expert names with transformers' own `revert_weight_conversion`, which is what
`save_pretrained` writes and what vLLM's `load_weights` reads. With routed-expert return on, the
engine also hands back the experts it selected for every token, which the loop compares with the
trainer's own and, with `--routing-replay` (R3), reuses in the training forwards.

Only the conversions between the two sides are pure and tested on CPU; the engine itself needs a
GPU and runs in `tests/test_vllm.py` where one is present.
"""

from __future__ import annotations

import os
import warnings

import numpy as np
import torch

from padd.distributed import whole_state_dict
from padd.errors import UserError
from padd.generation.rollout import Rollout, decode_completions, pad_prompts_left
from padd.routing import moe_layer_indices


def checkpoint_weights(model: torch.nn.Module) -> list[tuple[str, torch.Tensor]]:
    """The model's weights under the names and layouts its `save_pretrained` checkpoint uses.

    Sharded (FSDP2) tensors are gathered whole, so every rank must call this. Tied weights appear
    once, as in the checkpoint.
    """
    from transformers.core_model_loading import revert_weight_conversion

    state = whole_state_dict(model)
    if getattr(model.config, "tie_word_embeddings", False):
        state.pop("lm_head.weight", None)
    return list(revert_weight_conversion(model, state).items())


def engine_routing(
    per_sequence: list[np.ndarray | None],
    prompt_lengths: list[int],
    completion_lengths: list[int],
    prompt_width: int,
    width: int,
    moe_layers: list[int],
) -> torch.Tensor | None:
    """vLLM's per-sequence expert selections in the `Rollout.routed_experts` layout.

    Args:
        per_sequence: N arrays [n_i, layers, K] as vLLM returns them, one row per token the engine
            fed forward (prompt and completion but the last token, so n_i = p_i + c_i - 1); layers
            counts either the MoE layers or every decoder layer (vLLM's rows for dense ones are 0).
        prompt_lengths / completion_lengths: the unpadded p_i and c_i.
        prompt_width / width: P, the left-padded prompt width, and P + C.
        moe_layers: decoder-layer index of each MoE layer.

    Returns:
        [L, N, P + C, K] int16, -1 where the engine made no selection; None if any array is missing.
    """
    if not per_sequence or any(a is None for a in per_sequence):
        return None
    n_moe, k = len(moe_layers), per_sequence[0].shape[-1]
    out = torch.full((n_moe, len(per_sequence), width, k), -1, dtype=torch.int16)
    for i, (arr, p, c) in enumerate(zip(per_sequence, prompt_lengths, completion_lengths, strict=True)):
        if arr.shape[1] != n_moe:
            arr = arr[:, moe_layers]  # one row per decoder layer: keep the MoE ones
        n = min(arr.shape[0], p + c - 1)
        start = prompt_width - p  # the prompt is left-padded, the completion follows it
        # vLLM stores ids in the narrowest unsigned type (uint8 up to 256 experts)
        out[:, i, start : start + n] = torch.from_numpy(arr[:n].astype(np.int16)).transpose(0, 1)
    return out


def sampled_logprobs(token_ids: list, logprobs: list, width: int) -> torch.Tensor | None:
    """[N, width] log-probability of each sampled token from vLLM's per-position {token: Logprob}
    dicts (SamplingParams(logprobs=0) returns the sampled token's own), 0 past a completion's end;
    None when the engine returned none."""
    if any(lp is None for lp in logprobs):
        return None
    out = torch.zeros(len(token_ids), width)
    for i, (ids, per_position) in enumerate(zip(token_ids, logprobs, strict=True)):
        for j, (token, entry) in enumerate(zip(ids, per_position, strict=True)):
            out[i, j] = entry[token].logprob
    return out


def _load_into_worker(worker, weights: list[tuple[str, torch.Tensor]]) -> None:
    """Runs inside vLLM's worker (in this process): overwrite the engine's weights in place."""
    try:
        # vLLM's in-place reload also redoes what its loader does after reading a checkpoint
        worker.reload_weights(weights_iterator=iter(weights), is_checkpoint_format=True)
    except (AttributeError, TypeError):  # an engine without in-place reload from an iterator
        worker.get_model().load_weights(weights=weights)


class VLLMRollout:
    """Sampling with a vLLM engine on this rank's GPU; weights pushed from the trainer by `sync_weights`.

    Under torchrun every rank builds its own engine (vLLM's `external_launcher`, one GPU each) and
    samples its own prompts, like the transformers backend.
    """

    def __init__(
        self,
        student_dir: str,
        tokenizer,
        model: torch.nn.Module,
        *,
        dtype: str = "bfloat16",
        gpu_memory_utilization: float = 0.3,
        max_model_len: int = 2048,
        record_routing: bool = True,
        require_routing: bool = False,
        seed: int = 0,
        progress: bool = False,
    ):
        """`record_routing`: ask the engine for its expert selection (vLLM's routed-expert return);
        `require_routing`: fail, rather than warn, if the installed vLLM cannot give it (R3 needs it)."""
        # One engine in this process, so weights reach it by reference, not through a pipe.
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        try:
            from vllm import LLM
        except ImportError as err:
            raise ImportError("the vllm rollout backend needs vLLM: pip install 'padd[vllm]'") from err
        if not torch.cuda.is_available():
            raise UserError("the vllm rollout backend needs a CUDA GPU; use --rollout transformers on CPU")
        self.tokenizer, self.progress, self.moe_layers = tokenizer, progress, moe_layer_indices(model)
        pad_prompts_left(tokenizer)
        engine_args = dict(
            model=student_dir,
            dtype=dtype,
            gpu_memory_utilization=gpu_memory_utilization,
            max_model_len=max_model_len,
            seed=seed,
            enable_prefix_caching=True,
            # the sampled token's log-probability after temperature, as the trainer's π_old uses it
            logprobs_mode="processed_logprobs",
        )
        if torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
            engine_args["distributed_executor_backend"] = "external_launcher"
        self.routing, self.require_routing = record_routing, require_routing
        try:
            self.llm = LLM(**engine_args, enable_return_routed_experts=record_routing)
        except TypeError as err:
            if "enable_return_routed_experts" not in str(err) or require_routing:
                raise TypeError(
                    f"{err}; routing replay needs a vLLM that returns routed experts (enable_return_routed_experts)"
                ) from err
            warnings.warn("this vLLM cannot return routed experts: routing_mismatch will not be logged", stacklevel=2)
            self.routing = False
            self.llm = LLM(**engine_args)

    @torch.no_grad()
    def sync_weights(self, model: torch.nn.Module) -> None:
        self.llm.collective_rpc(_load_into_worker, args=(checkpoint_weights(model),))
        # cached prefixes hold keys and values of the old weights
        self.llm.reset_prefix_cache()

    def sample(self, prompts: list[str], group_size: int, *, temperature: float, max_new_tokens: int) -> Rollout:
        from vllm import SamplingParams

        tok = self.tokenizer
        enc = tok(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
        params = SamplingParams(
            n=group_size,
            temperature=max(temperature, 0.0),
            top_p=1.0,
            max_tokens=max_new_tokens,
            stop_token_ids=[tok.eos_token_id],
            detokenize=False,
            logprobs=0,  # the sampled token's own log-probability only
            # drawn from torch's generator, which the loop seeds per batch: resumed runs sample alike
            seed=int(torch.randint(2**31 - 1, ())),
        )
        requests = [
            {"prompt_token_ids": ids[m.bool()].tolist()}
            for ids, m in zip(enc.input_ids, enc.attention_mask, strict=True)
        ]
        outputs = self.llm.generate(requests, params, use_tqdm=self.progress)
        samples = [c for out in outputs for c in sorted(out.outputs, key=lambda c: c.index)]
        completions = [list(c.token_ids) for c in samples]
        width = max(1, max(len(c) for c in completions))
        completion = torch.full((len(completions), width), tok.pad_token_id, dtype=torch.long)
        for i, ids in enumerate(completions):
            completion[i, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        cmask, texts = decode_completions(tok, completion)
        sampler_logps = sampled_logprobs([c.token_ids for c in samples], [c.logprobs for c in samples], width)
        prompt_ids = enc.input_ids.repeat_interleave(group_size, 0)
        prompt_mask = enc.attention_mask.repeat_interleave(group_size, 0)
        experts = None
        if self.routing:
            experts = engine_routing(
                [getattr(c, "routed_experts", None) for c in samples],
                prompt_mask.sum(1).tolist(),
                [len(c) for c in completions],
                prompt_ids.shape[1],
                prompt_ids.shape[1] + width,
                self.moe_layers,
            )
            if experts is None and self.require_routing:
                # vLLM captures routing only in its Model Runner V2 and falls back to V1 quietly
                raise RuntimeError(
                    "--routing-replay: vLLM returned no routed experts; it records them only with Model Runner V2 "
                    "(do not set VLLM_USE_V2_MODEL_RUNNER=0; see vLLM's log for why V1 was chosen)"
                )
        return Rollout(prompt_ids, prompt_mask, completion, cmask, texts, experts, sampler_logps)
