"""The README's walk-through as a new user runs it: `picoiot demo` (what `./dev demo` runs), then every command of the
README's demo block and every command the demo prints under "try", each in a new shell that has nothing but the system
PATH and `source .picoiot-demo/demo.env`. The commands are read from README.md and from the demo's output, so a change
to either is run here."""
import json
import re
import subprocess
import time

from devtest import wait_until
from picoiot import paths
from picoiot.procs import free_port
from test_cli import _reap, _spawn


def _readme_commands() -> list[str]:
    text = (paths.REPO / "README.md").read_text()
    block = text.split("```bash\nsource .picoiot-demo/demo.env", 1)[1].split("```", 1)[0]
    lines = ("source .picoiot-demo/demo.env" + block).replace("\\\n", " ").splitlines()
    return [re.sub(r"\s+#\s.*$", "", ln).strip() for ln in lines if ln.strip()]


def _new_shell(cmd: str, cwd, timeout=30, **kw):
    env = {"HOME": str(cwd), "PATH": "/usr/local/bin:/usr/bin:/bin", "LANG": "C.UTF-8", "COLUMNS": "200"}
    return subprocess.run(["bash", "--norc", "--noprofile", "-c", f"source .picoiot-demo/demo.env && {cmd}"],
                          cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout, **kw)


def _printed_commands(out: str) -> tuple[str, list[str]]:
    """The `source …/demo.env` line the demo prints, and the commands of its "try" section (comments left out)."""
    source = re.search(r"(source \S+demo\.env)", out).group(1)
    section = out.split("\ntry\n", 1)[1].split("\ndashboard", 1)[0]
    return source, [ln.strip() for ln in section.splitlines() if ln.strip() and not ln.strip().startswith("#")]


def _run(cmd: str, cwd) -> None:
    """cmd in a new shell: it must succeed, a curl must get JSON that is no error, the CLI must list the demo's
    devices, the WebSocket client must print frames."""
    if cmd.startswith("python -m websockets"):
        env = {"HOME": str(cwd), "PATH": "/usr/local/bin:/usr/bin:/bin", "LANG": "C.UTF-8", "COLUMNS": "200"}
        p = subprocess.Popen(["bash", "--norc", "--noprofile", "-c", f"source .picoiot-demo/demo.env && exec {cmd}"],
                             cwd=cwd, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True)
        time.sleep(5)  # a few frames at the demo's sampling interval
        p.terminate()
        out, err = p.communicate(timeout=20)
        assert "No module named" not in err and '"values"' in out, (cmd, out[-500:], err[-1500:])
        return
    out = _new_shell(cmd, cwd)
    assert out.returncode == 0, (cmd, out.stdout[-500:], out.stderr[-1500:])
    if cmd.startswith("curl"):
        body = json.loads(out.stdout)
        assert "error" not in body, (cmd, body)
    else:
        assert "demo-relays" in out.stdout, (cmd, out.stdout[-1000:])


def test_the_readme_walkthrough_works_in_a_new_shell(tmp_path, bundle):
    data = tmp_path / ".picoiot-demo"
    log = tmp_path / "demo.log"
    proc = _spawn(["demo", "--data-dir", data, "--port", free_port(), "--duration", 300], log)
    try:
        wait_until(lambda: (data / "demo.env").exists() or proc.poll() is not None, 150, "demo.env")
        assert proc.poll() is None, log.read_text()[-3000:]
        info = json.loads((data / "demo.json").read_text())
        devs = {d["kind"]: d["url"] for d in info["devices"]}
        commands = _readme_commands()
        assert commands[0] == "source .picoiot-demo/demo.env" and len(commands) >= 6, commands
        for cmd in commands[1:]:
            _run(cmd.replace("http://127.0.0.1:8081", devs["relays"]).replace("http://127.0.0.1:8082", devs["sensors"])
                 .replace("ws://127.0.0.1:8082", devs["sensors"].replace("http://", "ws://")), tmp_path)
        # then what the demo itself tells the user to do, as printed
        wait_until(lambda: "cloud vs device" in log.read_text(), 30, "the demo's instructions printed")
        source, printed = _printed_commands(log.read_text())
        assert source == f"source {data.resolve() / 'demo.env'}", source
        assert len(printed) >= 6 and printed[-1].endswith("/reboot"), printed  # (the reboot last: it resets relays)
        for cmd in printed:
            _run(cmd, tmp_path)
    finally:
        _reap(proc)
