#!/usr/bin/env bash
# Everything CI checks: set-up, formatting, lints, then the whole test suite
# (unit tests, the guest agent against Unix sockets, tiny-guest KVM tests,
# and real boots of the guest kernel, with and without containers).
set -euo pipefail
repo_root=$(cd "$(dirname "$(readlink -f "${BASH_SOURCE[0]}")")/.." && pwd)
cd "$repo_root"
# Two steps: `eval "$(…)"` would hide a failed set-up from `set -e`.
exports=$(scripts/setup.sh)
eval "$exports"
cargo fmt --all -- --check
cargo clippy --locked --workspace --all-targets -- -D warnings
cargo test --locked --workspace
