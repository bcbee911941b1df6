"""bench/device_memory.py's scenario must keep working, or its figures silently mean nothing: each controller runs the
issue-4 scenario once (real `picoiot server`, registration, config, 200 API requests, alarm, heartbeats; sensors: 3
WebSocket clients, 3 s instead of 30) at the heap it is documented to fit in (docs/benchmarks.md `## Device memory`),
code in a ROMFS image (the image on top of the heap, as flash). No bisection. And a heap far too small must fail the
run (a MemoryError is seen as a failure, not a hang or a false pass)."""
import sys
from pathlib import Path

import pytest

from picoiot.procs import micropython_available

BENCH = Path(__file__).resolve().parents[2] / "bench"
sys.path.insert(0, str(BENCH))
import device_memory  # noqa: E402

pytestmark = pytest.mark.skipif(not micropython_available(), reason="needs the unix micropython and mpy-cross")

#: Heap (KiB, beyond the ROMFS image) each controller is documented to complete the scenario with.
FITS_K = {"relays": 224, "sensors": 256}  # minimum 176K / 208K (2026-12-02) + 48K


@pytest.fixture(scope="module")
def romfs_bundle():
    from picoiot import build
    return build.build_romfs(device_memory.BUNDLE)


@pytest.mark.parametrize("kind", ["relays", "sensors"])
def test_scenario_passes_at_the_documented_heap_with_code_in_romfs(romfs_bundle, kind):
    assert device_memory.scenario(kind, "romfs", FITS_K[kind], ws_seconds=3)


def test_scenario_fails_when_the_heap_is_far_too_small(romfs_bundle):
    assert not device_memory.scenario("relays", "mpy", 96, ws_seconds=3)


def test_code_alone_floor_loads_with_room_and_fails_below_the_code(romfs_bundle):
    # The floor the bench prints in mpy mode (the controller's modules loaded, nothing run): ≈ 186K relays, 213K
    # sensors on the unix port. It must pass with room to spare and fail well below it.
    assert device_memory.code_loads("sensors", 320)
    assert not device_memory.code_loads("sensors", 96)
