"""`./dev` as a new user first runs it: in a fresh copy of the repository (no .venv), `./dev test` says how long the
suite takes, then says that it is installing while the install is still under way (the first install takes about a
minute and pip runs quietly). The run is stopped once both are seen: the install and the suite themselves are what
the rest of the suite tests."""
import os
import queue
import re
import shutil
import signal
import subprocess
import sys
import threading
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
STAMP = Path(".venv") / ".picoiot-installed"
#: A bound on waiting for each line (a stuck ./dev fails instead of hanging the suite), not a timing requirement.
LINE_WAIT_S = 120


def fresh_copy(dst: Path) -> Path:
    """The repository's tracked files as they are in the working tree, without .venv, node_modules or build/."""
    files = subprocess.run(["git", "ls-files", "-z"], cwd=REPO, capture_output=True, check=True).stdout
    for rel in filter(None, files.decode().split("\0")):
        src = REPO / rel
        if src.is_file():
            (dst / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dst / rel)
    return dst


def new_shell_env() -> dict:
    """The environment of a new shell: no virtualenv on PATH, none of the suite's own settings."""
    venv_bin = str(Path(sys.executable).parent)
    path = [p for p in os.environ.get("PATH", "").split(os.pathsep) if p and Path(p) != Path(venv_bin)]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PICOIOT_", "PYTEST", "VIRTUAL_ENV"))}
    env["PATH"] = os.pathsep.join(path)
    return env


class Lines:
    """A child's merged output, line by line, read on a thread so the test can wait for a line with a bound."""

    def __init__(self, proc: subprocess.Popen):
        self.seen: list[str] = []
        self._q: queue.Queue = queue.Queue()
        threading.Thread(target=self._read, args=(proc.stdout,), daemon=True).start()

    def _read(self, out) -> None:
        for line in out:
            self._q.put(line.rstrip("\n"))
        self._q.put(None)

    def next(self) -> str:
        try:
            line = self._q.get(timeout=LINE_WAIT_S)
        except queue.Empty:
            raise AssertionError(f"./dev printed nothing more within {LINE_WAIT_S} s after: {self.seen}") from None
        if line is None:
            raise AssertionError(f"./dev ended after printing: {self.seen}")
        self.seen.append(line)
        return line


def test_first_run_of_dev_says_how_long_the_suite_takes_and_that_it_is_installing(tmp_path):
    repo = fresh_copy(tmp_path / "picoiot")
    assert not (repo / ".venv").exists()
    proc = subprocess.Popen(["./dev", "test"], cwd=repo, env=new_shell_env(), stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        out = Lines(proc)
        banner = out.next()
        assert "suite" in banner, f"the first line is not the suite's banner: {banner}"
        # a duration a reader can plan with: "about 12 minutes", "8 min"
        assert re.search(r"\b\d+(\.\d+)? ?(minutes?|min)\b", banner), banner
        line = out.next()
        install_running = proc.poll() is None and not (repo / STAMP).exists()
        assert "installing" in line, out.seen
        assert install_running, "the install had already finished when ./dev first said it was installing"
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # its pip and venv: the copy is thrown away
        except ProcessLookupError:
            pass
        proc.wait(30)
        proc.stdout.close()
