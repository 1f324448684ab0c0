#!/usr/bin/env bash
# Acceptance at scale: N simulated devices against a local `quanta server`, then `quanta ask` gets a
# final state for every one, checked in the ask's output and by counting the Responses database's rows.
#
#   bash bench/acceptance.sh [N] [SWITCHES]      (default N=100000; SWITCHES: one per 12,500 devices)
#
# Sized for the machine: every Switch stays well under the open-file limit (PER_SWITCH devices
# each), the simulator runs enough processes for the limit and binds worker W to 127.0.0.(2+W), so
# no process, no source address and no (source address, Switch port) pair runs out of descriptors
# or ephemeral ports (`quanta simulate` refuses a plan that would). Connect progress is sampled
# every SAMPLE seconds into $W/connect.tsv and summarised (handshakes per second over time, the
# simulator's handshake window). Environment: PORT_BASE (28000: every listener in PORT_BASE..+999,
# below the ephemeral range), PER_SWITCH (12500), SAMPLE (5), KEEP=1 keeps the work directory.
set -euo pipefail
N=${1:-100000}
PER_SWITCH=${PER_SWITCH:-12500}
S=${2:-$(( (N + PER_SWITCH - 1) / PER_SWITCH ))}
SAMPLE=${SAMPLE:-5}
Q="${QUANTA:-$(dirname "$0")/../.venv/bin/quanta}"
PY="$(dirname "$Q")/python"
[ -x "$PY" ] || PY=python3
NOFILE=$(ulimit -n)
if [ "$S" -lt 1 ] || [ "$S" -gt 64 ]; then echo "error: $S Switches: quanta init --switches takes 1 to 64" >&2; exit 2; fi
if [ $(( (N + S - 1) / S + 1000 )) -gt "$NOFILE" ]; then
  echo "error: $N devices over $S Switches is $(( (N + S - 1) / S )) connections per Switch, too close to the" \
       "open-file limit ($NOFILE); add Switches (second argument) or raise ulimit -n" >&2; exit 2
fi
W=$(mktemp -d /tmp/quanta-accept-XXXX)
SIM= SRV= SAMPLER=
cleanup() {
  for p in $SAMPLER $SIM $SRV; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  if [ "${KEEP:-0}" = 1 ]; then echo "work directory kept: $W"; else rm -rf "$W"; fi
}
trap cleanup EXIT
trap 'exit 143' INT TERM  # so a timeout or Ctrl-C still stops the server and the simulator
P=${PORT_BASE:-28000}  # Switch i listens on P+2i (agents) and P+2i+1 (poke); the rest from P+900
echo "# $(date -u '+%F %T UTC'), $(nproc) cores, open files $NOFILE; load: $(uptime | sed 's/.*load average/load average/')"
echo "# $N devices, $S Switches ($(( (N + S - 1) / S )) each), work directory $W"
$Q init "$W/srv" --https-port $((P+906)) --switch-port $P --port core=$((P+900)) --port http=$((P+905)) \
  --port hub=$((P+901)) --port coordinator=$((P+902)) --port integrate=$((P+903)) --port interaction=$((P+904)) \
  --switches "$S" --server-name localhost > "$W/init.log"
/usr/bin/time -f "enroll-batch: %e s wall, %M KiB max RSS" $Q enroll-batch "$W/srv" --count "$N" --out "$W/fleet" > "$W/enroll.log"
$Q server "$W/srv" > "$W/server.log" 2>&1 & SRV=$!
until [ "$(grep -c 'linked to core' "$W/server.log" 2>/dev/null)" -ge "$S" ]; do
  kill -0 $SRV 2>/dev/null || { echo "error: the server exited:"; tail -20 "$W/server.log"; exit 1; }; sleep 0.5
