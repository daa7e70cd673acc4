# Two entry points on a fresh Debian machine: `make demo` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
PY      = $(VENV)/bin/python
APT_PKGS = qemu-utils qemu-system-x86 qemu-block-extra libnbd-bin nbdkit nginx-light openssl time valgrind ceph-mon ceph-osd ceph-common

.PHONY: demo test deps system-deps lint bench clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip

deps: $(PY)
	$(PY) -m pip install -q -e '.[test]'

# The oracle: the real QEMU 7.2 tools and the servers the tests start.  Installed when any package is
# missing (dpkg -s fails for a package that is not installed).
system-deps:
	@if ! dpkg -s $(APT_PKGS) >/dev/null 2>&1; then \
		SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
		$$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq $(APT_PKGS) >/dev/null; \
	fi

# The demo runs vdkit as a user installs it: `pip install .` into its own virtualenv (not editable: the
# editable finder alone adds about 20 ms to every vdkit-img start, and the first impression should be the
# real one).  Rebuilt from the checkout at every run.
DEMO_VENV ?= build/demo-venv
DEMO_IMG   = $(DEMO_VENV)/bin/vdkit-img
demo: system-deps
	@test -x $(DEMO_VENV)/bin/python || $(PYTHON) -m venv $(DEMO_VENV)
	@$(DEMO_VENV)/bin/python -m pip install -q .
	@rm -rf demo && mkdir demo
	@qemu-img create -q -f raw demo/base.raw 16M
	@qemu-io -f raw -c 'write -P 0xaa 0 1M' demo/base.raw >/dev/null
	@$(DEMO_IMG) create -q -f qcow2 -b base.raw -F raw demo/top.qcow2
	@qemu-io -c 'write -P 0x55 1M 64k' demo/top.qcow2 >/dev/null
	@$(DEMO_IMG) snapshot -c before-upgrade demo/top.qcow2
	@echo '$$ vdkit-img info --backing-chain demo/top.qcow2'
	@$(DEMO_IMG) info --backing-chain demo/top.qcow2
	@echo '$$ vdkit-img snapshot -l --output=json demo/top.qcow2'
	@$(DEMO_IMG) snapshot -l --output=json demo/top.qcow2
	@echo '$$ vdkit-img check demo/top.qcow2'
	@$(DEMO_IMG) check demo/top.qcow2
	@qemu-img create -q -f qcow2 -o compression_type=zstd demo/zstd.qcow2 16M
	@qemu-io -c 'write -c -P 0x5a 0 1M' demo/zstd.qcow2 >/dev/null
	@echo '$$ vdkit-img info demo/zstd.qcow2    # written compressed with zstd by qemu-io'
	@$(DEMO_IMG) info demo/zstd.qcow2
	@echo '$$ vdkit-img convert -O raw demo/zstd.qcow2 demo/zstd.raw && vdkit-img compare demo/zstd.qcow2 demo/zstd.raw'
	@$(DEMO_IMG) convert -O raw demo/zstd.qcow2 demo/zstd.raw
	@$(DEMO_IMG) compare demo/zstd.qcow2 demo/zstd.raw

lint: deps
	$(VENV)/bin/ruff check vdkit tests bench
	$(VENV)/bin/mypy

test: deps system-deps
	$(VENV)/bin/ruff check vdkit tests bench
	$(VENV)/bin/mypy
	$(PY) -m pytest -q -n 2 --dist loadfile tests

# Benchmarks run as a user meets vdkit: a fresh, non-editable virtualenv (pip install .) whose
# interpreter runs every script and whose console scripts are timed (bench/harness.py).
BENCH_VENV ?= build/bench-venv
BENCH_PY    = $(BENCH_VENV)/bin/python
bench: system-deps
	rm -rf $(BENCH_VENV)
	$(PYTHON) -m venv $(BENCH_VENV)
	$(BENCH_PY) -m pip install -q .
	$(BENCH_PY) bench/info.py
	$(BENCH_PY) bench/snapshot.py
	$(BENCH_PY) bench/check.py
	$(BENCH_PY) bench/io.py
	$(BENCH_PY) bench/nbd.py
	$(BENCH_PY) bench/remote.py
	$(BENCH_PY) bench/monitor.py
	$(BENCH_PY) bench/formats.py
	$(BENCH_PY) bench/jobs.py

clean:
	rm -rf $(VENV) demo build *.egg-info
