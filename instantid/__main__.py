"""`python -m instantid <command>`: see instantid.cli."""
from .cli import main

if __name__ == "__main__":
    raise SystemExit(main())
