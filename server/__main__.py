"""`python -m server ...` is the `multiplex` command."""
import sys

from server.cli import main

sys.exit(main())
