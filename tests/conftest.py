"""The whole suite's scheduling under pytest-xdist (`./dev test` runs it with `-n 2 --dist loadgroup`).

Tests that share a module-scoped fixture (a module's simulated devices, the schemathesis suite's server per backend)
run on one worker, in their file's order, so each such fixture starts once and the tests that follow one another in
a module still do. Everything else is scheduled test by test. Per-worker isolation needs nothing more: each worker is
a process with its own temporary directories, free ports, SQLite files and PostgreSQL schemas (support.pg names them
by process)."""
import pytest


@pytest.hookimpl(tryfirst=True)  # before xdist reads the marks
def pytest_collection_modifyitems(config, items):
    for item in items:
        info = getattr(item, "_fixtureinfo", None)
        if info is None:
            continue
        shared = sorted(name for name, defs in info.name2fixturedefs.items() if defs and defs[-1].scope == "module")
        if not shared:
            continue
        spec = getattr(item, "callspec", None)
        params = [f"{name}={spec.params[name]}" for name in shared if spec is not None and name in spec.params]
        item.add_marker(pytest.mark.xdist_group("::".join([item.module.__name__, *params])))
