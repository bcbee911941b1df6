"""Which tests pytest-xdist must keep together (tests/conftest.py): decided from the files, in the controlling
process, which collects nothing itself."""
from __future__ import annotations

import functools
import re
from pathlib import Path

_MODULE_SCOPED = re.compile(r"""scope\s*=\s*["'](module|package)["']""")
_FIXTURE = re.compile(r"@pytest\.fixture\((.*?)\)\s*\n\s*(?:async\s+)?def ", re.S)


def _read(path: Path) -> str:
    try:
        return path.read_text(errors="replace")
    except OSError:
        return ""


@functools.lru_cache(maxsize=None)
def _declares_shared_fixtures(path: Path) -> bool:
    return bool(_MODULE_SCOPED.search(_read(path)))


@functools.lru_cache(maxsize=None)
def _parametrised_module_fixture(path: Path) -> bool:
    """path declares a module-scoped fixture with params: each parameter is a fixture instance of its own."""
    return any(_MODULE_SCOPED.search(args) and "params" in args for args in _FIXTURE.findall(_read(path)))


def unit(nodeid: str, root: Path) -> str:
    """The scheduling unit of a test: its file when its tests share a module-scoped fixture, or the file and the
    test's parameters when that fixture is parametrised in the file (a server per database); else the test alone."""
    file = nodeid.split("::", 1)[0]
    if not shares_module_fixtures(root / file, root):
        return nodeid
    params = re.search(r"\[.*\]$", nodeid)
    return file + params.group(0) if params and _parametrised_module_fixture(root / file) else file


def shares_module_fixtures(test_file: Path, root: Path) -> bool:
    """test_file, or a conftest.py between it and root, defines a module- or package-scoped fixture."""
    if _declares_shared_fixtures(test_file):
        return True
    d = test_file.parent
    while d != root and root in d.parents:
        if _declares_shared_fixtures(d / "conftest.py"):
            return True
        d = d.parent
    return False
