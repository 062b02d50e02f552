"""`python -m zoo ...` is the `zoo` command (torchrun launches it this way too)."""
import sys

from zoo.cli import main

sys.exit(main())
