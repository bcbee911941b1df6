"""`picoiot devices | config | state | alarms`: the operators' API from the command line.

Each command is one or two calls through `picoiot.remote` (the shared client and its one error path), with the
remote commands' options: `--url`/`$PICOIOT_URL`, `--token`/`$PICOIOT_TOKEN` (or a token minted from `--data-dir`),
`--namespace`.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

import typer

from .cliopts import DataDir, fail
from .cliopts import Namespace as Ns
from .cliopts import Token as Tok
from .cliopts import Url
from .remote import connect


def _print_json(obj: Any) -> None:
    from rich.console import Console
    Console().print_json(json.dumps(obj))


def _show(url: Optional[str], tok: Optional[str], data_dir: Optional[Path], namespace: str, path: str) -> None:
    """A viewer's GET of one document of the namespace, printed as JSON."""
    _print_json(connect(url, tok, data_dir, namespace, "viewer").call("GET", f"/api/v1/namespaces/{namespace}{path}"))


def _parse_assignments(pairs: list[str]) -> dict:
    """`a.b=5 c=on d=null` → {"a": {"b": 5}, "c": "on", "d": None}: values are JSON if they parse, else strings."""
    out: dict = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        if not sep or not key:
            fail(f"expected KEY=VALUE, got {pair!r}")
        try:
            value = json.loads(raw)
        except ValueError:
            value = raw
        node = out
        parts = key.split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                fail(f"{key}: conflicts with another assignment")
        node[parts[-1]] = value
    return out


def _ago(ts: Optional[int]) -> str:
    import time
    if not ts:
        return "-"
    s = max(0, int(time.time() - ts / 1000))
    return f"{s}s ago" if s < 120 else f"{s // 60}m ago" if s < 7200 else f"{s // 3600}h ago"


devices_app = typer.Typer(help="List, inspect, regroup and delete devices (over HTTP).", no_args_is_help=True)
config_app = typer.Typer(help="Show and change device and group config (over HTTP).", no_args_is_help=True)
state_app = typer.Typer(help="Show shadows and set desired state (over HTTP).", no_args_is_help=True)
alarms_app = typer.Typer(help="List and acknowledge alarms (over HTTP).", no_args_is_help=True)


@devices_app.command("list")
def devices_list(namespace: str = Ns, online: Optional[bool] = typer.Option(None, "--online/--offline"),
                 as_json: bool = typer.Option(False, "--json"), url: Optional[str] = Url,
                 tok: Optional[str] = Tok, data_dir: Optional[Path] = DataDir) -> None:
    """Devices of a namespace."""
    from rich.console import Console
    from rich.table import Table
    api = connect(url, tok, data_dir, namespace, "viewer")
    params = {} if online is None else {"online": str(online).lower()}
    devs = api.call("GET", f"/api/v1/namespaces/{namespace}/devices", params=params)["devices"]
    if as_json:
        _print_json(devs)
        return
    t = Table("device", "type", "group", "online", "last seen", "firmware", "config v", "address")
    for d in devs:
        t.add_row(d["device_id"], d["device_type"] or "-", d["group"] or "-",
                  "[green]yes[/]" if d["online"] else "[red]no[/]", _ago(d["last_seen"]), d["firmware"] or "-",
                  str(d["config_version"]), d["address"] or "-")
    Console().print(t)


@devices_app.command("show")
def devices_show(device_id: str, namespace: str = Ns, url: Optional[str] = Url, tok: Optional[str] = Tok,
                 data_dir: Optional[Path] = DataDir) -> None:
    """One device record."""
    _show(url, tok, data_dir, namespace, f"/devices/{device_id}")


@devices_app.command("group")
def devices_group(device_id: str, group: str = typer.Argument(..., help="group name, or '-' for none"),
                  namespace: str = Ns, url: Optional[str] = Url, tok: Optional[str] = Tok,
                  data_dir: Optional[Path] = DataDir) -> None:
    """Move a device to a config group."""
    api = connect(url, tok, data_dir, namespace, "admin")
    d = api.call("PATCH", f"/api/v1/namespaces/{namespace}/devices/{device_id}",
                 json={"group": None if group == "-" else group})
    typer.echo(f"{device_id}: group {d['group'] or '-'}, config v{d['config_version']}")


@devices_app.command("delete")
def devices_delete(device_id: str, namespace: str = Ns, url: Optional[str] = Url, tok: Optional[str] = Tok,
                   data_dir: Optional[Path] = DataDir) -> None:
    """Forget a device (record, config history, shadows, alarms)."""
    connect(url, tok, data_dir, namespace, "admin").call(
        "DELETE", f"/api/v1/namespaces/{namespace}/devices/{device_id}")
    typer.echo(f"deleted {device_id}")


@config_app.command("show")
def config_show(device_id: str, namespace: str = Ns, url: Optional[str] = Url, tok: Optional[str] = Tok,
                data_dir: Optional[Path] = DataDir) -> None:
    """Effective config, overrides and the device's last report."""
    _show(url, tok, data_dir, namespace, f"/devices/{device_id}/config")


