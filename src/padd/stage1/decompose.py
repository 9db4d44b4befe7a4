"""`padd decompose`: the Stage I recipe — sample a corpus, record co-activations, cluster, build, save."""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table
from tqdm.auto import tqdm

from padd.config import DecomposeConfig, to_dict
from padd.corpus import sample_corpus
from padd.distributed import setup
from padd.errors import UserError
from padd.flops import forward_flops_per_token, param_counts
from padd.generation.vllm import vllm_unserved_shapes
from padd.io import atomic_save_dir, atomic_write_json, check_out_dir
from padd.models import load_causal_lm
from padd.stage1.activations import collect_layer_stats, owned_layers
from padd.stage1.build import TeacherError, build_student, validate_teacher
from padd.stage1.partition import check_sizes, plan_layer
from padd.stage1.reference import STAGE1_FILE

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "auto": "auto"}


def _load_teacher_config(path: str):
    from transformers import AutoConfig

    if not Path(path).is_dir() or not (Path(path) / "config.json").exists():
        raise TeacherError(f"--teacher {path!r} is not a local checkpoint folder with a config.json")
    return AutoConfig.from_pretrained(path)


def decompose(cfg: DecomposeConfig, console: Console | None = None) -> dict:
    """Run Stage I (docs/method.md §3 steps 1-4, 7) and write the student; returns the padd_stage1.json record."""
    console = console or Console()
    timings: dict[str, float] = {}
    clock = time.perf_counter()

    def lap(name: str) -> None:
        nonlocal clock
        now = time.perf_counter()
        timings[name] = round(now - clock, 3)
        clock = now

    out = Path(cfg.out)
    check_out_dir(out, cfg.overwrite)
    ranks = setup(cfg.device)
    device = ranks.device(cfg.device)

    # Everything checkable from the config fails before any weight is read.
    tcfg, expert_size = _checked_teacher_config(cfg)
    tokenizer, windows = _sample_windows(cfg)
    lap("sample")

    teacher = load_causal_lm(cfg.teacher, dtype=_DTYPES[cfg.dtype], device=device)
    teacher.eval()
    lap("load")

    moe_layers = list(range(cfg.dense_layers, tcfg.num_hidden_layers))
    stats = _coactivation_stats(cfg, teacher, windows, moe_layers, ranks)
    lap("activations")

    plans = _plan_layers(cfg, stats, moe_layers, tcfg.intermediate_size, expert_size, ranks)
    lap("cluster")
    if not ranks.main:
        ranks.barrier()  # rank 0 builds and writes the student
        return {}

    student = build_student(teacher, plans, top_k=cfg.top_k)
    lap("build")

    record = _stage1_record(
        cfg, plans, expert_size, tokens=int(windows.numel()), processes=ranks.world, timings=timings
    )
    _save_student(out, student, tokenizer, teacher, record)
    lap("save")
    # The record inside the atomic save lacks only its own save time; add it now (a few bytes).
    record["timings_s"] = timings
    atomic_write_json(out / STAGE1_FILE, record)
    print_summary(console, tcfg, student.config, record, out)
    for problem in vllm_unserved_shapes(student.config):
        console.print(f"[yellow]warning: vLLM's CPU build cannot serve this student: {problem}")
    ranks.barrier()
    return record


def _checked_teacher_config(cfg: DecomposeConfig):
    """(the teacher's config, the expert size) once everything checkable from the config is checked:
    the teacher's architecture, --dense-layers and the expert sizes. Reads no weight, so that a bad
    option fails before any model loads."""
    from transformers import AutoModelForCausalLM

    tcfg = _load_teacher_config(cfg.teacher)
    with torch.device("meta"):
        validate_teacher(AutoModelForCausalLM.from_config(tcfg))
    n_layers = tcfg.num_hidden_layers
    if not 0 <= cfg.dense_layers < n_layers:
        raise UserError(
            f"--dense-layers must be in [0, {n_layers}) for a {n_layers}-layer teacher, got {cfg.dense_layers}"
        )
    expert_size = check_sizes(
        tcfg.intermediate_size, cfg.experts, cfg.top_k, cfg.shared_neurons, cfg.expert_size, cfg.init
    )
    return tcfg, expert_size


