"""`python -m fastattn ...` is the `fastattn` command."""
import sys

from .cli import main

sys.exit(main())
