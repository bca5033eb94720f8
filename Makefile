# make demo: set up .venv and run the one-token Aligner demo on the embedded default model.
# make test: set up .venv and run the test suite (what CI runs), then its numeric tests again under
# the other CPU kernels this machine can run and one thread (tests/other_kernels.py).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: demo test clean

demo: $(VENV)/.installed
	$(PY) demo.py

test: $(VENV)/.installed
	$(PY) -m pytest -q tests
	$(PY) tests/other_kernels.py

# torch first: a machine with an NVIDIA driver gets PyPI's default CUDA build; a CPU-only machine
# gets the CPU build (about 200 MB instead of several GB) from PyTorch's CPU index when it is
# reachable, else torch==2.13.0 as the local package index serves it.
$(VENV)/.installed: requirements.txt requirements-dev.txt
	$(PYTHON) -m venv $(VENV)
	@if $(PY) -c "import torch" 2>/dev/null; then echo "torch already installed"; \
	elif command -v nvidia-smi >/dev/null 2>&1; then $(PY) -m pip install "torch>=2.4"; \
	elif $(PY) -c "import socket; socket.gethostbyname('download.pytorch.org')" 2>/dev/null; then \
		$(PY) -m pip install torch==2.13.0 --extra-index-url https://download.pytorch.org/whl/cpu; \
	else $(PY) -m pip install torch==2.13.0; fi
	$(PY) -m pip install -r requirements-dev.txt
	touch $@

clean:
	rm -rf $(VENV) .pytest_cache
