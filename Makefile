# kscope — `make run` starts kscope on this host, `make test` runs the whole suite.
# Both install what they need first (Debian packages, a virtualenv, BPF objects,
# protobuf code) and a second run re-installs nothing (stamps under .make/).
SHELL := /bin/bash
.DEFAULT_GOAL := run

VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := .make
BUILD  := build
CLANG  ?= clang-19
BPFTOOL ?= bpftool
PYTHON ?= python3

# Debian packages: toolchain for the probes, and the real peers the tests drive.
APT_PACKAGES := clang-19 llvm-19 libbpf-dev libbpf1 bpftool make iproute2 iptables conntrack \
	nginx-light wrk hey curl netcat-openbsd openssl dnsmasq-base dnsutils libnetfilter-queue-dev util-linux procps \
	python3-venv binutils libcap2-bin prometheus tmux nghttp2-server nghttp2-client
APT_PACKAGES += redis-server redis-tools memcached libmemcached-tools  # Redis/Memcached peers of the L7 tests
APT_PACKAGES += postgresql postgresql-client mariadb-server mariadb-client  # PostgreSQL/MariaDB peers of the L7 tests

BPF_CFLAGS := -target bpf -g -O2 -mcpu=v3 -D__TARGET_ARCH_x86 -Wall -Werror -Wno-unused-function \
	-I$(BUILD) -Ibpf_src