def _sample_windows(cfg: DecomposeConfig):
    """(the teacher's tokenizer, the corpus sample in its tokens: [n_windows, seq_len] windows)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(cfg.teacher)
    windows = sample_corpus(
        cfg.corpus,
        tokenizer,
        text_field=cfg.text_field,
        split=cfg.split,
        n_tokens=cfg.tokens,
        seq_len=cfg.seq_len,
        seed=cfg.seed,
    )
    return tokenizer, windows


def _coactivation_stats(cfg: DecomposeConfig, teacher, windows: torch.Tensor, moe_layers: list[int], ranks) -> dict:
    """The teacher's neuron statistics ({layer: LayerStats}) of the MoE layers this rank owns, or {}
    when neither the cluster init nor shared neurons need them."""
    if not (cfg.init == "cluster" or cfg.shared_neurons > 0):
        return {}
    return collect_layer_stats(
        teacher,
        windows,
        proj_dim=cfg.proj_dim,
        batch_size=cfg.batch_size,
        seed=cfg.seed,
        layers=moe_layers,
        progress=cfg.progress,
        ranks=ranks,
    )


def _plan_layers(cfg: DecomposeConfig, stats: dict, moe_layers: list[int], d_ff: int, expert_size: int, ranks) -> list:
    """The expert plan of every decoder layer (None for the dense ones), on every rank; a collective.

    Several ranks: each clusters its own layers (those it got the statistics of) and all share
    plans. Consumes `stats`, freeing each layer's statistics once it is planned."""
    mine = {}
    bar = tqdm(
        owned_layers(moe_layers, ranks),
        desc=f"{cfg.init} init",
        unit="layer",
        disable=not (cfg.progress and ranks.main),
    )
    for i in bar:
        st = stats.pop(i, None)
        mine[i] = plan_layer(
            st.features if st else None,
            st.active_frac if st else None,
            d_ff=d_ff,
            n_experts=cfg.experts,
            expert_size=expert_size,
            shared=cfg.shared_neurons,
            init=cfg.init,
            seed=cfg.seed + i,
            kmeans_iters=cfg.kmeans_iters,
        )
    by_layer = {i: p for part in ranks.all_gather_objects(mine) for i, p in part.items()}
    return [None] * cfg.dense_layers + [by_layer[i] for i in moe_layers]


def _stage1_record(
    cfg: DecomposeConfig, plans: list, expert_size: int, *, tokens: int, processes: int, timings: dict
) -> dict:
    """The padd_stage1.json record of a run: its geometry, every layer's plan, `timings` (the dict
    itself, so that phases timed later still show) and the config."""
    return {
        "teacher": str(Path(cfg.teacher).resolve()),
        "experts": cfg.experts,
        "top_k": cfg.top_k,
        "expert_size": expert_size,
        "init": cfg.init,
        "seed": cfg.seed,
        "tokens": tokens,
        "dense_layers": cfg.dense_layers,
        "processes": processes,
        "layers": [
            {"dense": True, "experts": [], "shared": [], "objective": None} if p is None else p.to_json() for p in plans
        ],
        "timings_s": timings,
        "config": to_dict(cfg),
    }


def _save_student(out: Path, student, tokenizer, teacher, record: dict) -> None:
    """Write the student, the teacher's tokenizer and generation config, and `record` to `out`, atomically."""

    def write(tmp: Path) -> None:
        student.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        if getattr(teacher, "generation_config", None) is not None:
            teacher.generation_config.save_pretrained(tmp)
        (tmp / STAGE1_FILE).write_text(json.dumps(record, indent=1))

    atomic_save_dir(out, write)


def print_summary(console: Console, tcfg, scfg, record: dict, out: Path, context: int = 1024) -> None:
    """One screen: the expert geometry, params, FLOPs per token at `context` tokens, time per phase."""
    t_total, _ = param_counts(tcfg)
    s_total, s_active = param_counts(scfg)
    t_flops, s_flops = forward_flops_per_token(tcfg, context), forward_flops_per_token(scfg, context)
    table = Table(title=f"Stage I: {record['init']} init -> {out}", show_header=False)
    table.add_column(style="bold")
    table.add_column()
    objectives = [layer["objective"] for layer in record["layers"] if layer.get("objective") is not None]
    table.add_row(
        "experts",
        f"E={record['experts']} (top-{record['top_k']}), {record['expert_size']} neurons each, "
        f"shared={len(record['layers'][-1]['shared'])}, dense layers={record['dense_layers']}",
    )
    table.add_row(
        "params", f"teacher {t_total / 1e6:.2f}M | student {s_total / 1e6:.2f}M total, {s_active / 1e6:.2f}M active"
    )
    table.add_row(
        f"FLOPs/token @{context}",
        f"teacher {t_flops / 1e6:.2f}M | student {s_flops / 1e6:.2f}M | ratio {s_flops / t_flops:.3f}x",
    )
    if objectives:
        table.add_row(
            "K-Means objective", f"mean {sum(objectives) / len(objectives):.4g} over {len(objectives)} layers"
        )
    table.add_row("tokens", str(record["tokens"]))
    table.add_row(
        "time",
        " | ".join(f"{k} {v:.2f}s" for k, v in record["timings_s"].items())
        + f" | total {sum(record['timings_s'].values()):.2f}s",
    )
    console.print(table)
