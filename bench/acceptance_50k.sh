#!/usr/bin/env bash
# Acceptance: 50,000 simulated devices against a local `quanta server` with 3 Switches, then
# `quanta ask` gets a final state for every one. Usage: bash bench/acceptance_50k.sh [N] [SWITCHES]
set -euo pipefail
N=${1:-50000}
S=${2:-3}
Q="${QUANTA:-$(dirname "$0")/../.venv/bin/quanta}"
W=$(mktemp -d /tmp/quanta-50k-XXXX)
SIM= SRV=
trap 'kill $SIM $SRV 2>/dev/null; wait 2>/dev/null; rm -rf "$W"' EXIT
trap 'exit 143' INT TERM  # so a timeout or Ctrl-C still stops the server and the simulator
P=${PORT_BASE:-28000}  # every listener in P..P+999: Switches P, P+1 (poke), P+2, ...
$Q init "$W/srv" --https-port $((P+443)) --switch-port $P --port core=$((P+900)) --port http=$((P+80)) \
  --port hub=$((P+901)) --port coordinator=$((P+902)) --port integrate=$((P+903)) --port interaction=$((P+904)) \
  --switches "$S" --server-name localhost
/usr/bin/time -f "enroll-batch: %e s wall, %M KiB max RSS" $Q enroll-batch "$W/srv" --count "$N" --out "$W/fleet"
$Q server "$W/srv" > "$W/server.log" 2>&1 & SRV=$!
until [ "$(cat "$W/server.log" 2>/dev/null | grep -c 'linked to core')" -ge "$S" ]; do sleep 0.5; done
# Worker W binds its connections to 127.0.0.(2+W), so 127.0.0.1's ports stay free for everyone else.
$Q simulate "$W/fleet" --status-file "$W/status.json" --source-ip 127.0.0.2 --no-progress > "$W/sim.log" 2>&1 & SIM=$!
start=$(date +%s.%N)
until python3 -c "import json,sys; d=json.load(open('$W/status.json')); sys.exit(0 if d['connected']>=$N else 1)" 2>/dev/null; do sleep 1; done
echo "connected $N devices in $(python3 -c "print(round($(date +%s.%N)-$start,1))") s: $(cat "$W/status.json")"
sleep 2
ps -eo rss,args | grep "[q]uanta switch $W/srv" | awk -v n="$N" -v s="$S" '{t+=$1; print "switch RSS " $1 " KiB: " $NF} END {printf "switch RSS total %d KiB, %.1f KiB per connection (incl. start-up)\n", t, t/n}'
/usr/bin/time -f "quanta ask: %e s wall" $Q ask "$W/srv" "@x = Device.GetSummary();" --wait 120 --json > "$W/ask.json"
python3 - "$W/ask.json" "$N" <<'PY'
import json, sys
d = json.load(open(sys.argv[1])); n = int(sys.argv[2])
devs = [r["device"] for r in d["responses"]]
print(f"ask: instruction {d['instruction_id']}, targeted {d['targeted']}, states {d['states']}, finished {d['finished']}, "
      f"{len(devs)} responses, {len(set(devs))} distinct devices")
assert d["targeted"] == n and d["finished"] and sum(d["states"].values()) == n and len(set(devs)) == n
print("ACCEPTED: every one of", n, "devices has a final state")
PY
kill -TERM $SIM; wait $SIM || true; tail -1 "$W/sim.log"
