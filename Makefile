# Thin aliases; the logic lives in scripts/setup.sh, cargo and `cargo xtask`.
.PHONY: setup build test demo bench clean

setup:
	./scripts/setup.sh

build: setup
	cargo build --workspace

test: setup
	cargo xtask test

demo: setup
	cargo xtask demo

bench: setup
	cargo xtask bench l4

clean:
	cargo clean
