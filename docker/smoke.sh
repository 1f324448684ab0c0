#!/usr/bin/env bash
# Build the server image and prove it works end to end, on a machine that runs a container engine:
# build, first start on PostgreSQL (the entrypoint initialises the volume), HEALTHCHECK healthy, an
# agent on this machine enrolled by the container and answering a question asked through the published
# HTTPS port with `quanta login` / `quanta ask --profile`, a clean `docker stop`, a second start that does
# not initialise again and answers again. It keeps the image it built (QUANTA_SMOKE_IMAGE) and removes
# everything else it creates (container, volume, agent, profile) at the end, whatever happens.
#
#   QUANTA_SMOKE_DATABASE_URL=postgresql://USER@HOST:5432/EMPTYDB docker/smoke.sh
#
# Environment:
#   QUANTA_SMOKE_DATABASE_URL  an empty PostgreSQL database the container can reach (required)
#   BASE_IMAGE                 the Dockerfile's base (default python:3.11-slim; pass a local image
#                              where Docker Hub is out of reach: docs/operations.md, "Container")
#   QUANTA_SMOKE_PORTS         "HTTPS HTTP SWITCH" host ports, published as the same ports inside
#                              (default "18443 18080 14000", so that nothing on 443/80/4000 is touched)
#   QUANTA_SMOKE_IMAGE         the tag of the image it builds (default quanta:latest, compose.yaml's)
#   QUANTA                     the quanta command for the agent and the CLI on this machine (default: quanta)
set -euo pipefail

: "${QUANTA_SMOKE_DATABASE_URL:?set QUANTA_SMOKE_DATABASE_URL to an empty PostgreSQL database the container can reach}"
BASE_IMAGE="${BASE_IMAGE:-python:3.11-slim}"
read -r HTTPS HTTP SWITCH EXTRA <<< "${QUANTA_SMOKE_PORTS:-18443 18080 14000}"
for port in "$HTTPS" "$HTTP" "$SWITCH"; do
    [[ "$port" =~ ^[1-9][0-9]{0,4}$ && "$port" -le 65535 && -z "${EXTRA:-}" ]] \
        || { echo "smoke: QUANTA_SMOKE_PORTS must be three port numbers (1-65535): HTTPS HTTP SWITCH" >&2; exit 2; }
done
QUANTA="${QUANTA:-quanta}"
IMAGE="${QUANTA_SMOKE_IMAGE:-quanta:latest}"
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
NAME="quanta-smoke-$$"
WORK="$(mktemp -d)"
AGENT_PID=""

cleanup() {
    [[ -n "$AGENT_PID" ]] && kill "$AGENT_PID" 2>/dev/null && wait "$AGENT_PID" 2>/dev/null
    docker rm -f "$NAME" >/dev/null 2>&1 || true
    docker volume rm -f "$NAME" >/dev/null 2>&1 || true
    rm -rf "$WORK"
}
trap cleanup EXIT

step() { printf 'smoke: %s\n' "$*" >&2; }
fail() { printf 'smoke: FAILED: %s\n' "$*" >&2; docker logs --tail 40 "$NAME" >&2 2>/dev/null || true; exit 1; }

wait_healthy() {
    local status=""
    for _ in $(seq 1 90); do
        status="$(docker inspect -f '{{.State.Health.Status}}' "$NAME" 2>/dev/null || echo gone)"
        [[ "$status" == healthy ]] && return 0
        [[ "$status" == gone || "$(docker inspect -f '{{.State.Running}}' "$NAME")" != true ]] && fail "the container stopped"
        sleep 2
    done
    fail "not healthy after 180 s (last: $status)"
}

ask() {  # the one device answers, through the published HTTPS port and a login profile
    local out
    out="$(HOME="$WORK/home" "$QUANTA" ask --profile smoke '@s = Device.GetSummary(); SELECT DeviceName FROM @s;' --format csv)" \
        || fail "quanta ask exited $?"
    grep -q '^smoke-agent,success,' <<< "$out" || fail "unexpected answer: $out"
}

step "building the image on $BASE_IMAGE"
docker build -q --build-arg BASE_IMAGE="$BASE_IMAGE" -t "$IMAGE" "$HERE" >/dev/null

step "first start (initialises the volume on the database of QUANTA_SMOKE_DATABASE_URL)"  # not printed: it may hold a password
docker run -d --name "$NAME" -v "$NAME:/var/lib/quanta" \
    -e QUANTA_DATABASE_URL="$QUANTA_SMOKE_DATABASE_URL" -e QUANTA_SERVER_NAME=localhost \
    -e QUANTA_INIT_ARGS="--port https=$HTTPS --port http=$HTTP --port switch=$SWITCH" \
    -p "$HTTPS:$HTTPS" -p "$HTTP:$HTTP" -p "$SWITCH:$SWITCH" "$IMAGE" >/dev/null
wait_healthy

step "enrolling an agent in the container, running it here"
docker exec "$NAME" quanta enroll /var/lib/quanta --device smoke-agent --out /tmp/smoke-agent >/dev/null
docker cp "$NAME:/tmp/smoke-agent" "$WORK/agent"
docker cp "$NAME:/var/lib/quanta/pki/ca.crt" "$WORK/ca.crt"
"$QUANTA" agent "$WORK/agent" > "$WORK/agent.log" 2>&1 &
AGENT_PID=$!

step "logging in through https://localhost:$HTTPS and asking"
(umask 077 && docker exec "$NAME" sed -n 's/^password=//p' /var/lib/quanta/admin.credentials > "$WORK/password")
HOME="$WORK/home" "$QUANTA" login "https://localhost:$HTTPS" --user admin --password-file "$WORK/password" \
    --ca "$WORK/ca.crt" --profile smoke >/dev/null
for _ in $(seq 1 30); do grep -q "connected to switch" "$WORK/agent.log" && break; sleep 1; done
ask

step "docker stop (SIGTERM), then a second start"
docker stop -t 60 "$NAME" >/dev/null
[[ "$(docker inspect -f '{{.State.ExitCode}}' "$NAME")" == 0 ]] || fail "exit code $(docker inspect -f '{{.State.ExitCode}}' "$NAME") on docker stop"
docker start "$NAME" >/dev/null
wait_healthy
docker logs "$NAME" 2>&1 | grep -q "is initialised; not initialising again" || fail "the second start initialised again"
for _ in $(seq 1 60); do [[ "$(grep -c "connected to switch" "$WORK/agent.log")" -ge 2 ]] && break; sleep 1; done
ask

step "passed"
