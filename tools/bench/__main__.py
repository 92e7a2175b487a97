"""`python -m tools.bench`: see cli.py and README.md."""
import sys

from .cli import main

if __name__ == "__main__":   # guard: spawned workers re-import this module as __mp_main__
    sys.exit(main())
