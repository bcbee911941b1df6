from iotlib import compat
import fwtest


def test_ticks_monotonic():
    a = compat.ticks_ms()
    b = compat.ticks_ms()
    assert compat.ticks_diff(b, a) >= 0


def test_format_exc_names_error():
    try:
        raise ValueError("boom")
    except ValueError as e:
        s = compat.format_exc(e)
    assert "ValueError" in s and "boom" in s


def test_lazy_import_unknown_attr():
    import iotlib
    fwtest.raises(AttributeError, getattr, iotlib, "Nope")


def test_tmpdir_is_empty():
    import os
    d = fwtest.tmpdir()
    assert os.listdir(d) == []
