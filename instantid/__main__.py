"""`python -m instantid <command>`: see instantid.commands.cli."""
import sys

try:
    from .commands.cli import main
except ModuleNotFoundError as missing:  # a fresh clone: the pack's packages are not installed yet
    if (missing.name or "instantid").startswith("instantid"):
        raise
    from .commands.bootstrap import install_command_packages
    raise SystemExit(install_command_packages(missing, sys.argv[1:])) from None

if __name__ == "__main__":
    raise SystemExit(main())
