"""Loading a causal LM checkpoint the way every stage needs it: one dtype, one device, train or eval."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

from padd.routing import load_selection_bias


def load_causal_lm(path, *, dtype: torch.dtype | str = torch.float32, device="cpu", train: bool = False, **kwargs):
    """`AutoModelForCausalLM.from_pretrained(path)` in `dtype` on `device`, in eval mode unless `train`
    (students are trained in float32; a teacher may be bfloat16, `dtype="auto"` keeps the checkpoint's),
    with a saved selection bias applied (padd.routing.BIAS_FILE).
    Extra keyword arguments (e.g. `config=`) go to `from_pretrained`."""
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, **kwargs).to(device)
    if Path(str(path)).is_dir():
        load_selection_bias(model, path)  # stage IV's bias of a router without a native one, if saved
    return model.train(train)
