"""`make gpu-check`'s script, as its CPU dry run: the Qwen pair's shapes with every width / 32, one
process. Marked slow (minutes of bf16 on a CPU); CI runs it with `make test-slow`."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).parent.parent / "benchmarks" / "gpu_check.py"


@pytest.mark.slow
def test_gpu_check_runs_the_pair_at_its_shapes_and_reports(tmp_path):
    args = ["--device", "cpu", "--shrink", "32", "--processes", "1", "--workdir", str(tmp_path)]
    proc = subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])["measured"]
    assert report["bf16 experts: grouped matmul inputs"] == "bfloat16"
    assert report["warm-up: steps, s (wall incl. load)"].startswith("1, ")
    tokens = int(report["Phase B (transformers): tokens, wall s"].split(",")[0])
    assert tokens > 0
    assert "update" in report["Phase B (transformers): peak GiB by phase (rank 0)"]
