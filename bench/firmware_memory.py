"""Minimum MicroPython heap for (a) microdot's hello world and (b) all of iotlib, both as .mpy, same run.

    .venv/bin/python bench/firmware_memory.py

(a) serves 50 GETs (4 concurrent) from the host with every answer 200 and no MemoryError;
(b) `bench/mp_iotlib_all.py`: imports every iotlib manager from .mpy, constructs each and exercises it once against
    real local peers (HTTP + SNTP servers in the same process), then prints `OK max_stall_ms=<n>`.
Budget for (b): ≤ 64K on the unix port (a 64-bit build: objects are about twice their size on the Pico).
"""
from __future__ import annotations

import platform
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
import heaplib  # noqa: E402

BUDGET_K = 64


def iotlib_ok(heap_k: int, last: dict) -> bool:
    proc = heaplib.run_module("mp_iotlib_all", heap_k, timeout=120)
    m = re.search(r"^OK max_stall_ms=(\d+)", proc.stdout, re.M)
    if m and proc.returncode == 0 and "MemoryError" not in proc.stdout + proc.stderr:
        last["stall"] = int(m.group(1))
        return True
    last["fail"] = (proc.stdout + proc.stderr)[-600:]
    return False


def main() -> int:
    heaplib.bundle()
    for script in ("mp_hello.py", "mp_iotlib_all.py"):
        heaplib.compile_script(Path(__file__).parent / script)
    hello = heaplib.min_heap(lambda k: heaplib.served_ok("mp_hello", k), lo=8, hi=256)
    last: dict = {}
    iot = heaplib.min_heap(lambda k: iotlib_ok(k, last), lo=8, hi=512)
    print(f"machine: {platform.machine()} {platform.system()}, micropython unix port, code as .mpy")
    print(f"{'workload':<44}{'min heap':>10}")
    print(f"{'(a) microdot hello world (50 GETs)':<44}{hello}K".replace("NoneK", "failed"))
    print(f"{'(b) iotlib: every manager constructed + used':<44}{iot}K".replace("NoneK", "failed"))
    if hello and iot:
        print(f"ratio (b)/(a): {iot / hello:.2f}   budget for (b): {BUDGET_K}K -> {'within' if iot <= BUDGET_K else 'OVER'}")
    if iot is None:
        print("iotlib run failed even at 512K:\n" + last.get("fail", ""))
        return 1
    print(f"max event-loop stall during (b) at {iot}K: {last.get('stall')} ms")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
