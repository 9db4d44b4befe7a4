"""Models that ship with padd, so that a demo starts at once instead of training them first.

Each is a transformers checkpoint folder under padd/presets/models/ (safetensors, tokenizer, config)
with a record, `padd_shipped.json`: the command that trained it, the commit of the code it ran, its
`padd eval` scores on every world skill with the settings that gave them, and the SHA-256 of its
weights file. `shipped_model` refuses a folder whose weights no longer match their record.

    python -m padd.shipped tiny --commit SHA   # the record of a freshly trained presets/models/teacher-tiny,
                                               # trained by SHIPPED's command at commit SHA

A study or a plan names one as `shipped:NAME` (`teacher: shipped:tiny`).
"""

from __future__ import annotations

import argparse
import hashlib
import json
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from padd.errors import UserError

RECORD = "padd_shipped.json"
WEIGHTS = "model.safetensors"


@dataclass(frozen=True)
class Shipped:
    """One shipped model: its folder under padd/presets/models and the `padd teacher` run that made it."""

    folder: str
    preset: str
    seed: int
    # the shipped model whose tokenizer it trained with (a student shares its teacher's), if any
    tokenizer_of: str | None = None

    @property
    def command(self) -> str:
        # a student trains with its teacher's tokenizer: `--tokenizer TEACHER`, the shipped teacher's folder
        uses = " --tokenizer TEACHER" if self.tokenizer_of else ""
        out = "STUDENT" if self.tokenizer_of else "TEACHER"
        return f"padd teacher --preset {self.preset}{uses} --seed {self.seed} --eval-per-skill 0 --out {out}"


SHIPPED = {
    # the demo's teacher: of seeds 0 and 1, the one that scored higher on the val split's math skills
    "tiny": Shipped("teacher-tiny", "tiny", seed=1),
    # the tiny-paper study's pretrained MoE student of that teacher (its recipe was chosen on val)
    "tiny-paper-moe": Shipped("student-tiny-paper-moe", "tiny-paper-moe", seed=0, tokenizer_of="tiny"),
}
# how a study or a plan names a shipped model instead of a folder: `shipped:tiny`
PREFIX = "shipped:"
# the `padd eval` settings of each record's scores: the tiny study's (padd/presets/study-tiny.yaml)
EVAL_SETTINGS = {"world_per_skill": 50, "max_new_tokens": 96, "batch_size": 64, "split": "test"}


def model_dir(name: str) -> Path:
    """The folder of shipped model `name` (it may not exist yet in a checkout that has not built it)."""
    if name not in SHIPPED:
        raise UserError(f"no shipped model {name!r}; padd ships {', '.join(SHIPPED)}")
    return Path(str(resources.files("padd.presets").joinpath("models", SHIPPED[name].folder)))


def resolve(spec: str) -> str:
    """`spec` itself, or for `shipped:NAME` the checked folder of shipped model NAME."""
    if not spec.startswith(PREFIX):
        return spec
    return str(shipped_model(spec.removeprefix(PREFIX)))


def weights_sha256(folder: Path) -> str:
    """The SHA-256 of a checkpoint's weights file, hex."""
    digest = hashlib.sha256()
    with open(folder / WEIGHTS, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def shipped_model(name: str) -> Path:
    """The folder of shipped model `name`, after checking its weights against its record."""
    folder = model_dir(name)
    record_file = folder / RECORD
    if not record_file.exists() or not (folder / WEIGHTS).exists():
        raise UserError(
            f"the shipped {name} model is missing from {folder} (a checkout without it?); "
            f"train one afresh with --train-teacher"
        )
    record = json.loads(record_file.read_text())
    if (found := weights_sha256(folder)) != record["sha256"]:
        raise UserError(
            f"{folder / WEIGHTS} does not match its record ({found[:12]} against {record['sha256'][:12]}): "
            "restore it with git checkout, or train one afresh with --train-teacher"
        )
    return folder


def write_record(name: str, commit: str) -> dict:
    """Evaluate shipped model `name` as it is on disk and write its record beside it; `commit`: the
    commit of the code that trained it."""
    folder = model_dir(name)
    scores = recorded_eval(folder)
    record = {
        "name": name,
        "command": SHIPPED[name].command,
        "commit": commit,
        "eval": {"settings": EVAL_SETTINGS, "pass@1": scores},
        "sha256": weights_sha256(folder),
    }
    (folder / RECORD).write_text(json.dumps(record, indent=1) + "\n")
    return record


def recorded_eval(folder: Path, scratch: Path | None = None) -> dict[str, float]:
    """Greedy Pass@1 per world skill of the model in `folder`, by `padd eval` with the records'
    settings (EVAL_SETTINGS); its JSON goes to `scratch` (default: a file beside the folder, removed)."""
    from padd.config import EvalConfig
    from padd.eval import run_eval
    from padd.world.tasks import SKILLS

    out = scratch or folder.parent / f".{folder.name}-eval.json"
    bench = ",".join(f"world:{s}" for s in SKILLS)
    report = run_eval(EvalConfig(model=str(folder), out=str(out), bench=bench, overwrite=True, **EVAL_SETTINGS))
    if scratch is None:
        out.unlink()
    return {b.removeprefix("world:"): r["pass@1"] for b, r in report["benchmarks"].items()}


def main() -> None:
    parser = argparse.ArgumentParser(description="write a shipped model's record (padd/shipped.py)")
    parser.add_argument("name", choices=tuple(SHIPPED))
    parser.add_argument("--commit", required=True, help="the commit whose code trained it (git rev-parse HEAD then)")
    args = parser.parse_args()
    print(json.dumps(write_record(args.name, args.commit), indent=1))


if __name__ == "__main__":
    main()
