"""Rollouts from a vLLM server in a process of its own (on GPUs of its own), as TRL's `vllm serve` mode:
the same `sample` / `sync_weights` as `VLLMRollout`, over HTTP (docs/vllm-server.md).

The server is stock vLLM, started on the student with two settings padd needs (`SERVE_FLAGS`) and
its dev-mode routes (VLLM_SERVER_DEV_MODE=1):

    VLLM_SERVER_DEV_MODE=1 vllm serve STUDENT --port 8000 --logprobs-mode processed_logprobs \
        --weight-transfer-config '{"backend": "padd_safetensors"}'

- Sampling: one OpenAI-compatible /v1/completions request per prompt (token ids in and out, the
  sampled token's log-probability after temperature, a seed per request as `VLLMRollout` gives),
  sent together so that the server batches them.
- Weights: vLLM's weight-sync routes (/start_weight_update, /update_weights, /finish_weight_update)
  with padd's `padd_safetensors` backend (padd.generation.vllm_transfer, registered by padd's vLLM
  plugin): the trainer writes its checkpoint-named weights to one safetensors file in the run
  directory, which the server must be able to read (one machine, or a shared file system), and the
  server loads it with the model's own `load_weights`; then /reset_prefix_cache.

Under torchrun every rank samples its own prompts from the one server; only rank 0 writes the
weights and drives the update, after every rank has joined the gather of `checkpoint_weights` (a
collective under FSDP2), and no rank samples before the update is done. The trainer side needs no
vLLM: only HTTP and safetensors.

A server that stops answering mid-run raises `ServerError`, on every rank at once; `padd train`
then writes a checkpoint that `--resume` continues from once the server is back. A weight push
that fails is kept and retried before the next sample, so a run whose server dies after its last
update still finishes.
"""

from __future__ import annotations

import json
import os
import shlex
import urllib.error
import urllib.parse
import urllib.request
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from padd.distributed import is_sharded
from padd.errors import UserError
from padd.generation.rollout import Rollout, decode_completions, pad_prompts_left
from padd.generation.vllm import checkpoint_weights
from padd.generation.vllm_plugin import TRANSFER_BACKEND

# What `vllm serve` needs for padd: log-probabilities after temperature (π_old is the sampler's),
# and the weight-transfer backend that reads the trainer's file.
SERVE_FLAGS = (
    "--logprobs-mode",
    "processed_logprobs",
    "--weight-transfer-config",
    json.dumps({"backend": TRANSFER_BACKEND}),
)
CHECK_TIMEOUT = 10.0  # s, for the checks before training
REQUEST_TIMEOUT = 3600.0  # s, for one completion request or one weight load: a stuck server fails, a busy one not
MAX_CONCURRENT = 64  # completion requests in flight from one rank
WEIGHTS_FILE = "vllm-server-weights.safetensors"  # in the run directory, removed once the server loaded it

# config fields that decide the served model's shapes and vocabulary: the server must agree on each
MODEL_FIELDS = (
    "architectures",
    "model_type",
    "vocab_size",
    "hidden_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "intermediate_size",
    "moe_intermediate_size",
    "n_routed_experts",
    "num_experts",
    "num_local_experts",
    "num_experts_per_tok",
    "n_shared_experts",
    "first_k_dense_replace",
    "tie_word_embeddings",
)


class ServerError(UserError):
    """The vLLM server did not answer, or answered with an error; the message says what to do."""


def serve_command(student: str, url: str) -> str:
    """The `vllm serve` line that starts a server for `padd train --rollout vllm-server` at `url`."""
    port = urllib.parse.urlsplit(url).port or 8000
    return "VLLM_SERVER_DEV_MODE=1 vllm serve " + shlex.join([str(student), "--port", str(port), *SERVE_FLAGS])


class ServerClient:
    """JSON over HTTP to one vLLM server; every failure is a `ServerError` naming the route."""

    def __init__(self, url: str):
        self.url = url.rstrip("/").removesuffix("/v1")  # the OpenAI clients' base URL names the server too
        # the server is on the cluster's own network: no proxy from the environment between them
        self.opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))

    def call(self, route: str, body: dict | None = None, *, post: bool = True, timeout: float = REQUEST_TIMEOUT):
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(
            self.url + route, data=data, method="POST" if post else "GET", headers={"Content-Type": "application/json"}
        )
        try:
            with self.opener.open(request, timeout=timeout) as response:
                text = response.read()
        except urllib.error.HTTPError as err:  # it answered, with an error
            detail = err.read().decode(errors="replace")[:300].replace("\n", " ")
            raise ServerError(f"the vLLM server at {self.url} answered {route} with {err.code}: {detail}") from err
        except (urllib.error.URLError, OSError) as err:  # refused, reset, timed out: no answer
            reason = getattr(err, "reason", err)
            raise ServerError(f"the vLLM server at {self.url} does not answer ({route}: {reason})") from err
        return json.loads(text) if text else None


