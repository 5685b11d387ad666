# Two commands from a fresh clone: `make serve` and `make test`.
# On a machine whose python3 already has torch (a GPU box), the venv sees the system site-packages so that
# torch is kept; otherwise the CPU torch wheel is installed first so pip never pulls a multi-GB CUDA build.
PY ?= python3
VENV := .venv
VPY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install serve test test-fast bench clean

$(STAMP): pyproject.toml
	@if [ ! -x $(VPY) ]; then \
	  if $(PY) -c "import torch" 2>/dev/null; then \
	    echo "system torch found: keeping it"; $(PY) -m venv --system-site-packages $(VENV); \
	  else \
	    $(PY) -m venv $(VENV); \
	  fi; \
	fi
	@$(VPY) -c "import torch" 2>/dev/null || $(VPY) -m pip install -q "torch==2.13.0"
	$(VPY) -m pip install -q -e ".[dev]"
	@touch $(STAMP)

install: $(STAMP)

serve: $(STAMP)
	$(VPY) -m server serve --model $${MULTIPLEX_MODEL:-tiny} --host $${MULTIPLEX_HOST:-127.0.0.1} --port $${MULTIPLEX_PORT:-8000}

test: $(STAMP)
	$(VPY) -m pytest -q -x --timeout=900

test-fast: $(STAMP)
	$(VPY) -m pytest -q -m "not slow"

bench: $(STAMP)
	$(VPY) -m server.bench

clean:
	rm -rf $(VENV) .multiplex .pytest_cache
