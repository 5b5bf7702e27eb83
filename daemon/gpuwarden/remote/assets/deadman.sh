#!/bin/sh
# gpuwarden dead-man switch. Runs on the rented instance and ends it when the gpuwarden
# daemon stops probing it (the heartbeat file goes stale) or when the instance outlives
# the hard cap plus a margin. It is the second kill path: the daemon's own guard and
# watchdog are the first, and this one covers a daemon host that died.
#
# POSIX sh only (dash, busybox ash): Ubuntu images run it with /bin/sh. HTTP through curl,
# or python3's urllib where curl is missing (busybox wget cannot DELETE, and would put the
# key on its command line). API keys never appear on a command line.
#
# Parameters come from $DEADMAN_DIR/deadman.env (written by the start-up script):
#   DEADMAN_PROVIDER  vast | lambda
#   DEADMAN_API       API base URL (Vast: https://console.vast.ai, Lambda: .../api/v1)
#   DEADMAN_TIMEOUT   seconds the heartbeat may age before the instance is ended
#   DEADMAN_MAX_AGE   seconds the instance may live at all (hard cap + margin)
#   DEADMAN_CHECK     seconds between checks
#   DEADMAN_LABEL     the instance's gpuwarden label (Lambda: its name, to find its id)
# Vast: CONTAINER_ID and CONTAINER_API_KEY come from the container's environment (the key
# is scoped to this one instance). Lambda: $DEADMAN_DIR/deadman.key exists only if the
# operator opted in (policy.lambda_deadman_api_key).
set -u
DIR=${DEADMAN_DIR:-${HOME:-/root}/.gpuwarden}
LOG="$DIR/deadman.log"
PIDFILE="$DIR/deadman.pid"
HB="$DIR/heartbeat"
STARTED="$DIR/started_at"
RESP="$DIR/deadman.resp"

log() {
    printf '%s deadman: %s\n' "$(date -u +%Y-%m-%dT%H:%M:%SZ)" "$*" >>"$LOG"
}

running() {
    # Is the pid in $PIDFILE a live dead-man switch (not a recycled pid)?
    [ -s "$PIDFILE" ] || return 1
    p=$(cat "$PIDFILE" 2>/dev/null) || return 1
    kill -0 "$p" 2>/dev/null || return 1
    [ -r "/proc/$p/cmdline" ] || return 0
    grep -q deadman "/proc/$p/cmdline" 2>/dev/null
}

if [ "${1:-}" != "--foreground" ]; then
    # Daemonise: leave the start-up hook's session so the hook can return.
    if running; then
        exit 0
    fi
    if command -v setsid >/dev/null 2>&1; then
        setsid sh "$0" --foreground </dev/null >>"$LOG" 2>&1 &
    else
        nohup sh "$0" --foreground </dev/null >>"$LOG" 2>&1 &
    fi
    exit 0
fi

# shellcheck source=/dev/null
. "$DIR/deadman.env" || exit 1
# The probe reads the pid file as the SSH user (Lambda: ubuntu), while the switch may run as
# root under the start-up script's umask 077: the pid is no secret, let everyone read it.
echo $$ >"$PIDFILE" && chmod 644 "$PIDFILE"

# Python 3 where images keep it: SSH and start-up hooks often lack the image's PATH
# (pytorch/pytorch has it in /opt/conda/bin only).
PY=""
for c in python3 /opt/conda/bin/python3; do
    command -v "$c" >/dev/null 2>&1 && PY=$c && break
done

mtime() {
    stat -c %Y "$1" 2>/dev/null ||
        ${PY:-false} -c 'import os,sys; print(int(os.path.getmtime(sys.argv[1])))' "$1" 2>/dev/null
}

# http METHOD URL BODY: the bearer key comes from $AUTH, which is passed on stdin (curl) or
# in the environment (python3), never in argv. Prints the HTTP status (0: no answer); the
# response body goes to $RESP.
http() {
    if [ "${DEADMAN_HTTP:-curl}" = curl ] && command -v curl >/dev/null 2>&1; then
        body=$3
        set -- -X "$1" "$2"
        [ -z "$body" ] || set -- "$@" --data "$body"
        printf 'Authorization: Bearer %s\n' "$AUTH" |
            curl -sS --max-time 30 -H @- -H 'Content-Type: application/json' \
                -o "$RESP" -w '%{http_code}' "$@" 2>>"$LOG" || true
        return 0
    fi
    [ -n "$PY" ] || { echo 0; return 0; }
    AUTH="$AUTH" "$PY" - "$1" "$2" "$3" "$RESP" <<'PY'
import os, sys, urllib.error, urllib.request
method, url, body, out = sys.argv[1:5]
headers = {"Authorization": "Bearer " + os.environ["AUTH"], "Content-Type": "application/json"}
req = urllib.request.Request(url, data=body.encode() or None, method=method, headers=headers)
try:
    with urllib.request.urlopen(req, timeout=30) as r:
        code, data = r.status, r.read()
except urllib.error.HTTPError as e:
    code, data = e.code, e.read()
except Exception as e:  # no answer: report 0 and let the loop retry
    code, data = 0, str(e).encode()
with open(out, "wb") as f:
    f.write(data)
print(code)
PY
}

