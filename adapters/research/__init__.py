"""Research scripts over the trainer (`python -m adapters.research.compare`, `python -m adapters.research.claims`):
method comparisons and checks of the papers' claims. Apart from the library: nothing in `adapters/` outside this
folder imports it (tests/test_layering.py)."""
