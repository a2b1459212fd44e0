# The two commands the README promises: `make demo` and `make test`. Both build their own venv.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: venv deps test check lint typecheck unit demo bench clean test-vm

venv: $(STAMP)

$(STAMP): pyproject.toml
	@$(PYTHON) -m venv $(VENV) 2>/dev/null || { echo "python3 -m venv failed: run 'sudo apt-get install python3-venv'"; exit 1; }
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev,controlplane]'
	@# The control plane is a distribution of its own (controlplane-dist/), which hatch cannot install
	@# editable; in this checkout's venv its command runs the checkout's code.
	@printf '#!%s\nfrom controlplane.cli import main\nmain()\n' "$(abspath $(BIN))/python" > $(BIN)/vectorlay-control-plane
	@chmod 755 $(BIN)/vectorlay-control-plane
	@touch $@

lint: venv
	$(BIN)/ruff check bootstrap doctor hostsim controlplane nodeagent tests benchmarks
	$(BIN)/ruff format --check bootstrap doctor hostsim controlplane nodeagent tests benchmarks
	$(BIN)/lint-imports
	$(BIN)/vulture

# tests and benchmarks import through the repository root (tests.install.helpers), hence the explicit
# package bases; tests/vm imports its siblings by bare name (harness, image), so it is checked apart.
typecheck: venv
	$(BIN)/mypy
	$(BIN)/mypy --explicit-package-bases --exclude '^tests/vm/' tests benchmarks
	$(BIN)/mypy tests/vm

unit: venv
	$(BIN)/pytest -q -m "not vm" --kill-points=all

# The loop while working (docs/testing.md): lint, types and the tests not marked slow, the crash
# harness at a fixed sample of its kill points; under two minutes. `make test` runs everything.
check: lint typecheck
	$(BIN)/pytest -q -m "not vm and not slow" --kill-points=sample

# What the tests need from the machine (tests/deps.sh: the apt packages, one line each with why; as
# root it installs them, else it names the command) and the gVisor/dockerd builds cached in ~/.cache.
deps:
	@tests/deps.sh system
	@$(MAKE) --no-print-directory -s venv
	@tests/deps.sh caches $(BIN)/python

# In one sub-make after deps, so that even `make -j` has the machine ready before the first test.
test: deps
	@$(MAKE) --no-print-directory lint typecheck unit

bench: venv
	$(BIN)/pytest -q --benchmark-enable --benchmark-only --benchmark-columns=min,median,mean,max,rounds benchmarks

# Boots QEMU guests (tests/vm, docs/testing.md "VM tests"): installs the host tools it needs when they are missing
# (needs root then, as does the first build of the cached guest image).
VM_TOOLS := qemu-system-x86_64:qemu-system-x86 qemu-img:qemu-utils debootstrap:debootstrap mformat:mtools \
	mke2fs:e2fsprogs debugfs:e2fsprogs
test-vm: venv
	@missing=""; for t in $(VM_TOOLS); do command -v $${t%%:*} >/dev/null || missing="$$missing $${t#*:}"; done; \
	[ -e /usr/share/OVMF/OVMF_CODE_4M.fd ] || [ -e /usr/share/OVMF/OVMF_CODE.fd ] || missing="$$missing ovmf"; \
	if [ -n "$$missing" ]; then \
		echo "installing:$$missing"; \
		DEBIAN_FRONTEND=noninteractive apt-get update -qq && \
		DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing; \
	fi
	@# Two guests at once, one core each: the Debian 13 guest's flow runs beside the rest, in a
	@# directory and log of its own (shown after), so the VM tests take the longer one's time.
	@d13=$$(mktemp -d); \
	$(BIN)/pytest -q -m vm -s --durations=0 -p no:cacheprovider --basetemp=$$d13/tmp \
		tests/vm/test_vm_scenario.py -k debian13 > $$d13/log 2>&1 & bg=$$!; \
	$(BIN)/pytest -q -m vm -s --durations=0 tests/vm -k "not debian13"; fg=$$?; \
	wait $$bg; bgs=$$?; echo "=== the Debian 13 guest (ran beside the above) ==="; cat $$d13/log; \
	rm -rf $$d13; [ $$fg -eq 0 ] && [ $$bgs -eq 0 ]

# GPU_MODE=container: a container-GPU node (GPUs stay on the nvidia driver, shared through runsc).
GPU_MODE ?= passthrough
demo: venv
	$(BIN)/python -m hostsim.demo --gpu-mode $(GPU_MODE)

clean:
	rm -rf $(VENV) build dist .pytest_cache .mypy_cache .ruff_cache
