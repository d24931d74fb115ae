#!/usr/bin/env bash
# Another wharf build (WHARF_BASE_BIN), to put two builds side by side in one run:
#   WHARF_BASE_BIN=/path/to/old/wharf benches/scenarios.sh wharf wharf-base
set -euo pipefail
WHARF_BIN=${WHARF_BASE_BIN:?set WHARF_BASE_BIN to the wharf binary to compare} exec "$(dirname "${BASH_SOURCE[0]}")/wharf.sh" "$@"