BPF_HDRS := $(wildcard bpf_src/*.h bpf_src/abi/*.h)
BPF_OBJS := $(patsubst bpf_src/%.bpf.c,$(BUILD)/bpf/%.bpf.o,$(wildcard bpf_src/*.bpf.c))
FIXTURE_OBJS := $(patsubst tests/bpf_fixtures/%.bpf.c,$(BUILD)/bpf/fixtures/%.bpf.o,$(wildcard tests/bpf_fixtures/*.bpf.c))
BENCH_OBJS := $(patsubst bench/%.bpf.c,$(BUILD)/bpf/bench/%.bpf.o,$(wildcard bench/*.bpf.c))
PROTOS := $(wildcard proto/kscope/v1/*.proto)
PROTO_PY := $(PROTOS:.proto=_pb2.py)

ARGS ?=

.PHONY: setup run test lint bench clean
setup: $(STAMP)/apt $(STAMP)/venv $(BPF_OBJS) $(FIXTURE_OBJS) $(PROTO_PY)

run: setup
	$(VENV)/bin/kscope run $(ARGS)

# The checks the project claims (ruff, formatting, mypy --strict as configured in pyproject.toml), then the suite.
test: setup lint
	$(VENV)/bin/pytest $(ARGS)

bench: setup $(BENCH_OBJS)
	$(PY) bench/overhead.py $(ARGS)
	$(PY) bench/l7_syscalls.py
	$(PY) bench/conntrack.py
	$(PY) bench/netns_walks.py
	$(PY) bench/processor.py
	$(PY) bench/h2.py

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy .

# --- The container image (deploy/Dockerfile), built and run by `make test` (tests/deploy/) ----------
# No registry is reachable: the base is a Debian root filesystem made by debootstrap and imported into
# podman's store, and deploy/Dockerfile builds on it. Both are cached in that store under tags that
# name what went in: the base by Debian release, the app image by a hash of every file the build
# reads, so a second run builds nothing (a check of `podman image exists` each).
IMAGE_APT_PACKAGES := podman runc debootstrap
APT_PACKAGES += $(IMAGE_APT_PACKAGES)
IMAGE_RELEASE := bookworm
IMAGE_MIRROR ?= http://deb.debian.org/debian
IMAGE_BASE := localhost/kscope-base:$(IMAGE_RELEASE)
IMAGE_REPO := localhost/kscope
# The CA bundle pip trusts on this host (a TLS-intercepting proxy may sit between us and PyPI).
IMAGE_PIP_CA ?= /etc/ssl/certs/ca-certificates.crt
# What the Dockerfile copies (keep in step with deploy/Dockerfile.dockerignore).
IMAGE_CONTEXT := Makefile pyproject.toml README.md bpf_src proto node_exporter cluster_processor kscope_common
IMAGE_HASH = $(shell { cat deploy/Dockerfile deploy/Dockerfile.dockerignore; \
	find $(IMAGE_CONTEXT) -type f ! -path '*/__pycache__/*' ! -name '*_pb2*' -print0 | sort -z | xargs -0 sha256sum; \
	} | sha256sum | cut -c1-16)
# Our podman settings (runc; no raised rlimits: see deploy/README.md) come from a file of our own,
# so a user's /etc/containers/containers.conf is neither needed nor changed.
export CONTAINERS_CONF := $(CURDIR)/deploy/podman/containers.conf
# App images kept (newest first; each source change makes one), and as many of the build stage,
# tagged $(IMAGE_REPO)-build so that it stays podman's layer cache (its apt layer is the slow part)
# while older ones and the layers only they used are removed after a build.
IMAGE_KEEP := 3
# The tag the tests run (tests/deploy/ read it from here).
IMAGE_REF := $(BUILD)/image.ref

.PHONY: image image-base image-tag
test: image

# The tag the current sources build (tests/deploy/ compare it with $(IMAGE_REF): a stale image fails).
image-tag:
	@echo $(IMAGE_REPO):$(IMAGE_HASH)

image-base: $(STAMP)/apt
	@if ! podman image exists $(IMAGE_BASE); then \
		echo "building $(IMAGE_BASE) with debootstrap (first run only: a few minutes)"; \
		root=$$(mktemp -d /var/tmp/kscope-base.XXXXXX) && trap 'rm -rf "$$root"' EXIT && \
		debootstrap --variant=minbase $(IMAGE_RELEASE) "$$root" $(IMAGE_MIRROR) && \
		printf 'deb %s %s main\ndeb %s %s-updates main\ndeb http://deb.debian.org/debian-security %s-security main\n' \
			$(IMAGE_MIRROR) $(IMAGE_RELEASE) $(IMAGE_MIRROR) $(IMAGE_RELEASE) $(IMAGE_RELEASE) \
			> "$$root/etc/apt/sources.list" && \
		rm -rf "$$root"/var/cache/apt/archives/*.deb "$$root"/var/lib/apt/lists/* && \
		tar -C "$$root" -c . | podman import -q - $(IMAGE_BASE) >/dev/null; \
	fi

image: image-base
	@mkdir -p $(BUILD)
	@hash=$(IMAGE_HASH); tag=$(IMAGE_REPO):$$hash; \
	if ! podman image exists $$tag; then \
		echo "building $$tag from deploy/Dockerfile"; \
		for target in build final; do \
			podman build --network=host --layers --ignorefile deploy/Dockerfile.dockerignore \
				--secret id=pip_ca,src=$(IMAGE_PIP_CA) --build-arg BASE=$(IMAGE_BASE) -f deploy/Dockerfile \
				$$( [ $$target = build ] && echo "--target build -t $(IMAGE_REPO)-build:$$hash" || echo "-t $$tag" ) \
				. || exit 1; \
		done; \
		for repo in $(IMAGE_REPO) $(IMAGE_REPO)-build; do \
			podman images --filter reference=$$repo --sort created --format '{{.Repository}}:{{.Tag}}' \
				| tail -n +$$(($(IMAGE_KEEP) + 1)) | xargs -r podman rmi >/dev/null; \
		done; \
	fi; \
	echo $$tag > $(IMAGE_REF)

$(STAMP)/apt: Makefile
	@mkdir -p $(STAMP)
	@missing=""; for p in $(APT_PACKAGES); do \
		dpkg-query -W -f='$${Status}' $$p 2>/dev/null | grep -q 'install ok installed' || missing="$$missing $$p"; \
	done; \
	if [ -n "$$missing" ]; then \
		echo "installing Debian packages:$$missing"; \
		if [ "$$(id -u)" != 0 ]; then echo "need root to install:$$missing" >&2; exit 1; fi; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing; \
	fi
	@touch $@

$(STAMP)/venv: pyproject.toml $(STAMP)/apt
	@mkdir -p $(STAMP)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	@touch $@

$(BUILD)/vmlinux.h: $(STAMP)/apt
	@mkdir -p $(BUILD)
	$(BPFTOOL) btf dump file /sys/kernel/btf/vmlinux format c > $@.tmp && mv $@.tmp $@

$(BUILD)/bpf/%.bpf.o: bpf_src/%.bpf.c $(BPF_HDRS) $(BUILD)/vmlinux.h
	@mkdir -p $(@D)
	$(CLANG) $(BPF_CFLAGS) -c $< -o $@

$(BUILD)/bpf/fixtures/%.bpf.o: tests/bpf_fixtures/%.bpf.c $(BPF_HDRS) $(BUILD)/vmlinux.h
	@mkdir -p $(@D)
	$(CLANG) $(BPF_CFLAGS) -c $< -o $@

$(BUILD)/bpf/bench/%.bpf.o: bench/%.bpf.c $(BPF_HDRS) $(BUILD)/vmlinux.h
	@mkdir -p $(@D)
	$(CLANG) $(BPF_CFLAGS) -c $< -o $@

proto/kscope/v1/%_pb2.py: proto/kscope/v1/%.proto $(STAMP)/venv
	$(PY) -m grpc_tools.protoc -Iproto --python_out=proto --pyi_out=proto --grpc_python_out=proto $<

clean:
	rm -rf $(BUILD) $(STAMP) proto/kscope/v1/*_pb2*.py proto/kscope/v1/*_pb2*.pyi
