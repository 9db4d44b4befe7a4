"""The per-phase clock of Phase B steps: seconds add up per phase, the peak memory sees a transient."""

import time

import pytest
import torch

from padd.phase_b.phases import PhaseClock, _rss_bytes

pytestmark = pytest.mark.skipif(_rss_bytes() is None, reason="no /proc/self/statm: CPU memory is not measured here")


def test_seconds_accumulate_per_phase_and_unused_phases_stay_zero():
    clock = PhaseClock(torch.device("cpu"), ("generation", "teacher", "update"))
    for _ in range(2):
        with clock("generation"):
            time.sleep(0.02)
    assert clock.seconds["generation"] >= 0.04 and clock.seconds["teacher"] == 0.0
    row = clock.metrics()
    assert set(row) == {"time_generation", "time_teacher", "time_update", "mem_generation_gb"}


def test_peak_memory_catches_a_buffer_freed_inside_the_phase():
    clock = PhaseClock(torch.device("cpu"), ("small", "big"))
    with clock("small"):
        pass
    with clock("big"):
        buffer = torch.ones(64 * 2**20)  # 256 MiB, touched
        time.sleep(0.05)  # ten sampling periods
        del buffer
    assert clock.peak_gb["big"] - clock.peak_gb["small"] > 0.2
