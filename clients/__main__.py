"""`python -m clients ...`: the client subcommands without the server's console script."""
import sys

from clients.cli import main

sys.exit(main())
