# keel: build, run and test. `make devnet` and `make test` are the whole quick start.

CARGO ?= cargo

.PHONY: all build release devnet test test-prereqs fmt clippy check-prereqs bench clean-devnet

all: build

# The rocksdb crate runs bindgen, which needs libclang. Install it when missing (as root), or
# say exactly what to run.
check-prereqs:
	@if ! ldconfig -p 2>/dev/null | grep -qE 'libclang(-[0-9.]+)?\.so' && ! ls /usr/lib/llvm-*/lib/libclang.so* >/dev/null 2>&1; then \
		if [ "$$(id -u)" = 0 ]; then \
			echo "installing libclang (needed to build RocksDB)"; \
			apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq clang libclang-dev; \
		else \
			echo "libclang is missing (needed to build RocksDB). Run:"; \
			echo "  sudo apt-get install -y clang libclang-dev"; \
			exit 1; \
		fi; \
	fi
	@command -v $(CARGO) >/dev/null || { echo "cargo not found: install Rust from https://rustup.rs"; exit 1; }

build: check-prereqs
	$(CARGO) build --workspace

release: check-prereqs
	$(CARGO) build --release -p keel-cli

# A local network with funded accounts; RPC on 127.0.0.1:26657. Ctrl-C stops it.
# Uses the dev build (dependencies are optimised in it, see Cargo.toml) so it shares the
# build cache with `make test`. DEVNET_ARGS passes flags, e.g. DEVNET_ARGS="--block-time-ms 500".
devnet: build
	./target/debug/keel devnet $(DEVNET_ARGS)

fmt:
	$(CARGO) fmt --all -- --check

clippy: check-prereqs
	$(CARGO) clippy --workspace --all-targets -- -D warnings

# The dashboard test checks the exposition with a real `promtool` (Debian's `prometheus`
# package): installed when missing (as root), otherwise that part of the test is skipped with
# a note.
test-prereqs:
	@if ! command -v promtool >/dev/null; then \
		if [ "$$(id -u)" = 0 ]; then \
			echo "installing promtool (prometheus package) for the metrics exposition test"; \
			(apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus) \
				|| echo "could not install prometheus: the dashboard test skips promtool"; \
		else \
			echo "promtool not found: the dashboard test skips it. To run it: sudo apt-get install -y prometheus"; \
		fi; \
	fi

test: check-prereqs test-prereqs fmt clippy
	$(CARGO) test --workspace

bench: check-prereqs
	$(CARGO) bench --workspace
