#!/usr/bin/env bash
# One command for the VFIO end-to-end run: demo.sh with vfio-test.sh as the guest's /test.sh (build,
# pack, boot under QEMU TCG). Run with --edu 2 for two devices in two containers.
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
TEST="$HERE/vfio-test.sh" exec "$HERE/demo.sh" "$@"
