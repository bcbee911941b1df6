"""What each device bundle contains: `bundles/<unit>/manifest.py`, one per installable unit, in micropython-lib style.

A manifest is Python run with these functions (the subset of MicroPython's `tools/manifestfile.py` we use):
- `metadata(description=..., version=...)`: what the unit is;
- `require(unit)`: everything another unit contains (each unit counted once);
- `package(name, files=None, base_path=...)`: the package directory `name` under base_path, every .py in it or the
  listed ones;
- `module(file, base_path=...)`: one top-level module.

A base path is relative to the manifest's directory, or starts with `$(FIRMWARE)` (the repository's firmware/) or
`$(MICRODOT)` (the directory the pinned microdot is installed in). Units: `iotlib`, `microdot`, `relays`, `sensors`,
`board` (what `picoiot firmware build` writes) and `sim` (the board bundle plus the simulated board).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from . import paths

ROOT = paths.REPO / "bundles"


class ManifestError(ValueError):
    pass


@dataclass(frozen=True)
class File:
    """One source file of a bundle: where it is (base / rel), and rel is also its path in the bundle."""
    base: Path
    rel: str

    @property
    def src(self) -> Path:
        return self.base / self.rel

    @property
    def top(self) -> str:
        """Its top-level name in the bundle: the package directory or the module file."""
        return self.rel.split("/", 1)[0]


def _base(manifest: Path, base_path: str) -> Path:
    for var, where in (("$(FIRMWARE)", lambda: paths.FIRMWARE), ("$(MICRODOT)", lambda: paths.microdot_dir().parent)):
        if base_path.startswith(var):
            return where() / base_path[len(var):].lstrip("/")
    return (manifest.parent / base_path).resolve()


def read(unit: str) -> list[File]:
    """Every file of `unit` and of the units it requires, each once, in manifest order."""
    out: dict[tuple[Path, str], File] = {}
    _read(unit, out, [])
    return list(out.values())


def _read(unit: str, out: dict, stack: list[str]) -> None:
    if unit in stack:
        raise ManifestError(f"bundles: {' → '.join(stack + [unit])}: a unit requires itself")
    manifest = ROOT / unit / "manifest.py"
    if not manifest.is_file():
        raise ManifestError(f"bundles: no unit {unit!r} ({manifest} missing)")

    def add(f: File) -> None:
        if not f.src.is_file():
            raise ManifestError(f"{manifest}: {f.src} does not exist")
        out.setdefault((f.base, f.rel), f)

    def package(name: str, files=None, base_path: str = ".", opt=None) -> None:  # noqa: ARG001 - MicroPython's opt
        base = _base(manifest, base_path)
        if files is None:
            found = sorted(p for p in (base / name).rglob("*.py") if "__pycache__" not in p.parts)
            if not found:
                raise ManifestError(f"{manifest}: package {name!r}: no .py under {base / name}")
            files = [p.relative_to(base / name).as_posix() for p in found]
        for f in files:
            add(File(base, f"{name}/{f}"))

    def module(name: str, base_path: str = ".", opt=None) -> None:  # noqa: ARG001
        add(File(_base(manifest, base_path), name))

    def require(name: str) -> None:
        _read(name, out, stack + [unit])

    def metadata(description: str = "", version: str = "", **_kw) -> None:
        pass

    exec(compile(manifest.read_text(), str(manifest), "exec"),
         {"package": package, "module": module, "require": require, "metadata": metadata})


def tops(unit: str) -> set[str]:
    """The top-level names (packages and module files) a unit puts in a bundle."""
    return {f.top for f in read(unit)}
