"""`python -m instantid <command>`: see instantid.commands.cli."""
from .commands.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
