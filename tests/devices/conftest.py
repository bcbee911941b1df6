"""Fixtures: one control plane (`picoiot server` subprocess) per session, devices per module (see devtest.py)."""
import os
import re
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # tests/stcli.py
from devtest import BUNDLE, MP_DIR, RUNTIME, SCRIPTS, ControlPlane, Device  # noqa: E402


@pytest.fixture(scope="session")
def bundle():
    if RUNTIME == "micropython":
        from picoiot.build import compile_tree
        from picoiot.procs import ensure_bundle
        ensure_bundle(BUNDLE)
        compile_tree(MP_DIR, SCRIPTS)
    return BUNDLE


@pytest.fixture(scope="session")
def cp(tmp_path_factory):
    """The shared control plane. A test may stop() and start() it again (same port and data) but must leave it
    running."""
    c = ControlPlane(tmp_path_factory.mktemp("cp"))
    try:
        yield c.start()
    finally:
        c.stop()


@pytest.fixture(scope="module")
def device_factory(cp, bundle, tmp_path_factory, request):
    """device_factory(kind, config=None, name=None) → a started Device, stopped at the end of the module."""
    started = []
    tmp = tmp_path_factory.mktemp("dev")
    mod = re.sub(r"[^A-Za-z0-9]+", "-", request.module.__name__.split(".")[-1].removeprefix("test_"))

    def make(kind, config=None, name=None, start=True, pinlog=False, typed=True):
        d = Device(cp, tmp, f"{mod}-{name or kind}", kind, config, pinlog=pinlog, typed=typed)
        started.append(d)
        return d.start() if start else d
    try:
        yield make
    finally:
        for d in started:
            d.stop()
        # the heaps in devtest.HEAP are meant to be enough: a MemoryError anywhere is a failure even if no test saw it
        oom = [d.id for d in started if b"MemoryError" in d.child.log.read_bytes()]
        assert not oom, f"MemoryError in the log of {oom} (heap {[d.child.heap for d in started]})"
