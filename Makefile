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
	python3-venv binutils libcap2-bin nghttp2-server nghttp2-client

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

test: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/pytest $(ARGS)

bench: setup $(BENCH_OBJS)
	$(PY) bench/overhead.py $(ARGS)
	$(PY) bench/l7_syscalls.py
	$(PY) bench/conntrack.py
	$(PY) bench/netns_walks.py
	$(PY) bench/processor.py

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

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
