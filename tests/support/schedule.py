"""Which tests pytest-xdist must keep together (tests/conftest.py): decided from the files, in the controlling
process, which collects nothing itself."""
from __future__ import annotations

import functools
import re
from pathlib import Path

_MODULE_SCOPED = re.compile(r"""scope\s*=\s*["'](module|package)["']""")


@functools.lru_cache(maxsize=None)
def _declares_shared_fixtures(path: Path) -> bool:
    try:
        return bool(_MODULE_SCOPED.search(path.read_text(errors="replace")))
    except OSError:
        return False


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
