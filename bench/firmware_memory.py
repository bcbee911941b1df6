"""Minimum MicroPython heap for (a) microdot's hello world and (b) all of iotlib, both as .mpy, same run.

    .venv/bin/python bench/firmware_memory.py [--micropython PATH]

The interpreter is the pinned unix micropython (64-bit) or --micropython PATH (e.g. a 32-bit build, the size of a
Pico W's objects); its version and word size are printed first. The simulated board (picosim) is test equipment that
a Pico W has built in: it runs in place from a ROMFS image of its own, which is not counted (figures are the heap
minus that image).

(a) serves 50 GETs (4 concurrent) from the host with every answer 200 and no MemoryError;
(b) `bench/mp_iotlib_all.py`: imports every iotlib manager from .mpy, constructs each and exercises it once against
    real local peers (HTTP + SNTP servers in the same process), then prints `OK max_stall_ms=<n>`; the figure is the
    smallest heap found by bisection at which SETTLE runs in a row then pass.
Budget for (b): ≤ 64K on the unix port (a 64-bit build: objects are about twice their size on the Pico).
(b') the same workload with the code executed in place from a ROMFS image (bench/mp_romfs.py), as on a board with
    iotlib in a ROMFS partition or frozen into the firmware: its min heap minus the image (which a board keeps in flash).
Then the import cost of each iotlib module (bench/mp_import_cost.py): where (b)'s heap goes, loaded both ways.
"""
from __future__ import annotations

import argparse
import platform
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
import heaplib  # noqa: E402

BUDGET_K = 64
#: iotlib figures are the smallest heap where this many runs in a row pass (see heaplib.min_heap's settle)
SETTLE = 5


#: KiB of the simulator's image, added to every .mpy run's heap (set by main)
SIM_K = 0
#: a run from the ROMFS image (which holds the simulator too) mounts nothing else
NO_SIM = {"PICOIOT_SIM_IMG": ""}


def sim_env() -> dict:
    """A .mpy run: it mounts the simulator's own image (not counted: SIM_K is added to its heap)."""
    return heaplib.mp_env({"PICOIOT_SIM_IMG": str(heaplib.BUILD / "sim.img")})


def iotlib_ok(heap_k: int, stalls: dict, last: dict, romfs: Path | None = None) -> bool:
    args = [str(romfs), "mp_iotlib_all"] if romfs else []
    proc = heaplib.run_module("mp_romfs" if romfs else "mp_iotlib_all", heap_k + (0 if romfs else SIM_K), args,
                              timeout=120, env=heaplib.mp_env(NO_SIM) if romfs else sim_env())
    m = re.search(r"^OK max_stall_ms=(\d+)", proc.stdout, re.M)
    if m and proc.returncode == 0 and "MemoryError" not in proc.stdout + proc.stderr:
        stalls.setdefault(heap_k, []).append(int(m.group(1)))
        return True
    last["fail"] = (proc.stdout + proc.stderr)[-600:]
    return False


def imports_ok(heap_k: int) -> bool:
    proc = heaplib.run_module("mp_import_cost", heap_k + SIM_K, timeout=60, env=sim_env())
    return proc.returncode == 0 and "MOD bench_script" in proc.stdout


def import_costs(romfs: Path | None = None, heap_k: int = 512) -> list[tuple[str, int, int, int]]:
    """(module, heap bytes, of which interned-name pool bytes, new qstrs) per module, in import order."""
    args = [str(romfs), "mp_import_cost"] if romfs else []
    proc = heaplib.run_module("mp_romfs" if romfs else "mp_import_cost", heap_k, args, timeout=60,
                              env=heaplib.mp_env(NO_SIM) if romfs else sim_env())
    if proc.returncode != 0:
        raise RuntimeError("mp_import_cost failed:\n" + proc.stdout[-400:] + proc.stderr[-400:])
    snaps = []
    for line in proc.stdout.splitlines():
        if line.startswith("MOD "):
            _, tag, free = line.split()
            snaps.append([tag, int(free)])
        else:
            m = re.search(r"n_qstr=(\d+), n_str_data_bytes=\d+, n_total_bytes=(\d+)", line)
            if m and snaps and len(snaps[-1]) == 2:
                snaps[-1] += [int(m.group(1)), int(m.group(2))]
    return [(b[0], a[1] - b[1], b[3] - a[3], b[2] - a[2]) for a, b in zip(snaps, snaps[1:])]


