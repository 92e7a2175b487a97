"""`python -m sworndisk_ublk` is `sworndisk-ublk`."""
from .cli import main

main()