done
start=$(date +%s.%N)
$Q simulate "$W/fleet" --status-file "$W/status.json" --source-ip 127.0.0.2 --no-progress > "$W/sim.log" 2>&1 & SIM=$!
( printf 't\tconnected\tconnect_failures\twindow\tin_flight\tload1\n' > "$W/connect.tsv"
  while sleep "$SAMPLE"; do
    "$PY" -c "import json,sys,time; d=json.load(open('$W/status.json')); print(f\"{time.time()-$start:.1f}\t{d['connected']}\t{d['connect_failures']}\t{d.get('window','')}\t{d.get('in_flight','')}\t{open('/proc/loadavg').read().split()[0]}\")" \
      >> "$W/connect.tsv" 2>/dev/null || true
  done ) & SAMPLER=$!
until "$PY" -c "import json,sys; d=json.load(open('$W/status.json')); sys.exit(0 if d['connected']>=$N else 1)" 2>/dev/null; do
  kill -0 $SIM 2>/dev/null || { echo "error: the simulator exited:"; tail -5 "$W/sim.log"; exit 1; }; sleep 1
done
echo "connected $N devices in $("$PY" -c "print(round($(date +%s.%N)-$start,1))") s (from the simulator's start): $(cat "$W/status.json")"
kill $SAMPLER 2>/dev/null || true; SAMPLER=
"$PY" - "$W/connect.tsv" <<'PY'
import sys
rows = [line.rstrip("\n").split("\t") for line in open(sys.argv[1])][1:]
rows = [(float(r[0]), int(r[1]), int(r[2]), r[3], r[4], r[5]) for r in rows if len(r) == 6]
print("connect timeline (t s: connected, handshakes/s since the last sample, failed connects, handshake window, in flight, load):")
prev_t, prev_c = 0.0, 0
step = max(1, len(rows) // 12)
for i, (t, c, f, w, fl, ld) in enumerate(rows):
    if i % step == 0 or i == len(rows) - 1:
        print(f"  {t:7.1f}: {c:7d}  {(c - prev_c) / max(1e-9, t - prev_t):6.0f}/s  failed {f:5d}  window {w:>5}  in flight {fl:>5}  load {ld}")
        prev_t, prev_c = t, c
PY
sleep 2
ps -eo rss,args | grep "[q]uanta switch $W/srv" | awk -v n="$N" '{t+=$1; print "switch RSS " $1 " KiB: " $NF} END {printf "switch RSS total %d KiB, %.1f KiB per connection (incl. start-up)\n", t, t/n}'
ps -eo rss,args | grep "[q]uanta core $W/srv" | awk '{print "core RSS " $1 " KiB"}' || true
/usr/bin/time -f "quanta ask: %e s wall, %M KiB max RSS" $Q ask "$W/srv" "@x = Device.GetSummary();" --wait 300 --json > "$W/ask.json"
"$PY" - "$W/ask.json" "$N" "$W/srv/responses.db" <<'PY'
import json, sqlite3, sys
d = json.load(open(sys.argv[1])); n = int(sys.argv[2])
devs = [r["device"] for r in d["responses"]]
iid = d["instruction_id"]
print(f"ask: instruction {iid}, targeted {d['targeted']}, states {d['states']}, finished {d['finished']}, "
      f"{len(devs)} responses, {len(set(devs))} distinct devices")
with sqlite3.connect(f"file:{sys.argv[3]}?mode=ro", uri=True) as db:
    total, distinct = db.execute("SELECT COUNT(*), COUNT(DISTINCT device_id) FROM results WHERE instruction_id = ?",
                                 (iid,)).fetchone()
    states = dict(db.execute("SELECT state, COUNT(*) FROM results WHERE instruction_id = ? GROUP BY state", (iid,)))
print(f"responses database: {total} rows, {distinct} distinct devices, states {states}")
ok = (d["targeted"] == n and d["finished"] and d["states"] == {"success": n} and len(devs) == n
      and len(set(devs)) == n and total == n and distinct == n and states == {"success": n})
if not ok:
    sys.exit(f"NOT ACCEPTED: expected {n} devices, each final (success) and committed once")
print("ACCEPTED: every one of", n, "devices has a final state, committed once")
PY
kill -TERM $SIM; wait $SIM || true; SIM=; tail -1 "$W/sim.log"
