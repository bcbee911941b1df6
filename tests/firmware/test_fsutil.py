import os
import fwtest
from iotlib import fsutil


def test_write_atomic_replaces_and_leaves_no_tmp():
    d = fwtest.tmpdir()
    p = d + "/a.json"
    fsutil.write_json_atomic(p, {"v": 1})
    fsutil.write_json_atomic(p, {"v": 2})
    assert fsutil.read_json(p) == {"v": 2}
    assert os.listdir(d) == ["a.json"]


def test_read_json_corrupt_gives_default():
    d = fwtest.tmpdir()
    p = d + "/bad.json"
    with open(p, "w") as f:
        f.write("{not json")
    assert fsutil.read_json(p, {"x": 0}) == {"x": 0}
    assert fsutil.read_json(d + "/missing.json") is None


def test_makedirs_nested():
    d = fwtest.tmpdir()
    fsutil.makedirs(d + "/a/b/c")
    assert fsutil.is_dir(d + "/a/b/c")
    fsutil.makedirs(d + "/a/b/c")
