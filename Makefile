# The two commands a newcomer types: `make demo` and `make test`.
# Both create (or reuse) .venv and install the pinned dependencies from pyproject.toml.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-$(shell cat pyproject.toml | cksum | cut -d' ' -f1)
export OMP_NUM_THREADS ?= 2

.PHONY: venv demo test bench clean

venv: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	# torch first, pinned with its torchvision: the CPU-only torch wheel cannot import timm.
	$(PY) -m pip install --quiet torch==2.14.1 torchvision==0.29.1
	$(PY) -m pip install --quiet -e '.[test]'
	rm -f $(VENV)/.installed-*
	touch $(STAMP)

demo: venv
	$(VENV)/bin/mirl-ds demo

test: venv
	# Best effort: pdsh + sshd for the two-host launch test (tests/ssh_cluster.py); as root with
	# apt-get only. Without them that test skips with the reason; the build never fails here.
	-@if ! command -v pdsh >/dev/null 2>&1 || ! test -x /usr/sbin/sshd; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    export DEBIAN_FRONTEND=noninteractive; \
	    timeout 180 apt-get install -y -qq --no-install-recommends pdsh openssh-server >/dev/null 2>&1 || \
	    { timeout 120 apt-get update -qq >/dev/null 2>&1 && \
	      timeout 180 apt-get install -y -qq --no-install-recommends pdsh openssh-server >/dev/null 2>&1; } || \
	    echo "note: could not install pdsh/openssh-server; the two-host launch test will skip"; \
	  fi; \
	fi
	$(PY) -m pytest -q $(PYTEST_ARGS)

bench: venv
	$(VENV)/bin/mirl-ds bench model --preset vit_b48 --batch 8

clean:
	rm -rf $(VENV) runs/demo
