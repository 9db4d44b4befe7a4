"""--precision bf16: the routed experts compute in bfloat16 under autocast, on every MoE architecture
padd supports, while the weights they train stay float32."""

import pytest
import torch
from torch.overrides import TorchFunctionMode
from transformers import AutoModelForCausalLM

from helpers import MOE_CONFIGS, save_moe_student
from padd.precision import experts_in_autocast_dtype, routers_in_fp32
from padd.routing import moe_layer_indices


class MatmulDtypes(TorchFunctionMode):
    """The input dtypes of every grouped_mm call (transformers' default experts implementation)."""

    def __init__(self):
        super().__init__()
        self.seen: list[torch.dtype] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if getattr(func, "__name__", "") in ("grouped_mm", "_grouped_mm"):
            self.seen.append(args[0].dtype)
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("model_type", sorted(MOE_CONFIGS))
def test_routed_experts_compute_in_bf16_under_autocast(tmp_path, llama_teacher, model_type):
    path = save_moe_student(tmp_path / "student", model_type, llama_teacher)
    model = AutoModelForCausalLM.from_pretrained(path).train()
    assert model.config._experts_implementation == "grouped_mm"
    ids = torch.randint(0, model.config.vocab_size, (2, 16))
    routers_in_fp32(model)

    def dtypes():
        spy = MatmulDtypes()
        with torch.autocast("cpu", dtype=torch.bfloat16), spy:
            logits = model(input_ids=ids).logits
        return spy.seen, logits

    plain, reference = dtypes()
    assert plain and set(plain) == {torch.float32}  # the defect: float32 matmuls under bf16 autocast
    assert experts_in_autocast_dtype(model) == len(moe_layer_indices(model))
    cast, logits = dtypes()
    assert set(cast) == {torch.bfloat16} and len(cast) == len(plain)
    torch.testing.assert_close(logits.float(), reference.float(), rtol=0.05, atol=0.05)
    logits.float().square().mean().backward()
    experts = model.model.layers[moe_layer_indices(model)[0]].mlp.experts
    for name, weight in experts.named_parameters():
        assert weight.dtype == torch.float32 and weight.grad is not None and weight.grad.dtype == torch.float32, name
    assert any(float(w.grad.abs().sum()) > 0 for w in experts.parameters())
    # outside autocast nothing changes
    spy = MatmulDtypes()
    with spy:
        model(input_ids=ids)
    assert set(spy.seen) == {torch.float32}
