"""Input paths checked before anything heavy loads: a model folder that is there, holds a checkpoint,
and is the kind the command needs (a dense teacher or an MoE student); data paths that exist.

Reads only `config.json` (no transformers import), so a wrong path fails in a fraction of a second
with one line that says what to give instead."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

from padd.errors import UserError

# config keys that make a checkpoint a Mixture-of-Experts (DeepSeek/GLM, Qwen-MoE, Mixtral/OLMoE)
_MOE_KEYS = ("n_routed_experts", "num_experts", "num_local_experts")
_HUB_NAME = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")  # owner/name


def _looks_local(spec: str) -> bool:
    """A path the user means on this machine, rather than a hub or `datasets` name like owner/name."""
    return Path(spec).expanduser().exists() or not _HUB_NAME.match(spec)


def is_moe_config(config: dict) -> bool:
    return any(config.get(key) for key in _MOE_KEYS)


def check_model_dir(spec: str, flag: str, kind: str = "any") -> None:
    """Fail with what to do unless `spec` (a local folder; hub names pass) holds a model of `kind`:
    "any", "dense" (a teacher) or "moe" (a student)."""
    if not _looks_local(spec):
        return
    path = Path(spec).expanduser()
    if not path.exists():
        raise UserError(f"{flag} {spec}: no such folder; give a local checkpoint folder (config.json + weights)")
    config_file = path / "config.json"
    if not path.is_dir() or not config_file.is_file():
        raise UserError(f"{flag} {spec}: no config.json there, so not a model checkpoint; give the checkpoint's folder")
    config = json.loads(config_file.read_text())
    if kind == "moe" and not is_moe_config(config):
        raise UserError(
            f"{flag} {spec} is a dense model ({config.get('model_type', '?')}); give an MoE student "
            "(from padd decompose, padd seed or padd warmup, or a pretrained transformers MoE model)"
        )
    if kind == "dense" and is_moe_config(config):
        raise UserError(
            f"{flag} {spec} is a Mixture-of-Experts model ({config.get('model_type', '?')}); give the dense "
            "teacher it was (or will be) decomposed from"
        )


# what --parallel fsdp reads each rank's shard of the weights from (padd.models.load_sharded_causal_lm)
SAFETENSORS_FILES = ("model.safetensors", "model.safetensors.index.json")


def check_safetensors(spec: str, flag: str) -> None:
    """Fail with what to do unless the local checkpoint `spec` (hub names pass) has safetensors weights."""
    if _looks_local(spec) and not any((Path(spec).expanduser() / name).is_file() for name in SAFETENSORS_FILES):
        raise UserError(
            f"{flag} {spec}: no {' or '.join(SAFETENSORS_FILES)} there, and --parallel fsdp reads each process's "
            "shard of the weights from safetensors files; re-save the checkpoint with transformers' "
            "save_pretrained (which writes them), or use --parallel ddp"
        )


def check_data_path(spec: str | None, flag: str) -> None:
    """Fail unless a local-looking data spec (a file or folder) exists; world names, `datasets` names
    (owner/name, name:config) and comma-separated lists of them pass to their loaders."""
    for part in (spec or "").split(","):
        part = part.strip()
        if not part or part.startswith("world") or ":" in part or not _looks_local(part):
            continue
        if not Path(part).expanduser().exists():
            raise UserError(
                f"{flag} {part}: no such file or folder; give a local file/folder, a `datasets` name or a world name"
            )


# command -> (flag, config field, model kind) of its model paths, and (flag, field) of its data paths
MODEL_PATHS: dict[str, tuple[tuple[str, str, str], ...]] = {
    "decompose": (("--teacher", "teacher", "dense"),),
    "seed": (("--student", "student", "moe"), ("--teacher", "teacher", "dense")),
    "warmup": (("--student", "student", "moe"), ("--teacher", "teacher", "dense")),
    "train": (("--student", "student", "moe"), ("--teacher", "teacher", "dense")),
    "eval": (("--model", "model", "any"),),
    "reproduce": (("--teacher", "teacher", "dense"),),
}
DATA_PATHS: dict[str, tuple[tuple[str, str], ...]] = {
    "decompose": (("--corpus", "corpus"),),
    "seed": (("--corpus", "corpus"),),
    "warmup": (("--corpus", "corpus"),),
    "train": (("--data", "data"),),
    "eval": (("--bench", "bench"),),
}


def check_paths(command: str, cfg) -> None:
    """Every model and data path of one command's config, checked before its recipe runs."""
    # several processes under --parallel fsdp load sharded, from safetensors files only
    sharded = getattr(cfg, "parallel", None) == "fsdp" and int(os.environ.get("WORLD_SIZE", "1")) > 1
    for flag, field, kind in MODEL_PATHS.get(command, ()):
        value = getattr(cfg, field, None)
        if value is not None:
            check_model_dir(str(value), flag, kind)
            if sharded:
                check_safetensors(str(value), flag)
    if command == "eval" and getattr(cfg, "bench_dir", None):
        # names resolve inside --bench-dir: every one must be found there before the model loads
        from padd.data import resolve_bench

        if not Path(cfg.bench_dir).is_dir():
            raise UserError(f"--bench-dir {cfg.bench_dir}: no such folder")
        for name in (cfg.bench or "").split(","):
            if name.strip():
                resolve_bench(name.strip(), cfg.bench_dir)
        return
    for flag, field in DATA_PATHS.get(command, ()):
        check_data_path(getattr(cfg, field, None), flag)