@config_app.command("set")
def config_set(device_id: str, assignments: list[str] = typer.Argument(..., help="KEY.PATH=VALUE (VALUE as JSON; "
                                                                                   "null removes)"),
               namespace: str = Ns, url: Optional[str] = Url, tok: Optional[str] = Tok,
               data_dir: Optional[Path] = DataDir) -> None:
    """Merge into a device's config overrides, e.g. `sampling.interval_ms=500`."""
    out = connect(url, tok, data_dir, namespace, "admin").call(
        "PATCH", f"/api/v1/namespaces/{namespace}/devices/{device_id}/config",
        json={"overrides": _parse_assignments(assignments)})
    typer.echo(f"{device_id}: config v{out['version']}")


@config_app.command("group")
def config_group(name: str, assignments: list[str] = typer.Argument(None, help="KEY.PATH=VALUE (replaces the "
                                                                                 "group's overrides)"),
                 namespace: str = Ns, url: Optional[str] = Url, tok: Optional[str] = Tok,
                 data_dir: Optional[Path] = DataDir) -> None:
    """Create or replace a group's overrides."""
    out = connect(url, tok, data_dir, namespace, "admin").call(
        "PUT", f"/api/v1/namespaces/{namespace}/groups/{name}",
        json={"overrides": _parse_assignments(assignments or [])})
    typer.echo(f"group {out['name']}: {json.dumps(out['overrides'])}")


@state_app.command("show")
def state_show(device_id: str, shadow: str = typer.Option("default"), namespace: str = Ns,
               url: Optional[str] = Url, tok: Optional[str] = Tok, data_dir: Optional[Path] = DataDir) -> None:
    """A shadow document (desired, reported, delta, version)."""
    _show(url, tok, data_dir, namespace, f"/devices/{device_id}/shadows/{shadow}")


@state_app.command("set")
def state_set(device_id: str, assignments: list[str] = typer.Argument(..., help="KEY=VALUE, e.g. relay1=on"),
              shadow: str = typer.Option("default"), version: Optional[int] = typer.Option(
                  None, help="apply only if the shadow is still at this version"),
              namespace: str = Ns, url: Optional[str] = Url, tok: Optional[str] = Tok,
              data_dir: Optional[Path] = DataDir) -> None:
    """Set desired state (the device applies it and reports back), e.g. `state set relay-1 relay1=on`."""
    body: dict[str, Any] = {"state": {"desired": _parse_assignments(assignments)}}
    if version is not None:
        body["version"] = version
    doc = connect(url, tok, data_dir, namespace, "operator").call(
        "POST", f"/api/v1/namespaces/{namespace}/devices/{device_id}/shadows/{shadow}", json=body)
    typer.echo(f"{device_id}/{shadow}: v{doc['version']} delta {json.dumps(doc['state']['delta'])}")


@alarms_app.command("list")
def alarms_list(namespace: str = Ns, state: Optional[str] = typer.Option(None, help="firing | resolved"),
                device: Optional[str] = None, severity: Optional[str] = None,
                unacked: bool = typer.Option(False, help="only alarms not acknowledged"),
                as_json: bool = typer.Option(False, "--json"), url: Optional[str] = Url,
                tok: Optional[str] = Tok, data_dir: Optional[Path] = DataDir) -> None:
    """Alarms, newest first."""
    from rich.console import Console
    from rich.table import Table
    params: dict[str, Any] = {k: v for k, v in (("state", state), ("device", device), ("severity", severity)) if v}
    if unacked:
        params["acked"] = "false"
    rows = connect(url, tok, data_dir, namespace, "viewer").call("GET", f"/api/v1/namespaces/{namespace}/alarms",
                                                                 params=params)["alarms"]
    if as_json:
        _print_json(rows)
        return
    colour = {"critical": "red", "error": "red", "warning": "yellow", "info": "blue"}
    t = Table("id", "device", "key", "severity", "state", "count", "last", "acked", "message")
    for a in rows:
        t.add_row(str(a["id"]), a["device_id"], a["key"], f"[{colour.get(a['severity'], 'white')}]{a['severity']}[/]",
                  a["state"], str(a["count"]), _ago(a["last_ts"]), a["acked_by"] or "-", a["message"])
    Console().print(t)


@alarms_app.command("ack")
def alarms_ack(alarm_id: int, namespace: str = Ns, url: Optional[str] = Url, tok: Optional[str] = Tok,
               data_dir: Optional[Path] = DataDir) -> None:
    """Acknowledge an alarm."""
    a = connect(url, tok, data_dir, namespace, "operator").call(
        "POST", f"/api/v1/namespaces/{namespace}/alarms/{alarm_id}/ack")
    typer.echo(f"alarm {a['id']} ({a['device_id']}/{a['key']}) acknowledged by {a['acked_by']}")


def register(app: typer.Typer) -> None:
    app.add_typer(devices_app, name="devices")
    app.add_typer(config_app, name="config")
    app.add_typer(state_app, name="state")
    app.add_typer(alarms_app, name="alarms")
