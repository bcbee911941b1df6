"""The `picoiot` command: the root that every command module registers itself on.

| module | commands |
|---|---|
| `server_cli` | `server` (serving) |
| `admin_cli` | `provision`, `token`, `ui-link` (the secrets, on the data directory) |
| `remote_cli`, `ota_cli` | `devices`, `config`, `state`, `alarms`; `ota` (over HTTP through `remote`) |
| `device_cli`, `demo`, `deploy`, this module | `sim`; `demo`; `deploy`; `firmware` |

`cliopts` holds the options they share and the one-line failure.
"""
from __future__ import annotations

import typer
from typer.core import TyperGroup

from .cliopts import CliError, fail


class _Root(TyperGroup):
    """Every command's CliError (a server's refusal, an unreachable server, a file that cannot be used) becomes the
    same one line and exit status 2, at this one boundary."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except CliError as e:
            fail(str(e))


app = typer.Typer(cls=_Root, help="picoiot: Pico W IoT platform — control plane, simulation and device tooling.",
                  no_args_is_help=True)
firmware_app = typer.Typer(help="Build and test the MicroPython firmware.", no_args_is_help=True)
app.add_typer(firmware_app, name="firmware")


@firmware_app.command("test")
def firmware_test(heap: str = typer.Option("192K", help="MicroPython heap size (-X heapsize)"),
                  pattern: str = typer.Option("test_", help="only test modules whose name starts with this"),
                  verbose: bool = typer.Option(False, "-v", "--verbose"),
                  micropython: str = typer.Option(None, "--micropython", metavar="PATH",
                                                  help="the unix micropython to run (default: $PICOIOT_MICROPYTHON, "
                                                       "else the pinned one)")) -> None:
    """Run tests/firmware under the unix micropython, firmware compiled to .mpy, with a Pico-sized heap."""
    from .fwtest import run_suite
    passed, failed = run_suite(heap=heap, pattern=pattern, verbose=verbose, echo=typer.echo, micropython=micropython)
    typer.echo(f"{passed} passed, {failed} failed")
    if failed or not passed:
        raise typer.Exit(1)


@firmware_app.command("build")
def firmware_build(out: str = typer.Option("build/firmware", help="output directory"),
                   romfs: bool = typer.Option(False, "--romfs", help="also build OUT/romfs.img (mpremote romfs build)"
                                              " for `mpremote romfs deploy` or the simulated boot_romfs")) -> None:
    """Compile iotlib and the controllers to .mpy (the bundle that goes onto a board; the simulated board
    and its launchers are test equipment and stay out)."""
    from pathlib import Path

    from .build import BuildError, build_firmware, build_romfs
    from .bundles import ManifestError
    try:
        files = build_firmware(Path(out), simulator=False)
        typer.echo(f"{len(files)} files in {out}")
        if romfs:
            img = build_romfs(Path(out), simulator=False)
            typer.echo(f"ROMFS image {img} ({img.stat().st_size} bytes)")
    except (BuildError, ManifestError, FileNotFoundError, ModuleNotFoundError) as e:  # a plain install: no tools
        raise CliError(f"{e} — the firmware is built from the repository's checkout with its firmware tools "
                       "(./dev setup)") from None


def _register_optional() -> None:
    # Commands living in their own modules register themselves here; a missing module must not break the CLI.
    import importlib
    for name in ("server_cli", "admin_cli", "remote_cli", "device_cli", "demo", "ota_cli", "deploy"):
        try:
            mod = importlib.import_module(f"picoiot.{name}")
        except ModuleNotFoundError as e:
            if e.name != f"picoiot.{name}":
                raise
            continue
        mod.register(app)


_register_optional()

if __name__ == "__main__":  # pragma: no cover
    app()
