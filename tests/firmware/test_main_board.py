# firmware/main.py's log sink: on by default, sized for the free flash, off (console only) without room.
import fwtest
from iotlib import log

import main as board_main

_S = {"log": {"file": True, "level": "info", "max_bytes": 16384, "backups": 2}}


def test_the_log_file_is_sized_for_the_free_flash():
    root = fwtest.tmpdir("flash")
    try:
        path = board_main._log_sink(_S, root, free=96 * 1024)
        assert path == root + "/log/device.log"
        assert log._sink.max_bytes == 96 * 1024 // 8 // 3  # an eighth of the free flash over 3 files
        log.get("t").info("hello")
        with open(path) as f:
            assert "hello" in f.read()
        assert board_main._log_sink(_S, root, free=10 * 1024 * 1024) and log._sink.max_bytes == 16384
    finally:
        log.configure()


def test_no_free_flash_means_console_only_and_one_line_saying_so():
    root = fwtest.tmpdir("flash")
    try:
        path = board_main._log_sink(_S, root, free=96 * 1024)
        assert path is not None and log._sink is not None
        assert board_main._log_sink(_S, root, free=4096) is None and log._sink is None  # and one console line
    finally:
        log.configure()
