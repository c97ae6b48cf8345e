"""`python -m ipvsproxy ARGS` = the `ipvsproxy` command (for environments without the console script,
and for scripts that must run the project's own interpreter, e.g. scripts/bench-vm.sh)."""

from .cli.main import main

if __name__ == "__main__":
    main()
