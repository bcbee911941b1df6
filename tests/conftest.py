"""How the suite is shared between pytest-xdist workers (`./dev test` runs `-n 2`).

A test file whose tests share a module-scoped fixture (a module's simulated devices, the schemathesis suite's server),
defined in the file or in a conftest.py above it, runs on one worker, in its own order: each such fixture starts once,
and tests that follow one another in a module still do. Where that fixture is parametrised in the file (one server per
database), each parameter is such a unit. Every other test is scheduled on its own. The biggest files go
first (xdist orders units by their number of tests), so the single tests fill the end of the run.

This is what `--dist loadgroup` with an `xdist_group` mark per module would do, but xdist 3.8 tells its scheduler the
groups by editing test ids, which has no effect under pytest 9.2 (pytest-dev/pytest-xdist#1386): the groups are
decided here, in the controlling process, from the files.

Per-worker isolation needs nothing more: each worker is a process with its own temporary directories, free ports,
SQLite files and PostgreSQL schemas (support.pg names them by process)."""
import pytest

from support.schedule import unit


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config, log):
    if config.getvalue("dist") != "load":  # an explicit --dist other than the default: as asked
        return None
    from xdist.scheduler import LoadScopeScheduling

    class ByModuleFixture(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return unit(nodeid, config.rootpath)

    return ByModuleFixture(config, log)
