#!/usr/bin/env bash
# Builds ferry's C library and installs it under PREFIX (default /usr/local):
#   lib/libferry.so (soname libferry.so.1), lib/libferry.a, include/ferry.h, lib/pkgconfig/ferry.pc
# PROFILE=debug installs the dev build (what the tests use, to share their build).
set -euo pipefail
cd "$(dirname "$0")/.."
prefix=${1:-/usr/local}
profile=${PROFILE:-release}
if [ "$profile" = release ]; then cargo build --release -q -p ferry-ffi; else cargo build -q -p ferry-ffi; fi
target=${CARGO_TARGET_DIR:-target}/$profile
version=$(sed -n 's/^version = "\(.*\)"/\1/p' Cargo.toml | head -1)
mkdir -p "$prefix/lib/pkgconfig" "$prefix/include"
install -m 0755 "$target/libferry_ffi.so" "$prefix/lib/libferry.so.1"
ln -sf libferry.so.1 "$prefix/lib/libferry.so"
install -m 0644 "$target/libferry_ffi.a" "$prefix/lib/libferry.a"
install -m 0644 ffi/include/ferry.h "$prefix/include/ferry.h"
sed -e "s|@PREFIX@|$prefix|" -e "s|@VERSION@|$version|" ffi/ferry.pc.in > "$prefix/lib/pkgconfig/ferry.pc"
echo "installed ferry $version ($profile) under $prefix"
