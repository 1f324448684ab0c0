#!/usr/bin/env bash
# The 50,000-device acceptance on 3 Switches: bench/acceptance.sh with those defaults.
# Usage: bash bench/acceptance_50k.sh [N] [SWITCHES]
exec bash "$(dirname "$0")/acceptance.sh" "${1:-50000}" "${2:-3}"