end_vast() {
    AUTH=${CONTAINER_API_KEY:-}
    id=${CONTAINER_ID:-}
    if [ -z "$AUTH" ] || [ -z "$id" ]; then
        log "cannot end instance: no CONTAINER_ID or CONTAINER_API_KEY"
        return 1
    fi
    code=$(http DELETE "$DEADMAN_API/api/v0/instances/$id/" '{}')
    log "DELETE instance $id: HTTP $code"
    case $code in 2??|404) return 0 ;; esac
    return 1
}

lambda_id() {
    # Lambda gives an instance no metadata service: find our id by our name (the label).
    code=$(http GET "$DEADMAN_API/instances" '')
    case $code in 2??) ;; *) log "GET instances: HTTP $code"; return 1 ;; esac
    [ -n "$PY" ] || return 1
    "$PY" - "$RESP" "$DEADMAN_LABEL" <<'PY' 2>>"$LOG"
import json, sys
data = json.load(open(sys.argv[1])).get("data") or []
ids = [i["id"] for i in data if i.get("name") == sys.argv[2]]
if ids:
    print(ids[0])
PY
}

end_lambda() {
    if [ ! -r "$DIR/deadman.key" ]; then
        # Without the operator's opt-in there is no key here. Powering off would not stop
        # Lambda's billing, so we only warn; the daemon-side path must end this instance.
        if [ -z "${warned:-}" ]; then
            log "cannot end instance: no API key (policy.lambda_deadman_api_key is off); it bills until terminated"
            command -v wall >/dev/null 2>&1 &&
                echo "gpuwarden: unwatched and still billing; terminate it in the Lambda dashboard when done." | wall 2>/dev/null
            warned=1
        fi
        return 1
    fi
    AUTH=$(cat "$DIR/deadman.key")
    id=$(lambda_id) || id=""
    [ -n "$id" ] || id=${GPUWARDEN_SIM_INSTANCE:-}
    case $id in
        "" | *[!0-9A-Za-z_-]*) log "cannot end instance: own id not found"; return 1 ;;
    esac
    code=$(http POST "$DEADMAN_API/instance-operations/terminate" "{\"instance_ids\": [\"$id\"]}")
    log "terminate instance $id: HTTP $code"
    case $code in 2??|404) return 0 ;; esac
    return 1
}

# Whether this switch can end the instance at all, said once in its log and in deadman.state
# ("armed", or "unable: why"), which the probe reports to the daemon: a switch that cannot
# act must not look like protection.
u=""
command -v curl >/dev/null 2>&1 || [ -n "$PY" ] || u="no curl or python3"
case $DEADMAN_PROVIDER in
vast) [ -n "${CONTAINER_ID:-}" ] && [ -n "${CONTAINER_API_KEY:-}" ] || u="no CONTAINER_API_KEY" ;;
lambda) [ -n "$PY" ] || u="no python3"; [ -r "$DIR/deadman.key" ] || u="no API key" ;;
esac
st=armed
if [ -n "$u" ]; then
    log "cannot end this instance: $u"
    st="unable: $u"
fi
(umask 022; echo "$st" >"$DIR/deadman.state")

[ -f "$HB" ] || touch "$HB"
[ -s "$STARTED" ] || date +%s >"$STARTED"
start=$(cat "$STARTED")
log "watching: provider=$DEADMAN_PROVIDER timeout=${DEADMAN_TIMEOUT}s max_age=${DEADMAN_MAX_AGE}s"
pause=$DEADMAN_CHECK
while :; do
    now=$(date +%s)
    if ! hb=$(mtime "$HB"); then
        # Deleted by hand: start over. Bounded: one more timeout, and the age cap still holds.
        log "heartbeat file missing; recreated"
        touch "$HB"
        hb=$now
    fi
    why=""
    if [ $((now - hb)) -gt "$DEADMAN_TIMEOUT" ]; then
        why="no heartbeat for $((now - hb))s"
    elif [ $((now - start)) -gt "$DEADMAN_MAX_AGE" ]; then
        why="instance is $((now - start))s old"
    fi
    pause=$DEADMAN_CHECK
    if [ -n "$why" ]; then
        log "ending instance: $why"
        if "end_$DEADMAN_PROVIDER"; then
            # Asked. Ask again now and then until the provider stops this machine.
            pause=$((DEADMAN_CHECK * 4))
        fi
    else
        warned=""
    fi
    sleep "$pause"
done
