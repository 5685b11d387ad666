"""`python -m benchmarks.soak`: see benchmarks/soak/__init__.py."""
import sys

from benchmarks.soak import main

sys.exit(main())
