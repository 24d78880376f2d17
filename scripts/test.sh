#!/usr/bin/env bash
# Everything CI checks: set-up, formatting, lints, then the whole test suite
# (unit tests, tiny-guest KVM tests, and real boots of the guest kernel).
set -euo pipefail
repo_root=$(cd "$(dirname "$(readlink -f "${BASH_SOURCE[0]}")")/.." && pwd)
cd "$repo_root"
eval "$(scripts/setup.sh)"
cargo fmt --all -- --check
cargo clippy --locked --all-targets -- -D warnings
cargo test --locked
