"""The first hour of a new user (issue 17): CLI mistakes end in one line that says what to do, nothing is made
up on the way (no secret minted into a fresh ./.picoiot), the README lists every command and every remote command
takes --url and --token."""
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

PICOIOT = str(Path(sys.executable).parent / "picoiot")


def _run(args, cwd, timeout=60):
    env = {k: v for k, v in os.environ.items() if not k.startswith("PICOIOT_")}
    return subprocess.run([PICOIOT, *args], cwd=cwd, capture_output=True, text=True, timeout=timeout, env=env)


def _one_line_error(out, *words):
    assert out.returncode == 2, (out.returncode, out.stdout, out.stderr)
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), out.stderr
    for w in words:
        assert w in lines[0], (w, lines[0])


def test_remote_commands_without_a_token_say_how_to_get_one_and_create_nothing(tmp_path):
    _one_line_error(_run(["devices", "list", "--url", "http://127.0.0.1:1"], tmp_path), "PICOIOT_TOKEN", "--token")
    assert not (tmp_path / ".picoiot").exists()


def test_token_without_a_servers_data_dir_refuses_to_mint_from_a_new_secret(tmp_path):
    _one_line_error(_run(["token", "--role", "admin"], tmp_path), "--data-dir")
    assert not (tmp_path / ".picoiot" / "secrets.json").exists()


@pytest.mark.real_server
def test_a_rejected_token_says_what_to_do(server, tmp_path):
    _one_line_error(_run(["devices", "list", "--url", server.url, "--token", "not-a-token"], tmp_path),
                    "401", "did not accept the token")


def test_a_bad_database_url_is_one_line(tmp_path):
    out = _run(["server", "--db", "postgresql://nope@127.0.0.1:1/x", "--port", "0", "--data-dir", str(tmp_path / "d")],
               tmp_path)
    _one_line_error(out, "cannot connect to the database", "127.0.0.1")
    assert "Traceback" not in out.stdout + out.stderr


def test_ota_takes_url_like_the_other_remote_commands(tmp_path):
    out = _run(["ota", "status", "--url", "http://127.0.0.1:1", "--token", "x"], tmp_path)
    assert "No such option" not in out.stderr and out.returncode != 0, out.stderr
    assert "cannot reach" in out.stderr or "error" in out.stderr.lower(), out.stderr


def test_demo_port_out_of_range_is_a_usage_error(tmp_path):
    out = _run(["demo", "--port", "65536", "--data-dir", str(tmp_path / "demo")], tmp_path)
    assert out.returncode == 2 and "65535" in out.stderr and "Traceback" not in out.stderr, out.stderr


def _cli_commands():
    import typer.main

    from picoiot.cli import app
    return typer.main.get_command(app).commands


def _readme_table(readme: str) -> str:
    return readme.split("## The `picoiot` command", 1)[1].split("\n## ", 1)[0]


def test_the_readme_lists_every_command_and_every_remote_one_takes_url():
    from picoiot import paths
    commands = _cli_commands()
    listed = set(re.findall(r"`picoiot ([a-z-]+)", _readme_table((paths.REPO / "README.md").read_text())))
    assert set(commands) <= listed, sorted(set(commands) - listed)
    for group in ("devices", "config", "state", "alarms", "ota"):
        subs = commands[group].commands
        assert subs, group

        def leaves(cmds, path):
            for name, c in cmds.items():
                if hasattr(c, "commands"):
                    yield from leaves(c.commands, path + [name])
                else:
                    yield path + [name], c
        for path, c in leaves(subs, [group]):
            if path == ["ota", "keygen"]:  # writes a signing key pair here; talks to no server
                continue
            opts = {o for p in c.params for o in getattr(p, "opts", [])}
            assert "--url" in opts and "--token" in opts, (path, sorted(opts))
