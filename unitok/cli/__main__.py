"""`python -m unitok.cli ...` runs the `unitok` command."""
import sys

from .app import main

sys.exit(main())
