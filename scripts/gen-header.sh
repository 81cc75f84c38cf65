#!/usr/bin/env bash
# Regenerates ffi/include/ferry.h from ffi/src/lib.rs with cbindgen.
set -euo pipefail
cd "$(dirname "$0")/.."
FERRY_BLESS=1 cargo test -q -p ferry-ffi --test header
echo "wrote ffi/include/ferry.h"