def _served_model(info: dict) -> dict:
    """The one model /v1/models lists: {'id', 'root', 'max_model_len', ...}."""
    models = info.get("data") or []
    if len(models) != 1:
        raise ServerError(f"the vLLM server lists {len(models)} models; padd needs a server of the student alone")
    return models[0]


def check_server(url: str, student: str, max_new_tokens: int) -> dict:
    """Fail, saying what to do, unless `url` is a vLLM server that `padd train --rollout vllm-server`
    can use for `student`: answering, in dev mode, with padd's weight transfer and the sampler's
    log-probabilities, serving a model of the student's config with room for `max_new_tokens`.
    Reads the student's config only. Returns /v1/models' entry of the served model."""
    from transformers import AutoConfig

    client, start = ServerClient(url), serve_command(student, url)
    try:
        served = _served_model(client.call("/v1/models", post=False, timeout=CHECK_TIMEOUT))
    except ServerError as err:
        raise ServerError(f"--vllm-server-url: {err}; start the server first (docs/vllm-server.md): {start}") from err
    try:
        config = client.call("/server_info?config_format=json", post=False, timeout=CHECK_TIMEOUT)["vllm_config"]
    except ServerError as err:
        raise ServerError(
            f"--vllm-server-url {url} has no /server_info ({err}): start the server with VLLM_SERVER_DEV_MODE=1, "
            f"which padd's weight updates need: {start}"
        ) from err
    backend = (config.get("weight_transfer_config") or {}).get("backend")
    if backend != TRANSFER_BACKEND:
        raise ServerError(
            f"the vLLM server at {url} has weight transfer {backend!r}, not padd's: start it with "
            f"--weight-transfer-config '{json.dumps({'backend': TRANSFER_BACKEND})}': {start}"
        )
    mode = config["model_config"].get("logprobs_mode")
    if mode != "processed_logprobs":
        raise ServerError(
            f"the vLLM server at {url} returns {mode} log-probabilities; the policy's π_old needs them after "
            f"temperature: start it with --logprobs-mode processed_logprobs: {start}"
        )
    # The served model's own config, where this machine sees its folder (it must see the run directory
    # anyway); elsewhere the first weight push, before any update, checks every tensor's shape.
    root = Path(served.get("root") or served["id"])
    if (root / "config.json").is_file():
        ours, theirs = AutoConfig.from_pretrained(student).to_dict(), AutoConfig.from_pretrained(root).to_dict()
        differ = [
            f"{k} {theirs.get(k)} (--student: {ours.get(k)})" for k in MODEL_FIELDS if ours.get(k) != theirs.get(k)
        ]
        if differ:
            raise ServerError(
                f"the vLLM server at {url} serves {root}, another model than --student {student}: "
                f"{', '.join(differ)}; start it on the student: {start}"
            )
    length = served.get("max_model_len")
    if length and length <= max_new_tokens:
        raise ServerError(
            f"the vLLM server at {url} holds {length} tokens per sequence, no more than --max-new-tokens "
            f"{max_new_tokens} and no prompt: give a smaller budget, or restart it with a larger --max-model-len"
        )
    return served


