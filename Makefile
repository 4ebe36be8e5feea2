# Two commands set everything up on a fresh machine (Python 3.11, no GPU needed):
#   make demo       the main job on its embedded default
#   make test       ruff, then the fast test tier (everything not marked slow)
#   make test-all   ruff, then every test, the slow ones included (what CI runs)
# Both create or reuse the venv at .venv and install what they need into it.

VENV ?= .venv
PYTHON := $(VENV)/bin/python
PIP := $(PYTHON) -m pip
# torch first, pinned: the CUDA 13 build also compiles the CUDA sources where nvcc exists.
# A machine whose Python already has its torch (a GPU image): TORCH_SPEC= VENV_FLAGS=--system-site-packages
TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1
VENV_FLAGS ?=
INSTALLED := $(VENV)/.mkfast-installed
SOURCES := setup.py pyproject.toml $(wildcard csrc/*.cpp csrc/*.h csrc/cuda/*.cu csrc/cuda/*.cuh)

PYTEST_FLAGS ?= -q

.PHONY: install demo test test-all lint test-browser test-gpu bench env audit clean

$(PYTHON):
	python3 -m venv $(VENV_FLAGS) $(VENV)

$(INSTALLED): $(SOURCES) | $(PYTHON)
	$(if $(strip $(TORCH_SPEC)),$(PIP) install $(TORCH_SPEC))
	MAX_JOBS=$${MAX_JOBS:-2} $(PIP) install --no-build-isolation -e ".[all,dev]"
	touch $(INSTALLED)

install: $(INSTALLED)

demo: $(INSTALLED)
	$(VENV)/bin/mkfast demo

test: $(INSTALLED) lint
	$(PYTHON) -m pytest $(PYTEST_FLAGS) -m "not slow"

test-all: $(INSTALLED) lint
	$(PYTHON) -m pytest $(PYTEST_FLAGS)

lint: $(INSTALLED)
	$(VENV)/bin/ruff check .

# The demo's report page in a real browser: Debian's headless Chromium (installed if missing).
test-browser: $(INSTALLED)
	command -v chromium >/dev/null || (apt-get update -q && apt-get install -y -q chromium)
	$(PYTHON) -m pytest $(PYTEST_FLAGS) tests/test_report.py

# On a GPU machine: the CUDA-marked tests run (they are skipped elsewhere).
test-gpu: $(INSTALLED)
	$(PYTHON) -m pytest -q -m cuda

bench: $(INSTALLED)
	$(VENV)/bin/mkfast bench

env: $(INSTALLED)
	$(VENV)/bin/mkfast env

# Every kernel compiled for sm_90a and read from its machine code (no GPU): the committed table,
# benchmarks/results/sm90_static/triton-<version>/.
audit: $(INSTALLED)
	$(PYTHON) -m mkfast.audit --save

clean:
	rm -rf build *.egg-info mkfast/_C*.so demo_out

# A borrowed GPU machine (Python 3.12, its own torch, no network): README "On a GPU machine".
#   make gpu-wheels                  here, where pip reaches a registry: .whl/ for that machine
#   make gpu-check OUT=dir           there, carrying .whl/ (COMMIT=hash where no .git travels);
#                                    ARGS=--dry-run runs the same steps on a CPU, tiny shapes
GPU_PYTHON ?= python3
OUT ?= gpu_check_out
ARGS ?=
COMMIT ?=
WHEEL_PLATFORMS := manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 \
	manylinux1_x86_64

.PHONY: gpu-wheels gpu-check

gpu-wheels:
	rm -rf .whl && mkdir -p .whl
	$(GPU_PYTHON) -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
		$(addprefix --platform ,$(WHEEL_PLATFORMS)) -d .whl -r benchmarks/gpu_wheels.txt
	$(GPU_PYTHON) benchmarks/gpu_check.py --wheels

gpu-check:
	$(GPU_PYTHON) benchmarks/gpu_check.py --out $(OUT) $(if $(COMMIT),--commit $(COMMIT)) $(ARGS)
