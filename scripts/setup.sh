#!/usr/bin/env bash
# One-time, idempotent machine set-up for building and testing weft.
# A second run only checks and takes seconds.
set -euo pipefail

need_root() {
  if [ "$(id -u)" -ne 0 ]; then
    echo "setup: must run as root (apt-get, bpffs mount); re-run with sudo" >&2
    exit 1
  fi
}

APT_PACKAGES=(llvm-22-dev libpolly-22-dev libzstd-dev zlib1g-dev bpftool iproute2 procps)
BPF_LINKER_VERSION=0.13.0

missing=()
for p in "${APT_PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  need_root
  echo "setup: installing ${missing[*]}"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi

if ! rustup toolchain list | grep -q '^nightly'; then
  rustup toolchain install nightly --profile minimal
fi
if ! rustup component list --toolchain nightly --installed | grep -q '^rust-src'; then
  rustup component add rust-src --toolchain nightly
fi

if ! bpf-linker --version 2>/dev/null | grep -q "$BPF_LINKER_VERSION"; then
  echo "setup: building bpf-linker $BPF_LINKER_VERSION against LLVM 22 (about 2 minutes)"
  LLVM_PREFIX=/usr/lib/llvm-22 cargo install bpf-linker --version "$BPF_LINKER_VERSION" \
    --locked --no-default-features --features llvm-22
fi

if ! mount | grep -q ' /sys/fs/bpf type bpf'; then
  need_root
  mkdir -p /sys/fs/bpf
  mount -t bpf bpffs /sys/fs/bpf
fi

echo "setup: ok (llvm-22, bpftool, nightly rust-src, bpf-linker $BPF_LINKER_VERSION, bpffs)"