class VLLMServerRollout:
    """Sampling from a vLLM server at `url`; `sync_weights` pushes the trainer's weights into it.

    `model`: the trainer's student, whose weights the server takes before its first sample (whatever
    checkpoint it was started on). `weights_dir`: where the weights file is written (the run
    directory), at a path the server reads as it is. `dist`: padd.distributed.Dist of this rank, and
    `device` the trainer's, for the ranks' agreement on failures.
    """

    def __init__(
        self,
        url: str,
        student: str,
        tokenizer,
        model: torch.nn.Module,
        *,
        weights_dir: str | Path,
        max_new_tokens: int,
        dist=None,
        device: str | torch.device = "cpu",
    ):
        served = check_server(url, student, max_new_tokens)
        self.client, self.tokenizer, self.model_name = ServerClient(url), tokenizer, served["id"]
        self.url, self.context = self.client.url, served.get("max_model_len")
        self.weights_file = Path(weights_dir) / WEIGHTS_FILE
        self.dist, self.device = dist, torch.device(device)
        self.main = dist is None or dist.main
        pad_prompts_left(tokenizer)
        self.pending: torch.nn.Module | None = model  # a model whose weights the server has not taken yet
        self.pushes = 0

    @torch.no_grad()
    def sync_weights(self, model: torch.nn.Module) -> None:
        try:
            self._push(model)
        except ServerError as err:
            # Kept for the next sample, which retries it: this batch's updates are done and get logged,
            # and a run whose last push fails still finishes.
            self.pending = model
            warnings.warn(f"{err}; the next rollout batch tries again", stacklevel=2)

    def _push(self, model: torch.nn.Module) -> None:
        # a collective under FSDP2, which every rank joins, gathering each tensor into rank 0's CPU
        # memory in turn (no GPU holds the whole student); otherwise rank 0's own copy is whole
        sharded = is_sharded(model)
        weights = checkpoint_weights(model, rank0_cpu=sharded) if self.main or sharded else []
        error = None
        if self.main:
            try:
                self._send(weights)
            except ServerError as err:
                error = err
        self._agree(error, "weight update")
        self.pending = None

    def _send(self, weights: list[tuple[str, torch.Tensor]]) -> None:
        from safetensors.torch import save_file

        self.weights_file.parent.mkdir(parents=True, exist_ok=True)
        partial = self.weights_file.with_suffix(".partial")
        save_file({name: w.detach().contiguous().cpu() for name, w in weights}, str(partial))
        os.replace(partial, self.weights_file)  # the server never reads a half-written file
        try:
            self.pushes += 1
            self.client.call("/start_weight_update", {})
            self.client.call("/update_weights", {"update_info": {"path": str(self.weights_file.resolve())}})
            self.client.call("/finish_weight_update", {"weight_version": f"padd-{self.pushes}"})
            self.client.call("/reset_prefix_cache")  # cached prefixes hold keys and values of the old weights
        finally:
            self.weights_file.unlink(missing_ok=True)

    def _agree(self, error: ServerError | None, what: str) -> None:
        """Raise on every rank if any rank's `what` failed, so that no rank waits in a collective."""
        failed = torch.tensor([float(error is not None)], device=self.device)
        if self.dist is not None:
            self.dist.all_reduce_max(failed)
        if error is not None:
            raise error
        if failed.item():
            raise ServerError(f"the vLLM server at {self.url} failed another rank's {what} (its error says why)")

    def sample(self, prompts: list[str], group_size: int, *, temperature: float, max_new_tokens: int) -> Rollout:
        if self.pending is not None:
            self._push(self.pending)
        tok = self.tokenizer
        enc = tok(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
        # as VLLMRollout: vLLM samples greedily only with n = 1, and each request draws its own seed
        greedy = temperature <= 0
        copies, n = (group_size, 1) if greedy else (1, group_size)
        rows = zip(enc.input_ids, enc.attention_mask, strict=True)
        token_lists = [ids[m.bool()].tolist() for ids, m in rows for _ in range(copies)]
        base = int(torch.randint(2**30, ()))
        bodies = [
            {
                "model": self.model_name,
                "prompt": ids,
                "n": n,
                # every sampling setting given: the server's defaults come from the model's generation_config
                "temperature": max(temperature, 0.0),
                "top_p": 1.0,
                "top_k": 0,
                "min_p": 0.0,
                "repetition_penalty": 1.0,
                "max_tokens": max_new_tokens,
                "stop_token_ids": [tok.eos_token_id],
                "seed": base + i * n,
                "logprobs": 0,  # the sampled token's own log-probability only
                "return_token_ids": True,
                "return_tokens_as_token_ids": True,
            }
            for i, ids in enumerate(token_lists)
        ]
        answers, error = [], None
        try:
            with ThreadPoolExecutor(max_workers=min(MAX_CONCURRENT, len(bodies))) as pool:
                answers = list(pool.map(lambda body: self.client.call("/v1/completions", body), bodies))
        except ServerError as err:
            error = err
        self._agree(error, "completions")
        samples = [c for answer in answers for c in sorted(answer["choices"], key=lambda c: c["index"])]
        completions = [c["token_ids"] for c in samples]
        width = max(1, max(len(c) for c in completions))
        completion = torch.full((len(completions), width), tok.pad_token_id, dtype=torch.long)
        sampler_logps = torch.zeros(len(completions), width)
        for i, (ids, choice) in enumerate(zip(completions, samples, strict=True)):
            completion[i, : len(ids)] = torch.tensor(ids, dtype=torch.long)
            sampler_logps[i, : len(ids)] = torch.tensor(choice["logprobs"]["token_logprobs"], dtype=torch.float32)
        cmask, texts = decode_completions(tok, completion)
        prompt_ids = enc.input_ids.repeat_interleave(group_size, 0)
        prompt_mask = enc.attention_mask.repeat_interleave(group_size, 0)
        return Rollout(prompt_ids, prompt_mask, completion, cmask, texts, None, sampler_logps)
