#!/usr/bin/env bash
# Builds ferry's C library and installs it under PREFIX (default /usr/local):
#   lib/libferry.so (soname libferry.so.1), lib/libferry.a, include/ferry.h, lib/pkgconfig/ferry.pc
# FERRY_LIB_DIR=DIR installs libferry_ffi.{so,a} already built in DIR instead of building (the
# tests pass the libraries `cargo test` just built, so nothing is compiled twice).
set -euo pipefail
cd "$(dirname "$0")/.."
prefix=${1:-/usr/local}
if [ -n "${FERRY_LIB_DIR:-}" ]; then
  target=$FERRY_LIB_DIR
  profile="prebuilt"
else
  cargo build --release -q -p ferry-ffi
  target=${CARGO_TARGET_DIR:-target}/release
  profile="release"
fi
version=$(sed -n 's/^version = "\(.*\)"/\1/p' Cargo.toml | head -1)
mkdir -p "$prefix/lib/pkgconfig" "$prefix/include"
install -m 0755 "$target/libferry_ffi.so" "$prefix/lib/libferry.so.1"
ln -sf libferry.so.1 "$prefix/lib/libferry.so"
install -m 0644 "$target/libferry_ffi.a" "$prefix/lib/libferry.a"
install -m 0644 ffi/include/ferry.h "$prefix/include/ferry.h"
# A library built with the rdma transport (feature `rdma`, or unified into a workspace build that
# enables it) needs libibverbs when linked statically.
private="-lpthread -ldl -lm"
undefined=$(nm -u "$target/libferry_ffi.a" 2>/dev/null || true)
if grep -q ' U ibv_' <<<"$undefined"; then
  private="$private -libverbs"
fi
sed -e "s|@PREFIX@|$prefix|" -e "s|@VERSION@|$version|" -e "s|@LIBS_PRIVATE@|$private|" ffi/ferry.pc.in \
  > "$prefix/lib/pkgconfig/ferry.pc"
echo "installed ferry $version ($profile) under $prefix"
