"""The per-phase clock of Phase B steps: seconds add up per phase, the peak memory sees a transient."""

import time

import pytest
import torch

from padd.phase_b import phases
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


@pytest.mark.skipif(phases._TRIM is None, reason="glibc's malloc_trim is not available here")
def test_a_phase_does_not_inherit_the_memory_an_earlier_phase_freed():
    """Small tensors come from the heap, which keeps their pages after they are freed (a few survivors
    pin it): the clock hands the free pages back before each phase, so an idle phase after a busy one
    logs its own peak, not the busy one's."""
    clock = PhaseClock(torch.device("cpu"), ("busy", "idle"))
    with clock("busy"):
        small = [torch.ones(8_000) for _ in range(10_000)]  # 32 KB each: 320 MB of heap
        survivors = small[::50]
        del small
    with clock("idle"):
        pass
    assert clock.peak_gb["busy"] - clock.peak_gb["idle"] > 0.2
    del survivors
