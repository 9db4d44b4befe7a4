"""Rollout backends: G sampled completions per prompt, as token tensors the loop trains on.

`TransformersRollout` runs transformers' `generate` on the training model itself (KV cache, left-padded batches);
`padd.generation.vllm.VLLMRollout` implements the same two methods on a vLLM engine. A backend
may also return the expert selection its engine made for every token (`routed_experts`), which the
loop compares with the trainer's own and, with routing replay (R3), reuses in the training forwards.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass
from typing import Protocol

import torch
from tqdm.auto import tqdm

from padd.routing import RouterRecorder

GENERATE_BATCH = 64  # sequences per generate call of the transformers backend


@dataclass
class Rollout:
    """N = prompts x G sequences. prompt_ids [N, P] left-padded; completion_ids [N, C] right-padded.

    routed_experts: [L, N, P + C, K] (int16) experts the engine selected in each MoE layer for each input
    token, -1 where it made none (the last completion token is never fed back), or None.
    sampler_logps: [N, C] (float32) the log-probability each completion token was drawn with, from the
    engine's own processed scores (temperature applied), or None if the engine gave none.
    """

    prompt_ids: torch.Tensor
    prompt_mask: torch.Tensor
    completion_ids: torch.Tensor
    completion_mask: torch.Tensor
    texts: list[str]
    routed_experts: torch.Tensor | None = None
    sampler_logps: torch.Tensor | None = None

    @property
    def input_ids(self) -> torch.Tensor:
        return torch.cat([self.prompt_ids, self.completion_ids], dim=1)

    @property
    def attention_mask(self) -> torch.Tensor:
        return torch.cat([self.prompt_mask, self.completion_mask], dim=1)

    def select(self, index: torch.Tensor) -> Rollout:
        return Rollout(
            self.prompt_ids[index],
            self.prompt_mask[index],
            self.completion_ids[index],
            self.completion_mask[index],
            [self.texts[int(i)] for i in index],
            None if self.routed_experts is None else self.routed_experts[:, index],
            None if self.sampler_logps is None else self.sampler_logps[index],
        )


class RolloutBackend(Protocol):
    tokenizer: object  # the model's tokenizer, left-padding
    context: int | None  # the longest prompt + completion it can run (None: unbounded)

    def sample(self, prompts: list[str], group_size: int, *, temperature: float, max_new_tokens: int) -> Rollout:
        """`group_size` completions of each prompt, consecutive in the result."""

    def sync_weights(self, model: torch.nn.Module) -> None:
        """Make the engine sample from `model`'s current weights."""


class SampledTokenLogprobs:
    """A `generate` logits processor, placed last, that keeps the log-probability each sampled token
    was drawn with: log softmax of the fully processed scores at the step that drew it.

    generate calls the processors once per new token before sampling it, so the token drawn at a
    step is read from `input_ids` at the next call (and from the output after the last). Only one
    step's [B, V] scores are held, never the whole [B, C, V].
    """

    def __init__(self):
        self.pending: torch.Tensor | None = None  # [B, V] log-probabilities of the step not yet read
        self.logps: list[torch.Tensor] = []

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        self._read(input_ids[:, -1:])
        self.pending = torch.log_softmax(scores.float(), dim=-1)
        return scores

    def _read(self, drawn: torch.Tensor) -> None:
        if self.pending is not None:
            self.logps.append(self.pending.gather(-1, drawn).squeeze(-1))
            self.pending = None

    def finish(self, sequences: torch.Tensor) -> torch.Tensor:
        """[B, C] log-probabilities of the C generated tokens, given generate's output sequences."""
        self._read(sequences[:, -1:])
        return (
            torch.stack(self.logps, dim=1)
            if self.logps
            else sequences.new_zeros((len(sequences), 0), dtype=torch.float32)
        )


def completion_mask_from(completion_ids: torch.Tensor, eos_id: int, pad_id: int) -> torch.Tensor:
    """1 on generated tokens up to and including the first EOS, 0 after it: [N, C] -> [N, C]."""
    is_eos = completion_ids == eos_id
    after_eos = (is_eos.cumsum(1) - is_eos.long()) > 0
    mask = ~after_eos
    if pad_id != eos_id:
        mask &= completion_ids != pad_id
    return mask.long()


def pad_prompts_left(tokenizer) -> None:
    """Left padding (a batch's prompts end where generation starts), padding with EOS if there is no pad token."""
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token


def decode_completions(tokenizer, completion_ids: torch.Tensor) -> tuple[torch.Tensor, list[str]]:
    """(mask, texts) of right-padded completions [N, C]: the mask of `completion_mask_from` and each
    completion's text up to its first EOS."""
    mask = completion_mask_from(completion_ids, tokenizer.eos_token_id, tokenizer.pad_token_id)
    kept = completion_ids * mask + tokenizer.pad_token_id * (1 - mask)
    return mask, tokenizer.batch_decode(kept, skip_special_tokens=True)


