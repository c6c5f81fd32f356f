"""`python -m instantid <command>`: see instantid.commands.cli."""
from .commands.bootstrap import launch

if __name__ == "__main__":
    raise SystemExit(launch())
