"""`python -m minillm ...` runs the `minillm` command (minillm.cli), for a venv whose bin/ is not on PATH."""
import sys

from minillm.cli import main

sys.exit(main())