def main(argv: list[str] | None = None) -> int:
    global SIM_K
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--micropython", metavar="PATH", help="the unix micropython to measure (default: "
                    "$PICOIOT_MICROPYTHON, else the pinned 64-bit one)")
    a = ap.parse_args(argv)
    heaplib.paths.use_micropython(a.micropython)
    print(f"interpreter: {heaplib.paths.micropython_info()}", flush=True)
    heaplib.bundle()
    for script in ("mp_hello.py", "mp_iotlib_all.py", "mp_import_cost.py", "mp_romfs.py"):
        heaplib.compile_script(Path(__file__).parent / script)
    image = heaplib.romfs_image(["mp_iotlib_all", "mp_import_cost"])
    image_k = -(-image.stat().st_size // 1024)
    SIM_K = heaplib.image_k(heaplib.sim_image())
    print(f"counted: iotlib as .mpy in the heap ((b'): in place from a {image_k}K ROMFS image); the simulator in place "
          f"from its own {SIM_K}K image, not counted", flush=True)
    hello = heaplib.min_heap(lambda k: heaplib.served_ok("mp_hello", k), lo=8, hi=256)
    stalls: dict = {}
    last: dict = {}
    iot = heaplib.min_heap(lambda k: iotlib_ok(k, stalls, last), lo=8, hi=512, settle=SETTLE)
    floor = heaplib.min_heap(imports_ok, lo=8, hi=512, settle=SETTLE)
    rom = heaplib.min_heap(lambda k: iotlib_ok(k, {}, last, image), lo=image_k + 8, hi=512 + image_k, settle=SETTLE)
    rom_net = rom - image_k if rom else None
    print(f"machine: {platform.machine()} {platform.system()}, micropython unix port")
    print(f"{'workload':<58}{'min heap':>10}")
    print(f"{'(a) microdot hello world (50 GETs)':<58}{str(hello) + 'K' if hello else 'failed':>10}")
    print(f"{'(b) iotlib: every manager constructed + used':<58}{str(iot) + 'K' if iot else 'failed':>10}")
    print(f"{'    of which: importing it all (+ the bench script), no work':<58}"
          f"{str(floor) + 'K' if floor else 'failed':>10}")
    print(f"{chr(40) + 'b' + chr(39) + ') same, code in place from ROMFS (heap minus the image)':<58}"
          f"{str(rom_net) + 'K' if rom_net else 'failed':>10}   ({rom}K - {image_k}K image)")
    if hello and iot:
        print(f"ratio (b)/(a): {iot / hello:.2f}   budget for (b): {BUDGET_K}K -> {'within' if iot <= BUDGET_K else 'OVER'}")
    if hello and rom_net:
        print(f"ratio (b')/(a): {rom_net / hello:.2f}")
    if iot is None:
        print("iotlib run failed even at 512K:\n" + last.get("fail", ""))
        return 1
    every = sorted(s for runs in stalls.values() for s in runs)
    print(f"max event-loop stall during (b): {max(stalls[iot])} ms at {iot}K, {every[-1]} ms worst of "
          f"{len(every)} passing runs")
    for title, rows in (("from .mpy files", import_costs()), ("in place from ROMFS", import_costs(image))):
        print(f"\nimport cost, {title} (heap after gc, in import order; qstrs = interned names, pool grows by doubling):")
        print(f"{'module':<14}{'heap':>8}{'code+objs':>11}{'qstr pool':>11}{'new qstrs':>11}")
        lib = [r for r in rows if r[0] != "bench_script"]
        for name, heap, qbytes, nq in rows:
            print(f"{name:<14}{heap:>8}{heap - qbytes:>11}{qbytes:>11}{nq:>11}")
        total = [sum(r[i] for r in lib) for i in (1, 2, 3)]
        print(f"{'iotlib total':<14}{total[0]:>8}{total[0] - total[1]:>11}{total[1]:>11}{total[2]:>11}")
        print("(hal's row is without the simulated board it loads here: that runs in place from its image)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
