"""Generates docs/configuration.md from the click declarations.

The flags are declared once (cli/options.py, cli/*.py); this renders them, so
the reference can never drift from the code. A unit test fails when the
committed file differs from what this produces: run
`python -m ipvsproxy.cli.reference > docs/configuration.md` after changing a flag.
"""

from __future__ import annotations

import click

HEADER = """# Configuration reference

Generated from the command definitions by `python -m ipvsproxy.cli.reference`;
do not edit by hand. Every flag can also be set through the environment
variable shown (the Helm chart's `config:` block maps onto these).
Durations take `500ms`, `30s`, `5m`, `1h` (or plain seconds); CIDR lists are
comma-separated.
"""


def _default(p: click.Option) -> str:
    if p.is_flag and not p.secondary_opts:
        return "off"
    d = p.default
    if isinstance(d, bool):
        return "on" if d else "off"
    if d in (None, "", ()) or "UNSET" in repr(d):
        return "—"
    return f"`{d}`"


def render() -> str:
    from .main import cli, register

    register()
    out = [HEADER]
    ctx = click.Context(cli, info_name="ipvsproxy")
    for name in sorted(cli.commands):
        cmd = cli.commands[name]
        if cmd.hidden:
            continue
        out.append(f"\n## `ipvsproxy {name}`\n\n{(cmd.help or '').strip()}\n")
        rows = []
        for p in cmd.get_params(ctx):
            if not isinstance(p, click.Option) or p.hidden or p.name == "help" or "--help" in p.opts:
                continue
            flags = ", ".join(f"`{o}`" for o in p.opts + p.secondary_opts)
            env = f"`{p.envvar}`" if isinstance(p.envvar, str) else "—"
            text = (p.help or "").replace("|", "\\|").replace("\n", " ")
            rows.append(f"| {flags} | {env} | {_default(p)} | {text} |")
        if rows:
            out.append("| flag | environment | default | meaning |\n| --- | --- | --- | --- |")
            out.extend(rows)
        args = [p.human_readable_name for p in cmd.get_params(ctx) if isinstance(p, click.Argument)]
        if args:
            out.append(f"\nArguments: {', '.join(args)}.")
    return "\n".join(out) + "\n"


if __name__ == "__main__":
    print(render(), end="")
