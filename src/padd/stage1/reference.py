"""The teacher clusters a student's experts are measured against, read from what Stage I wrote.

A student built by `padd decompose` carries `padd_stage1.json` (expert e of decoder layer l holds
cluster e of teacher layer l); a pretrained student seeded by `padd seed` carries `padd_seed.json`
(expert e of MoE layer l is matched to a cluster of the teacher layer its layer maps to). Both read
as one `Reference`, which the warm-up's router fit, NMI / ESI and the study's analysis use.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

STAGE1_FILE = "padd_stage1.json"
SEED_FILE = "padd_seed.json"


@dataclass
class Reference:
    """Per MoE layer of the student: the teacher layer it maps to and the [E, S] teacher neuron
    indices of the cluster each expert stands for (row e: expert e's cluster)."""

    teacher_layers: list[int]
    clusters: list[torch.Tensor]
    source: str  # the file it came from: padd_stage1.json or padd_seed.json

    def to(self, device) -> Reference:
        return Reference(self.teacher_layers, [c.to(device) for c in self.clusters], self.source)


def read_reference(folder: str | Path) -> Reference | None:
    """The reference clusters saved beside a student, or None when it has neither file."""
    folder = Path(folder)
    if (folder / SEED_FILE).exists():
        record = json.loads((folder / SEED_FILE).read_text())
        layers = record["layers"]
        return Reference(
            [la["teacher_layer"] for la in layers], [torch.tensor(la["experts"]) for la in layers], SEED_FILE
        )
    if (folder / STAGE1_FILE).exists():
        record = json.loads((folder / STAGE1_FILE).read_text())
        indexed = [(i, la) for i, la in enumerate(record["layers"]) if not la.get("dense")]
        return Reference([i for i, _ in indexed], [torch.tensor(la["experts"]) for _, la in indexed], STAGE1_FILE)
    return None


def copy_reference(source: str | Path, target: Path) -> None:
    """Carry the reference file(s) of a student into the folder a later stage writes it to."""
    for name in (STAGE1_FILE, SEED_FILE):
        if (Path(source) / name).exists():
            (target / name).write_text((Path(source) / name).read_text())
