#!/bin/sh
# gpuwarden health and activity probe. The daemon's watchdog runs this fixed script over SSH
# (`sh -c <this file>`, no arguments, never user text) from the login home. It refreshes the
# dead-man switch's heartbeat and prints one JSON line:
#   {"heartbeat": bool, "sessions": int, "gpu_util": float|null, "runners": int, "deadman": bool,
#    "deadman_state": "armed"|"unable"|null}
# POSIX sh only.
cd || exit 1
heartbeat=false
mkdir -p .gpuwarden && touch .gpuwarden/heartbeat && heartbeat=true

# Interactive sessions other than ours. Our exec channel has no terminal, so it is never
# counted. Logins are read from utmp (`who`) where the host keeps it. Containers often do not,
# and there a terminal counts only if an SSH login holds it: sshd titles each session process
# "sshd: USER@pts/N" ("sshd-session: ..." since OpenSSH 9.8; "pts/0,pts/1" when one
# connection holds several). Not every /dev/pts entry: a container's own tty, a notebook's
# terminal or a leftover multiplexer would count as activity for ever and idle would never
# fire. On the sim cloud `who` is its shim, which lists the interactive sessions its SSH
# server holds open. GPUWARDEN_PROBE_ROOT (tests only) moves the files read here.
root=${GPUWARDEN_PROBE_ROOT:-}
sessions=0
if [ -n "${GPUWARDEN_SIM_INSTANCE:-}" ] || [ -s "$root/var/run/utmp" ] || [ -s "$root/run/utmp" ]; then
    sessions=$(who 2>/dev/null | wc -l)
else
    sessions=$(cat "$root"/proc/[0-9]*/cmdline 2>/dev/null | tr '\000' '\n' |
        sed -n 's/^sshd[-a-z]*: [^ @]*@//p' | tr ',' '\n' | grep '^pts/[0-9][0-9]*$' |
        sort -u | wc -l)
fi
if tty -s 2>/dev/null; then
    sessions=$((sessions - 1))
fi
case $sessions in "" | *[!0-9]*) sessions=0 ;; esac

# GPU utilisation: the busiest GPU, in percent; null where there is no nvidia-smi.
gpu_util=null
if command -v nvidia-smi >/dev/null 2>&1; then
    g=$(nvidia-smi --query-gpu=utilization.gpu --format=csv,noheader,nounits 2>/dev/null |
        awk 'BEGIN { m = -1 } /^[ 0-9.]+$/ { v = $1 + 0; if (v > m) m = v } END { if (m >= 0) print m }')
    [ -n "$g" ] && gpu_util=$g
fi

# Alive: present in /proc and not a zombie. /proc, not kill -0: on Lambda the switch runs as
# root and the probe as ubuntu. Not a zombie: in a container whose PID 1 does not reap
# orphans, a finished runner may linger as one for ever, and would count as activity.
alive() {
    s=$(cut -d' ' -f3 "/proc/$1/stat" 2>/dev/null) && [ -n "$s" ] && [ "$s" != Z ]
}

# Our job runners: one pid file per job, alive while its process lives.
runners=0
for f in .gpuwarden/jobs/*/pid; do
    [ -f "$f" ] && alive "$(cat "$f")" && runners=$((runners + 1))
done

deadman=false
p=$(cat .gpuwarden/deadman.pid 2>/dev/null) && [ -n "$p" ] && alive "$p" && deadman=true
# Whether the switch can end this instance, as it found at its start (deadman.sh).
deadman_state=null
case $(cat .gpuwarden/deadman.state 2>/dev/null) in
    armed) deadman_state='"armed"' ;;
    unable*) deadman_state='"unable"' ;;
esac

printf '{"heartbeat": %s, "sessions": %s, "gpu_util": %s, "runners": %s, "deadman": %s, "deadman_state": %s}\n' \
    "$heartbeat" "$sessions" "$gpu_util" "$runners" "$deadman" "$deadman_state"
