# The README's two commands: `make demo` (the main job end to end) and `make test` (the whole suite).
# Each creates .venv in the repository root when missing and installs the project with pinned versions.

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
EXTRAS ?= dali,deepspeed,tensorboard,wandb,robustness,dev
# The CUDA 12 path (README, "Install"): CONSTRAINTS=constraints-cu12.txt with EXTRAS naming dali-cuda120, not dali.
CONSTRAINTS ?= constraints.txt

.PHONY: demo demo-continual test test-slow test-mutation lint ops bench-gpu gpu-check venv clean check-constraints

$(STAMP): setup.py constraints.txt $(CONSTRAINTS)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c $(CONSTRAINTS) -e '.[$(EXTRAS)]'
	touch $(STAMP)

venv: $(STAMP)

# `make demo GENSCL=1` adds a GenSCL run with the cross-entropy model as its teacher.
demo: $(STAMP)
	$(PY) -m supcon_scale.demo $(if $(GENSCL),--genscl) $(DEMO_ARGS)

# Continual learning on the digits: SCR against ER (5 tasks of 2 classes, memory 200, 3 seeds) on two torchrun
# ranks; summary.json and the PNGs go to runs/continual/digits (trained afresh each time).
demo-continual: $(STAMP)
	test -d runs/continual/data/val || $(PY) -m supcon_scale.cli make-demo-data runs/continual/data
	rm -rf runs/continual/digits
	OMP_NUM_THREADS=1 $(PY) -m torch.distributed.run --standalone --nproc_per_node 2 -m supcon_scale.cli \
		continual --config continual/digits $(DEMO_ARGS)

# Lint and format checks first (seconds), DeepSpeed's CPU op compiled if it is not (once: minutes on 2 cores, which
# would otherwise fall inside the first DeepSpeed test's timeout), then the suite; the 20 slowest tests at the end.
test: lint ops
	$(PY) -m pytest -q -m "not slow" --durations=20 $(PYTEST_ARGS)

# DeepSpeed's CPU communication op (deepspeed_shm_comm), compiled where torch's JIT loader keeps it; a no-op when
# built (`supcon-scale doctor` says whether it is).
ops: $(STAMP)
	DS_ACCELERATOR=cpu $(PY) -m supcon_scale.cli doctor --build-ops

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/shellcheck --shell=bash launch/*.sh launch/*.sbatch tools/*.sh

# Plant each mutation of tools/mutation.py in a temporary copy and run the tests meant to catch it (not part of make
# test; see the README for its time and result). JSON in runs/mutation.json.
test-mutation: $(STAMP) ops
	$(PY) tools/mutation.py --json runs/mutation.json

# Longer checks (full-size benchmarks smoke, long multi-node runs); not part of `make test`.
test-slow: $(STAMP) ops
	$(PY) -m pytest -q -m slow --durations=10 $(PYTEST_ARGS)

# The GPU benchmarks of docs/BENCHMARKS.md in one run (needs a CUDA GPU; about 10 minutes); JSON in runs/bench_gpu.
bench-gpu: $(STAMP)
	PYTHON=$(PY) tools/bench_gpu.sh

# The first run on a GPU node (one GPU, at most 10 minutes): CUDA, the DALI GPU loader, every engine end to end with
# a resume, the CUDA-only kernels, host syncs per step, the headline benchmarks; JSON after each part in
# runs/gpu_check. `make gpu-check SMOKE=1` runs it tiny on the CPU (the tests do).
gpu-check: $(STAMP)
	$(PY) -m supcon_scale.bench.gpu_check --out runs/gpu_check $(if $(SMOKE),--smoke)

# Every pin of constraints.txt and constraints-cu12.txt has a release for setup.py's Python floor (asks the package
# registry: needs the network, about 2 minutes; not part of make test, whose tests/test_install.py checks offline that
# the floor written in the constraints files is setup.py's).
check-constraints: $(STAMP)
	$(PY) tools/check_constraints.py

clean:
	rm -rf runs .pytest_cache build *.egg-info