class TransformersRollout:
    """Sampling with `model.generate` on the training model (weights are always in sync).

    `synced`: the model is sharded across ranks (FSDP2), so every forward is a collective and a rank
    whose sequences have all ended keeps stepping until every rank's have (generate's synced_gpus).
    """

    def __init__(
        self,
        model,
        tokenizer,
        batch_size: int = GENERATE_BATCH,
        progress: bool = False,
        synced: bool = False,
        record_routing: bool = False,
    ):
        """`record_routing`: return the experts each MoE layer selected during generation."""
        self.model, self.tokenizer, self.batch_size, self.progress = model, tokenizer, batch_size, progress
        self.synced, self.record_routing = synced, record_routing
        pad_prompts_left(tokenizer)

    def sync_weights(self, model: torch.nn.Module) -> None:
        self.model = model

    @property
    def context(self) -> int | None:
        return getattr(self.model.config, "max_position_embeddings", None)

    @torch.no_grad()
    def sample(self, prompts: list[str], group_size: int, *, temperature: float, max_new_tokens: int) -> Rollout:
        from transformers import LogitsProcessorList, TemperatureLogitsWarper

        tok, model = self.tokenizer, self.model
        device = next(model.parameters()).device
        flat = [p for p in prompts for _ in range(group_size)]
        enc = tok(flat, return_tensors="pt", padding=True, add_special_tokens=False)
        was_training = model.training
        model.eval()
        chunks, routed, sampled = [], [], []
        bar = tqdm(total=len(flat), desc="generate", unit="seq", disable=not self.progress)
        new_tokens, start = 0, time.perf_counter()
        for i in range(0, len(flat), self.batch_size):
            ids = enc["input_ids"][i : i + self.batch_size].to(device)
            mask = enc["attention_mask"][i : i + self.batch_size].to(device)
            # Our own temperature warper, then the recorder: generate adds no warper of its own at
            # temperature 1 with top_k = 0 and top_p = 1, so the recorder sees the scores it samples from.
            recorder_logps = SampledTokenLogprobs()
            processors = [recorder_logps]
            sampling = {"do_sample": True, "temperature": 1.0, "top_p": 1.0, "top_k": 0}
            if temperature <= 0:
                sampling = {"do_sample": False}
            elif temperature != 1.0:
                processors.insert(0, TemperatureLogitsWarper(temperature))
            # top-K only, kept on the device (no host sync per step) until the call ends
            recorder = RouterRecorder(model, keep_logits=False) if self.record_routing else None
            with recorder or contextlib.nullcontext():
                out = model.generate(
                    input_ids=ids,
                    attention_mask=mask,
                    max_new_tokens=max_new_tokens,
                    pad_token_id=tok.pad_token_id,
                    eos_token_id=tok.eos_token_id,
                    synced_gpus=self.synced,
                    logits_processor=LogitsProcessorList(processors),
                    **sampling,
                )
            chunks.append(out[:, ids.shape[1] :].cpu())
            sampled.append(recorder_logps.finish(out).cpu())
            if recorder is not None and recorder.gates:
                routed.append(_per_token(recorder, len(ids), out.shape[1]))
            new_tokens += int(completion_mask_from(chunks[-1], tok.eos_token_id, tok.pad_token_id).sum())
            bar.update(len(ids))
            bar.set_postfix(tok_s=f"{new_tokens / (time.perf_counter() - start):.0f}")
        bar.close()
        model.train(was_training)
        width = max(c.shape[1] for c in chunks)
        completion = torch.cat(
            [torch.nn.functional.pad(c, (0, width - c.shape[1]), value=tok.pad_token_id) for c in chunks]
        )
        sampler_logps = torch.cat([torch.nn.functional.pad(s, (0, width - s.shape[1])) for s in sampled])
        cmask, texts = decode_completions(tok, completion)
        experts = None
        if routed:
            full = enc["input_ids"].shape[1] + width
            experts = torch.cat([torch.nn.functional.pad(r, (0, 0, 0, full - r.shape[2]), value=-1) for r in routed], 1)
        return Rollout(enc["input_ids"], enc["attention_mask"], completion, cmask, texts, experts, sampler_logps)


def _per_token(rec: RouterRecorder, batch: int, length: int) -> torch.Tensor:
    """[L, B, length, K] engine selections of the `length` tokens of one `generate` output, -1 for the last.

    generate runs one prefill over the prompt, then one forward per new token on the token before
    it, so the selections of the prompt and of every generated token but the last are seen. Forwards
    beyond those (synced_gpus keeps a finished rank stepping) are dropped.
    """
    n_layers = len(rec.gates)
    per_layer = [
        # int16, as vLLM returns them: a 7B rollout batch holds tens of millions of selections
        torch.cat([t.view(batch, -1, t.shape[-1]) for t in rec.topk[layer::n_layers]], dim=1)[:, : length - 1].to(
            "cpu", torch.int16
        )
        for layer in range(n_layers)
    ]
    stacked = torch.stack(per_layer)
    return torch.nn.functional.pad(stacked, (0, 0, 0, length - stacked.shape[2]), value=-1)
