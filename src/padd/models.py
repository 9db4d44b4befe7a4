"""Loading a causal LM checkpoint the way every stage needs it: one dtype, one device, train or eval;
under FSDP2, built sharded and filled shard by shard (`load_sharded_causal_lm`)."""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

from padd.errors import UserError
from padd.routing import load_selection_bias


def load_causal_lm(
    path,
    *,
    dtype: torch.dtype | str = torch.float32,
    device="cpu",
    train: bool = False,
    sharded: bool = False,
    offload: bool = False,
    **kwargs,
):
    """`AutoModelForCausalLM.from_pretrained(path)` in `dtype` on `device`, in eval mode unless `train`
    (students are trained in float32; a teacher may be bfloat16, `dtype="auto"` keeps the checkpoint's),
    with a saved selection bias applied (padd.routing.BIAS_FILE).
    `sharded`: FSDP2-sharded over the process group as it loads (`load_sharded_causal_lm`), with
    `offload` its shards in CPU memory (FSDP2's CPUOffloadPolicy).
    Extra keyword arguments (e.g. `config=`) go to `from_pretrained`."""
    if sharded:
        if kwargs:
            raise TypeError(f"load_causal_lm(sharded=True) takes no from_pretrained options, got {sorted(kwargs)}")
        return load_sharded_causal_lm(path, dtype=dtype, device=device, train=train, offload=offload)
    if offload:
        raise TypeError("load_causal_lm(offload=True) is FSDP2's offload: it needs sharded=True")
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, **kwargs).to(device)
    if Path(str(path)).is_dir():
        load_selection_bias(model, path)  # stage IV's bias of a router without a native one, if saved
    return model.train(train)


def load_sharded_causal_lm(
    path, *, dtype: torch.dtype = torch.float32, device="cpu", train: bool = False, offload: bool = False
):
    """The model `load_causal_lm(path, dtype=dtype)` gives, but FSDP2-sharded over the running process
    group (a collective: every rank calls it) and never whole in any process: each rank holds 1/N of
    the weights plus the tensor being read.

    1. The model is built on the meta device (no memory) and sharded by `padd.distributed.shard`,
       the units `wrap_for_training` makes: each weight becomes a DTensor, Shard(0) over the ranks.
    2. transformers' own loader (`convert_and_load_state_dict_in_model`, what `from_pretrained` runs)
       fills it from the checkpoint's safetensors files: it renames keys and fuses per-expert
       tensors into the [E, 2I, H] experts with the model's conversion mapping, and for a DTensor
       weight reads only this rank's rows of each checkpoint tensor (its `DtensorShardOperation`).
       Files are read with `pread`, not mapped, so no page of another rank's share is resident here.
    3. transformers' finishing step then ties embeddings and re-creates what the checkpoint does not
       hold (rotary `inv_freq` and other non-persistent buffers) as `from_pretrained` does.

    The result equals the sharded `from_pretrained` model exactly (tests/test_distributed.py). It is
    already sharded: `wrap_for_training` keeps it as it is; build the optimizer after this call.
    `offload`: FSDP2's CPU offload policy, the shards read into CPU memory, where it keeps them.
    Needs safetensors weights (a UserError says so otherwise).
    """
    from safetensors import safe_open
    from transformers import AutoConfig, GenerationConfig
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import convert_and_load_state_dict_in_model
    from transformers.modeling_utils import LoadStateDictConfig, PreTrainedModel

    from padd.distributed import shard

    if isinstance(dtype, str):
        raise TypeError(f"load_sharded_causal_lm needs a torch dtype, got {dtype!r}")
    files = safetensors_files(path)
    config = AutoConfig.from_pretrained(path)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    config.name_or_path = str(path)
    shard(model, offload=offload)
    load_config = LoadStateDictConfig(
        pretrained_model_name_or_path=str(path),
        device_map={"": "cpu" if offload else str(torch.device(device))},
        dtype=dtype,
        dtype_plan=model._get_dtype_plan(dtype),  # modules the class keeps in float32
        weight_mapping=get_model_conversion_mapping(model),
    )
    handles = [safe_open(f, framework="pt", device="cpu", backend="pread") for f in files]
    try:
        # lazy slices: nothing is read until the loader indexes this rank's part
        state = {name: _lazy(h, name) for h in handles for name in h.keys()}  # noqa: SIM118 (a handle, not a dict)
        with _read_when_converted():
            info, _ = convert_and_load_state_dict_in_model(model=model, state_dict=state, load_config=load_config)
    finally:
        for h in handles:
            h.__exit__(None, None, None)
    PreTrainedModel._finalize_model_loading(model, load_config, info)
    if offload:  # FSDP2 moves the parameters to the device to run; buffers must be there already
        for module in model.modules():
            for name, buffer in module._buffers.items():
                if buffer is not None:
                    module._buffers[name] = buffer.to(device)
    # The loader set fresh parameters, trainable or not by dtype: zero-size ones stay out of training,
    # as `shard` left them (padd.distributed.shard).
    for p in model.parameters():
        if p.numel() == 0:
            p.requires_grad_(False)
    # without a generation_config.json the one built from the config stays, as in from_pretrained
    with contextlib.suppress(OSError):
        model.generation_config = GenerationConfig.from_pretrained(path)
    if Path(str(path)).is_dir():
        load_selection_bias(model, path)
    return model.train(train)


@contextlib.contextmanager
def _read_when_converted():
    """transformers' loader reads every tensor ahead on worker threads by default, so the per-expert
    pieces of all layers wait in memory beside their fused copies (a peak of ~1.5 x this rank's share
    on a 2-rank MoE); with its HF_DEACTIVATE_ASYNC_LOAD each is read as its weight is converted."""
    old = os.environ.get(_SYNC_LOAD)
    os.environ[_SYNC_LOAD] = "1"
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(_SYNC_LOAD, None)
        else:
            os.environ[_SYNC_LOAD] = old


_SYNC_LOAD = "HF_DEACTIVATE_ASYNC_LOAD"


def _lazy(handle, name: str):
    """A tensor of an open safetensors file, unread (its slice); read at once when it has no elements,
    which a `pread` slice cannot index (safetensors 0.8)."""
    piece = handle.get_slice(name)
    return handle.get_tensor(name) if 0 in piece.get_shape() else piece


def safetensors_files(path) -> list[str]:
    """The safetensors weight files of checkpoint `path` (one file, or the shards its index lists),
    local or on the Hub; a UserError when it has none."""
    from transformers.utils import SAFE_WEIGHTS_INDEX_NAME, SAFE_WEIGHTS_NAME, cached_file

    def find(name: str) -> str | None:
        return cached_file(str(path), name, _raise_exceptions_for_missing_entries=False)

    single = find(SAFE_WEIGHTS_NAME)
    if single is not None:
        return [single]
    index = find(SAFE_WEIGHTS_INDEX_NAME)
    if index is not None:
        names = sorted(set(json.loads(Path(index).read_text())["weight_map"].values()))
        return [cached_file(str(path), name) for name in names]
    raise UserError(
        f"{path}: no {SAFE_WEIGHTS_NAME} or {SAFE_WEIGHTS_INDEX_NAME} there, and --parallel fsdp reads each "
        "process's shard of the weights from safetensors files; re-save the checkpoint with transformers' "
        "save_pretrained (which writes them), or use --parallel ddp"
    )
