# vsnap — see README.md.
CARGO ?= cargo

.PHONY: all build deps test unit lint fmt bench clean

all: build

build:
	$(CARGO) build --release --workspace

# System packages the tests need (QEMU, qemu-img, guest tools); root on Debian 12.
deps:
	tests/guest/deps.sh

# Everything CI runs: formatting, lints, unit/integration tests.
test: deps lint unit

unit:
	$(CARGO) test --workspace --all-targets

lint:
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --workspace --all-targets -- -D warnings

fmt:
	$(CARGO) fmt --all

bench:
	$(CARGO) bench -p vsnap-block --bench block

clean:
	$(CARGO) clean
