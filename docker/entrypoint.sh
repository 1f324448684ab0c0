#!/usr/bin/env bash
# Entrypoint of the Quanta container image (Dockerfile). See docs/operations.md, "Container".
#
#   (no argument) or "server"  initialise the data directory if it is not yet, then run 'quanta server'
#   "prepare"                  initialise the data directory if it is not yet, then exit
#   anything else              run 'quanta ARGS...' (e.g. 'status /var/lib/quanta')
#
# Initialising is 'quanta init DATA --database-url $QUANTA_DATABASE_URL ...' and happens once: a
# successful init leaves DATA/.container-initialised, and every later start skips it. An init that
# was interrupted (quanta.toml written, the marker not) is run again with --force, which starts the
# directory over (a PostgreSQL database already migrated is kept; its administrator gets a new password).
#
# Environment:
#   QUANTA_DATA           the data directory (default /var/lib/quanta, the image's volume)
#   QUANTA_DATABASE_URL   postgresql://USER:PASSWORD@HOST:5432/DB (first start only; required then)
#   QUANTA_SERVER_NAME    the name agents and browsers use (first start only; default: this host's name)
#   QUANTA_INIT_ARGS      more 'quanta init' options, split on spaces (e.g. "--switches 2 --port http=8080")
set -euo pipefail

DATA="${QUANTA_DATA:-/var/lib/quanta}"
MARKER="$DATA/.container-initialised"

prepare() {
    if [[ -f "$MARKER" ]]; then
        echo "quanta-entrypoint: $DATA is initialised; not initialising again" >&2
        return 0
    fi
    if [[ -z "${QUANTA_DATABASE_URL:-}" ]]; then
        echo "quanta-entrypoint: error: $DATA is not initialised and QUANTA_DATABASE_URL is not set (postgresql://USER:PASSWORD@HOST:5432/DB)" >&2
        exit 2
    fi
    local args=(init "$DATA" --database-url "$QUANTA_DATABASE_URL" --server-name "${QUANTA_SERVER_NAME:-$(hostname)}")
    if [[ -f "$DATA/quanta.toml" ]]; then
        echo "quanta-entrypoint: an earlier initialisation of $DATA did not finish; starting it over" >&2
        args+=(--force)
    fi
    local extra=()
    read -r -a extra <<< "${QUANTA_INIT_ARGS:-}"
    quanta "${args[@]}" ${extra[@]+"${extra[@]}"}
    (umask 077 && : > "$MARKER")
}

case "${1:-server}" in
    server)
        prepare
        exec quanta server "$DATA"
        ;;
    prepare)
        prepare
        ;;
    *)
        exec quanta "$@"
        ;;
esac
