"""The `ipvsproxy` command: a thin click layer over the agent and dataplanes.

Errors reach the user as one line on stderr naming what to fix (exit 1), usage
errors exit 2, and no traceback is ever shown (unless --debug).
"""

from __future__ import annotations

import logging
import sys
from typing import Any

import click

from ..dataplane.base import DataplaneError, InterfaceRefused
from ..logfmt import EscapingFormatter, escape


class Group(click.Group):
    """Turns expected failures into one-line errors with the right exit code."""

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
    """Attach the subcommands (kept out of import time so `cli` stays light)."""
    from .bench import bench
    from .cleanup import cleanup
    from .inspect import diff, list_cmd, schedulers
    from .kubeproxy import cleanup_kube_proxy
    from .run import run

    for command in (run, list_cmd, diff, schedulers, cleanup, cleanup_kube_proxy, bench):
        cli.add_command(command)


def main() -> None:
    register()
    cli(prog_name="ipvsproxy")
