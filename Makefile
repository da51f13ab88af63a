# kpr: the README's two commands are `make demo` and `make test`; both run `setup`
# first and are safe to run twice.
SHELL := /bin/bash
VENV := .venv
PY := $(VENV)/bin/python
APT_PACKAGES := python3-bpfcc linux-headers-amd64 iproute2 nftables iptables ethtool \
	python3-venv python3-yaml python3-seccomp conntrack \
	nginx-light python3-rich python3-matplotlib gcc libc6-dev
# nginx-light: the benchmark's backends (kpr bench starts its own in pod namespaces;
# policy-rc.d keeps the package from starting one on the host while it installs).
# The IPVS tests boot Debian's kernel (which has IPVS; this machine's has not) in qemu
# (tests/vm/qemu.py); ipvsadm is only for the tests' eyes.
APT_VM_PACKAGES := linux-image-amd64 qemu-system-x86 busybox-static ipvsadm
STAMP := $(VENV)/.installed

.PHONY: setup demo test bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml Makefile controller/bench/connlat.c
	@missing=""; for p in $(APT_PACKAGES); do \
		dpkg-query -W -f='$${Status}' $$p 2>/dev/null | grep -q "ok installed" || missing="$$missing $$p"; \
	done; \
	if [ -n "$$missing" ]; then \
		echo "installing Debian packages:$$missing"; \
		policy=""; if [ ! -e /usr/sbin/policy-rc.d ]; then \
			printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d; \
			chmod 755 /usr/sbin/policy-rc.d; policy=1; fi; \
		apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q $$missing; \
		rc=$$?; if [ -n "$$policy" ]; then rm -f /usr/sbin/policy-rc.d; fi; \
		[ $$rc -eq 0 ] || exit $$rc; \
	fi; \
	missing=""; for p in $(APT_VM_PACKAGES); do \
		dpkg-query -W -f='$${Status}' $$p 2>/dev/null | grep -q "ok installed" || missing="$$missing $$p"; \
	done; \
	if [ -n "$$missing" ]; then \
		echo "installing Debian packages for the IPVS VM:$$missing"; \
		apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q \
			--no-install-recommends $$missing; \
	fi
	test -x $(PY) || /usr/bin/python3 -m venv --system-site-packages $(VENV)
	$(PY) -m pip install -q -e '.[test]'
	gcc -O2 -Wall -Wextra -o $(VENV)/bin/kpr-connlat controller/bench/connlat.c
	touch $(STAMP)

demo: setup
	$(VENV)/bin/kpr demo

test: setup
	$(PY) -m pytest -q

bench: setup
	$(VENV)/bin/kpr bench

clean:
	-$(VENV)/bin/kpr cleanup
	rm -rf $(VENV) *.egg-info
