#!/usr/bin/env bash
# Builds the Debian package: the release binary, then the man page and the
# shell completions generated from it (they are assets of the package), then
# `cargo deb` without building again. Needs cargo-deb
# (`cargo install cargo-deb --locked`).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
target="${CARGO_TARGET_DIR:-target}"
cargo build --release --locked
bin="$target/release/auto-consul"
out="$target/release/generated"
mkdir -p "$out"
"$bin" man >"$out/auto-consul.1"
"$bin" completions bash >"$out/auto-consul.bash"
"$bin" completions zsh >"$out/_auto-consul"
"$bin" completions fish >"$out/auto-consul.fish"
cargo deb --no-build "$@"
