"""`padd reproduce`: the paper's study on one initialisation and one budget, resumable cell by cell.

A study preset (YAML: `tiny`, `mini`, or a file) names the teacher, the data and the benchmarks,
and holds the settings of each stage as overrides of that command's config. The run directory:

    study.json            the resolved preset and the rows asked for
    cells.json            finished cells with their wall time (a cell listed here is never redone)
    teacher/              trained for the built-in presets (or the given checkpoint is used)
    student/              a pretrained MoE student trained for a preset that names one (tiny-pretrained)
    stage1-{init}/        padd decompose, init cluster (PADD) and random (the −I ablation); with a
                          pretrained student, stage1-seeded/ is padd seed (unseeded: the student as it is)
    warmup-{init}/        padd warmup
    warmup-{init}-{start}/ the same experts with the other router start (padd warmup --epochs 0)
    train/{row}-s{seed}/  padd train, one run per method, ablation or swept value and seed
    eval/{row}[-s{seed}].json      padd eval of every row on every benchmark
    analysis/{row}[-s{seed}].json  NMI, ESI and expert loads against the teacher's clusters
    report.md, plots/     written by padd.report from the files above

Every row starts from the preset's router start (`warmup.router_init`); the other start (uniform
or distill) is built beside it for the NMI / ESI comparison at both starts (unless
--no-compare-inits) and for the `other-start` row, which measures what the choice of start is worth.

With a pretrained MoE student (`student:`, the paper's own setting) Stage I is `padd seed`, every
trained row starts from the seeded and warmed-up student, the Base row is the pretrained student as
it is, and PADD −I is PADD from the same warm-up of the unseeded student.

The package: preset.py (the study YAML and its checks), run.py (the rows and the order of their
cells), cells.py (the ledger of finished cells and the folder lock), stages.py (each cell's work).
"""

from padd.study.preset import Study, load_study, parse_sweep, sweep_row
from padd.study.run import StudyRun, run_reproduce

__all__ = ["Study", "StudyRun", "load_study", "parse_sweep", "run_reproduce", "sweep_row"]
