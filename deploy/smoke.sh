#!/usr/bin/env bash
# The installed package's smoke test, as a user would meet it: build a wheel from this source
# tree, install it (not editable) into a fresh venv, then with that install's own `gpuwarden`:
# check the example config, start the daemon on it (the simulated cloud only: nothing is
# rented), run one job to an image, stop the daemon with SIGTERM and expect exit 0.
# CI runs it (.ci/run); run it by hand the same way. Under a minute with a warm pip cache.
set -euo pipefail

PROG=$(basename "$0")
SRC=$(cd "$(dirname "$0")/.." && pwd)
PYTHON=python3
GW=""
WHEEL=""
KEEP=0
READY_TIMEOUT=60 # seconds for the daemon to answer on its socket
JOB_TIMEOUT=60   # seconds for the job to reach its image

usage() {
    cat <<EOF
Usage: $PROG [--python PY] [--wheel PATH] [--gpuwarden PATH] [--keep]

  --python PY       interpreter for the fresh venv (default: python3; needs 3.11+)
  --wheel PATH      install this wheel instead of building one from $SRC
  --gpuwarden PATH  skip building and installing: smoke-test this gpuwarden command
  --keep            keep the temporary directory (venv, state, logs) and print its path
EOF
}

die() {
    echo "$PROG: FAILED: $*" >&2
    exit 1
}
say() { echo "$PROG: $*"; }
need_arg() { [[ $# -ge 2 && -n $2 ]] || die "$1 needs a value (see --help)"; }

while [[ $# -gt 0 ]]; do
    case $1 in
    --python) need_arg "$@"; PYTHON=$2; shift 2 ;;
    --wheel) need_arg "$@"; WHEEL=$2; shift 2 ;;
    --gpuwarden) need_arg "$@"; GW=$2; shift 2 ;;
    --keep) KEEP=1; shift ;;
    -h | --help) usage; exit 0 ;;
    *) die "unknown option '$1' (see --help)" ;;
    esac
done

# A short path: the control socket's path must fit in sun_path (108 bytes).
WORK=$(mktemp -d "${TMPDIR:-/tmp}/gw-smoke.XXXXXX")
DAEMON_PID=""
cleanup() {
    if [[ -n $DAEMON_PID ]] && kill -0 "$DAEMON_PID" 2>/dev/null; then
        kill -KILL "$DAEMON_PID" 2>/dev/null || true
    fi
    if [[ $KEEP -eq 1 ]]; then
        say "kept $WORK"
    else
        rm -rf "$WORK"
    fi
}
trap cleanup EXIT

if [[ -z $GW ]]; then
    if [[ -z $WHEEL ]]; then
        # Built from a copy: an in-tree build would leave build/ and *.egg-info in the checkout.
        mkdir "$WORK/src"
        cp "$SRC/pyproject.toml" "$SRC/README.md" "$WORK/src/"
        cp -r "$SRC/daemon" "$WORK/src/daemon"
        find "$WORK/src/daemon" \( -name '*.egg-info' -o -name __pycache__ \) -prune \
            -exec rm -rf {} +
        "$PYTHON" -m pip wheel --no-deps --quiet -w "$WORK/dist" "$WORK/src"
        WHEEL=$(echo "$WORK"/dist/gpuwarden-*.whl)
        say "built $(basename "$WHEEL")"
    fi
    "$PYTHON" -m venv "$WORK/venv"
    "$WORK/venv/bin/python" -m pip install --quiet "$WHEEL"
    GW=$WORK/venv/bin/gpuwarden
    say "installed into a fresh venv: $GW"
fi

CONFIG=$SRC/config.example.toml
# The daemon and the commands get only these GPUWARDEN_ settings, none from the caller's shell.
for name in $(env | sed -n 's/^\(GPUWARDEN_[A-Z0-9_]*\)=.*/\1/p'); do unset "$name"; done
unset CREDENTIALS_DIRECTORY NOTIFY_SOCKET WATCHDOG_USEC WATCHDOG_PID
export GPUWARDEN_DAEMON__STATE_DIR=$WORK/state
export GPUWARDEN_DAEMON__SOCKET=$WORK/control.sock
export GPUWARDEN_SOCKET=$WORK/control.sock
export GPUWARDEN_DAEMON__SHUTDOWN_TIMEOUT=5s
export GPUWARDEN_PROVIDERS__SIM__BOOT_DELAY=0.2s
export GPUWARDEN_JOBS__PREVIEW_STEP_DELAY=10ms
export GPUWARDEN_JOBS__PROGRESS_INTERVAL=0.2s
cd "$WORK" # nothing may be found in the checkout

"$GW" check-config "$CONFIG" >"$WORK/check-config.out" \
    || die "check-config on $CONFIG exited $?: $(cat "$WORK/check-config.out")"
say "check-config: the example config is valid"

"$GW" run --config "$CONFIG" >"$WORK/daemon.log" 2>&1 &
DAEMON_PID=$!
deadline=$((SECONDS + READY_TIMEOUT))
until "$GW" info --json >/dev/null 2>&1; do
    kill -0 "$DAEMON_PID" 2>/dev/null || die "the daemon died at start-up: $(tail -n 20 "$WORK/daemon.log")"
    ((SECONDS < deadline)) || die "the daemon did not answer within ${READY_TIMEOUT}s"
    sleep 0.2
done
say "gpuwarden run: the daemon answers on its socket (pid $DAEMON_PID)"

timeout "$JOB_TIMEOUT" "$GW" submit --prompt "a lighthouse at dusk" --steps 2 --seed 7 --wait \
    >"$WORK/submit.out" 2>"$WORK/submit.err" \
    || die "the job did not succeed: $(cat "$WORK/submit.out" "$WORK/submit.err")"
image=$(tail -n 1 "$WORK/submit.out")
[[ -f $image ]] || die "the job printed '$image', which is not a file"
[[ $(head -c 8 "$image" | od -An -tx1 | tr -d ' \n') == 89504e470d0a1a0a ]] \
    || die "$image is not a PNG"
say "one job on the sim: $image ($(wc -c <"$image") bytes, PNG)"

kill -TERM "$DAEMON_PID"
code=0
wait "$DAEMON_PID" || code=$?
DAEMON_PID=""
[[ $code -eq 0 ]] || die "the daemon exited $code on SIGTERM: $(tail -n 20 "$WORK/daemon.log")"
say "SIGTERM: the daemon stopped, exit 0"
say "ok"
