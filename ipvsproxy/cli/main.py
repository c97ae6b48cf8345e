"""The `ipvsproxy` command: a thin click layer over the agent and dataplanes.

Errors reach the user as one line on stderr naming what to fix (exit 1), usage
errors exit 2, and no traceback is ever shown (unless --debug).
"""

from __future__ import annotations

import importlib
import logging
import sys
from typing import Any

import click

from ..dataplane.base import DataplaneError, InterfaceRefused
from ..logfmt import EscapingFormatter, escape

# Each subcommand's module, imported when the command is looked up: `ipvsproxy run` does not
# import what `bench`, `list` or `cleanup-kube-proxy` need (~1 s of a start in the emulated test VM).
LAZY: dict[str, tuple[str, str]] = {
    "run": ("run", "run"), "list": ("inspect", "list_cmd"), "diff": ("inspect", "diff"),
    "schedulers": ("inspect", "schedulers"), "cleanup": ("cleanup", "cleanup"),
    "cleanup-kube-proxy": ("kubeproxy", "cleanup_kube_proxy"), "bench": ("bench", "bench"),
}


class Group(click.Group):
    """Turns expected failures into one-line errors with the right exit code; loads each
    subcommand's module when it is asked for (LAZY)."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(set(self.commands) | set(LAZY))

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        if cmd_name not in self.commands and cmd_name in LAZY:
            module, attr = LAZY[cmd_name]
            self.add_command(getattr(importlib.import_module(f"{__package__}.{module}"), attr))
        return self.commands.get(cmd_name)

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except (click.exceptions.Exit, click.exceptions.Abort, click.ClickException):
            raise
        except InterfaceRefused as exc:  # --interface names something not ours: a usage error
            if ctx.obj and ctx.obj.get("debug"):
                raise
            click.echo(f"ipvsproxy: error: {escape(str(exc))}", err=True)
            ctx.exit(2)
        except (DataplaneError, OSError, ValueError, RuntimeError) as exc:
            if ctx.obj and ctx.obj.get("debug"):
                raise
            click.echo(f"ipvsproxy: error: {escape(str(exc))}", err=True)
            ctx.exit(1)
        except KeyboardInterrupt:
            ctx.exit(130)


@click.group(cls=Group, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.option("--log-level", envvar="IPVSPROXY_LOG_LEVEL", default="info", show_default=True,
              type=click.Choice(["debug", "info", "warning", "error"]), help="Log verbosity.")
@click.option("--debug", is_flag=True, hidden=True, help="Show tracebacks.")
@click.version_option(package_name="ipvsproxy")
@click.pass_context
def cli(ctx: click.Context, log_level: str, debug: bool) -> None:
    """ipvsproxy: a Kubernetes service proxy that programs Linux IPVS."""
    ctx.obj = {"debug": debug}
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(EscapingFormatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.basicConfig(level=getattr(logging, log_level.upper()), handlers=[handler])


def register() -> None:
    """Attach every subcommand now (the reference generator and tests walk `cli.commands`);
    `main` leaves them to be loaded one by one as they are named."""
    ctx = click.Context(cli)
    for name in LAZY:
        cli.get_command(ctx, name)


def main() -> None:
    cli(prog_name="ipvsproxy")
