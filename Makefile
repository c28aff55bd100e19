# selftrain-d2: `make demo` and `make test` set everything up themselves.
VENV ?= .venv
PY := $(VENV)/bin/python
DEMO_CONFIG ?= configs/demo/deeplabv3plus-effnetlite0.yaml
DEMO_OUTPUT ?= output/demo

.PHONY: setup demo test clean-demo-cache

setup:
	@bash tools/setup_env.sh

demo: setup
	$(PY) tools/train_net.py --config-file $(DEMO_CONFIG) OUTPUT_DIR $(DEMO_OUTPUT)
	@$(PY) tools/show_metrics.py $(DEMO_OUTPUT)

test: setup
	$(PY) -m pytest -q tests

clean-demo-cache:
	$(PY) -c "from selftrain_d2.data.demo import demo_root; import shutil; shutil.rmtree(demo_root(), ignore_errors=True)"
