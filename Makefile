# selftrain-d2: `make demo` and `make test` set everything up themselves.
VENV ?= .venv
PY := $(VENV)/bin/python
DEMO_RECIPE ?= configs/demo/self-training.yaml
DEMO_OUTPUT ?= output/demo/self-training

.PHONY: setup demo test clean-demo-cache

setup:
	@bash tools/setup_env.sh

demo: setup
	$(PY) tools/run_recipe.py --config-file $(DEMO_RECIPE) --output $(DEMO_OUTPUT)

test: setup
	$(PY) -m pytest -q tests

clean-demo-cache:
	$(PY) -c "from selftrain_d2.data.demo import demo_root; import shutil; shutil.rmtree(demo_root(), ignore_errors=True)"
