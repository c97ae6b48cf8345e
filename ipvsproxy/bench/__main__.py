"""`python -m ipvsproxy.bench ARGS` = `ipvsproxy bench ARGS` (used by scripts/bench-vm.sh).

Goes through the `ipvsproxy` command group, so errors get the same one-line
form and exit codes as every other command.
"""

from __future__ import annotations

import sys

from ..cli.bench import bench
from ..cli.main import cli


def main() -> None:
    cli.add_command(bench)
    cli(["bench", *sys.argv[1:]], prog_name="ipvsproxy")


if __name__ == "__main__":
    main()
