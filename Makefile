# selftrain-d2: `make demo` and `make test` set everything up themselves.
VENV ?= .venv
PY := $(VENV)/bin/python
DEMO_RECIPE ?= configs/demo/self-training.yaml
DEMO_OUTPUT ?= output/demo/self-training
# The demo configs say MODEL.DEVICE cpu; empty: cuda where torch sees a GPU, else the configs' cpu.
DEMO_DEVICE ?=

.PHONY: setup demo test clean-demo-cache

setup:
	@bash tools/setup_env.sh

demo: setup
	@dev="$(DEMO_DEVICE)"; \
	if [ -z "$$dev" ]; then \
	  if $(PY) -c 'import sys, torch; sys.exit(not torch.cuda.is_available())'; then dev=cuda; \
	  else echo "demo: no CUDA GPU found, running on the CPU"; fi; \
	fi; \
	set -x; $(PY) tools/run_recipe.py --config-file $(DEMO_RECIPE) --output $(DEMO_OUTPUT) $${dev:+MODEL.DEVICE $$dev}

test: setup
	$(PY) -m pytest -q tests

clean-demo-cache:
	$(PY) -c "from selftrain_d2.data.demo import demo_root; import shutil; shutil.rmtree(demo_root(), ignore_errors=True)"
