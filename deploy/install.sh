#!/usr/bin/env bash
# Install (or upgrade, or remove) gpuwarden as a systemd service. Run it again at any time:
# every step checks before it changes anything, and the config is never overwritten.
set -euo pipefail

PROG=$(basename "$0")
SRC=$(cd "$(dirname "$0")/.." && pwd)

usage() {
    cat <<EOF
Usage: $PROG [OPTIONS]
       $PROG --uninstall [--purge] [--root DIR]

Install gpuwarden as a systemd service: the gpuwarden user and group, a venv in
/opt/gpuwarden/venv, /etc/gpuwarden/config.toml (only if absent), API keys and the SSH key in
/etc/credstore (encrypted into /etc/credstore.encrypted with systemd-creds where available),
the unit, then enable and (re)start it. Safe to run again, e.g. to upgrade.

Options:
  --vast-key-file FILE     Vast.ai API key   -> credential vast_api_key
  --lambda-key-file FILE   Lambda API key    -> credential lambda_api_key
  --ssh-key-file FILE      SSH private key (PEM/OpenSSH) for rented hosts -> ssh_private_key
  --hf-token-file FILE     Hugging Face token, for gated models -> credential hf_token
                           (without one the daemon makes a key in /var/lib/gpuwarden/ssh)
  --no-encrypt             store credentials in plain files (0600, root) even when
                           systemd-creds is available
  --wheel PATH             install this wheel (or sdist) instead of the source tree $SRC
  --python PY              interpreter for the venv (default: python3; needs 3.11+)
  --no-venv                do not create or update the venv (tests; upgrade the venv yourself)
  --no-start               install and enable, but do not start or restart the service
  --root DIR               lay files down under DIR (like DESTDIR) and only print the
                           commands that would change the running system (systemctl, users)
  --uninstall              stop and disable the service, remove the unit and the venv;
                           keep config, credentials and state
  --purge                  with --uninstall: also remove /etc/gpuwarden, the credentials and
                           /var/lib/gpuwarden (the user and group stay: see below)
  -h, --help               show this help

The gpuwarden user is never deleted: files it owned (backups, outputs) would otherwise end up
owned by the next user given its UID.
EOF
}

die() {
    echo "$PROG: error: $*" >&2
    exit 1
}
say() { echo "$PROG: $*"; }

ROOT=""
NO_VENV=0
NO_START=0
NO_ENCRYPT=0
UNINSTALL=0
PURGE=0
WHEEL=""
PYTHON=python3
declare -A KEY_FILES=()

need_arg() { [[ $# -ge 2 && -n $2 ]] || die "$1 needs a value (see --help)"; }

while [[ $# -gt 0 ]]; do
    case $1 in
    --vast-key-file) need_arg "$@"; KEY_FILES[vast_api_key]=$2; shift 2 ;;
    --lambda-key-file) need_arg "$@"; KEY_FILES[lambda_api_key]=$2; shift 2 ;;
    --ssh-key-file) need_arg "$@"; KEY_FILES[ssh_private_key]=$2; shift 2 ;;
    --hf-token-file) need_arg "$@"; KEY_FILES[hf_token]=$2; shift 2 ;;
    --wheel) need_arg "$@"; WHEEL=$2; shift 2 ;;
    --python) need_arg "$@"; PYTHON=$2; shift 2 ;;
    --root) need_arg "$@"; ROOT=$2; shift 2 ;;
    --no-encrypt) NO_ENCRYPT=1; shift ;;
    --no-venv) NO_VENV=1; shift ;;
    --no-start) NO_START=1; shift ;;
    --uninstall) UNINSTALL=1; shift ;;
    --purge) PURGE=1; shift ;;
    -h | --help) usage; exit 0 ;;
    *) die "unknown option '$1' (see --help)" ;;
    esac
done

[[ $PURGE -eq 0 || $UNINSTALL -eq 1 ]] || die "--purge only goes with --uninstall"
# Check the key files before anything is laid down. A pipe is fine: --vast-key-file <(pass vast).
for id in "${!KEY_FILES[@]}"; do
    f=${KEY_FILES[$id]}
    [[ -r $f && ! -d $f ]] || die "cannot read $f (for $id)"
    [[ ! -f $f || -s $f ]] || die "$f is empty (for $id)"
done
if [[ -n $ROOT ]]; then
    mkdir -p "$ROOT"
    ROOT=$(cd "$ROOT" && pwd)
    [[ $ROOT != / ]] || ROOT=""
fi

# The credential names the daemon reads from $CREDENTIALS_DIRECTORY (gpuwarden.config.settings.CREDENTIALS).
CRED_IDS=(vast_api_key lambda_api_key ssh_private_key hf_token)

# Where things go on the target system (without the --root prefix).
OPT=/opt/gpuwarden
VENV=$OPT/venv
CONF_DIR=/etc/gpuwarden
CONF=$CONF_DIR/config.toml
STATE_DIR=/var/lib/gpuwarden
CREDSTORE=/etc/credstore
CREDSTORE_ENC=/etc/credstore.encrypted
UNIT=/etc/systemd/system/gpuwarden.service
DROPIN_DIR=/etc/systemd/system/gpuwarden.service.d
DROPIN=$DROPIN_DIR/10-credentials.conf
SYSUSERS=/etc/sysusers.d/gpuwarden.conf
TMPFILES=/etc/tmpfiles.d/gpuwarden.conf
BIN_LINK=/usr/local/bin/gpuwarden

CHANGED=0 # set when something the running service depends on changed
STAGE=""  # a temporary copy of the source tree for pip

# Run a command that changes the live system, or under --root only say what it would be.
live() {
    if [[ -n $ROOT ]]; then
        say "would run: $*"
    else
        "$@"
    fi
}

have() { command -v "$1" >/dev/null 2>&1; }

# systemctl is only usable when systemd is PID 1 (not in containers or chroots).
have_systemd() { [[ -z $ROOT ]] && have systemctl && [[ -d /run/systemd/system ]]; }

# install_file SRC DEST MODE: copy when the content differs; report what happened.
install_file() {
    local src=$1 dest=$ROOT$2 mode=$3
    mkdir -p "$(dirname "$dest")"
    if [[ -f $dest ]] && cmp -s "$src" "$dest"; then
        chmod "$mode" "$dest"
        return 0
    fi
    install -m "$mode" "$src" "$dest"
    say "installed $2"
    CHANGED=1
}

# set_toml_key FILE SECTION KEY VALUE: set KEY = VALUE in [SECTION], replacing the first
# `KEY = ...` line there (or a commented-out `# KEY = ...` one), else adding it after the header,
# else adding the section at the end.
set_toml_key() {
    local file=$1 section=$2 key=$3 value=$4 tmp
    tmp=$(mktemp)
    awk -v section="$section" -v key="$key" -v value="$value" '
        function header(line,   s) {
            if (line !~ /^[ \t]*\[[^]]+\][ \t]*(#.*)?$/) return ""
            s = line; sub(/^[ \t]*\[[ \t]*/, "", s); sub(/[ \t]*\].*$/, "", s); return s
        }
        function is_key(line, commented,   re) {
            re = "^[ \t]*" (commented ? "#[ \t]*" : "") key "[ \t]*="
            return line ~ re
        }
        # pass 1: find which line to replace
        NR == FNR {
            h = header($0); if (h != "") { sec = h; next }
            if (sec == section && !live_line && is_key($0, 0)) live_line = FNR
            if (sec == section && !comment_line && is_key($0, 1)) comment_line = FNR
            next
        }
        FNR == 1 { target = live_line ? live_line : comment_line; sec = "" }
        {
            h = header($0)
            if (h != "") {
                sec = h
                print
                if (h == section) { found = 1; if (!target) { print key " = " value; done = 1 } }
                next
            }
            if (FNR == target) { print key " = " value; done = 1; next }
            print
        }
        END { if (!done) { print ""; print "[" section "]"; print key " = " value } }
    ' "$file" "$file" >"$tmp"
    cat "$tmp" >"$file"
    rm -f "$tmp"
}

install_user() {
    install_file "$SRC/systemd/gpuwarden.sysusers" "$SYSUSERS" 0644
    if [[ -n $ROOT ]]; then
        live systemd-sysusers "$SYSUSERS"
    elif getent passwd gpuwarden >/dev/null; then
        : # already there
    elif have systemd-sysusers; then
        systemd-sysusers "$SYSUSERS"
        say "created user and group gpuwarden"
    else
        getent group gpuwarden >/dev/null || groupadd --system gpuwarden
        useradd --system --gid gpuwarden --home-dir "$STATE_DIR" --no-create-home \
            --shell /usr/sbin/nologin --comment "gpuwarden GPU rental supervisor" gpuwarden
        say "created user and group gpuwarden (useradd)"
    fi
}

install_venv() {
    if [[ $NO_VENV -eq 1 ]]; then
        say "skipping the venv (--no-venv): $VENV is left as it is"
        return 0
    fi
    local py=$ROOT$VENV/bin/python target=${WHEEL:-$SRC}
    [[ -e $target ]] || die "no such wheel or source tree: $target"
    if [[ ! -x $py ]]; then
        have "$PYTHON" || die "$PYTHON not found; pass --python /path/to/python3.11+"
        "$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))' ||
            die "$PYTHON is older than 3.11; pass --python /path/to/python3.11+"
        mkdir -p "$ROOT$OPT"
        "$PYTHON" -m venv "$ROOT$VENV"
        say "created venv $VENV"
    fi
    say "installing gpuwarden from $target into $VENV"
    "$py" -m pip install --quiet --upgrade pip
    if [[ -d $target ]]; then
        # Build from a copy: pip builds in-tree, and root-owned build/ and *.egg-info left in
        # the operator's checkout would be a nuisance. pip reinstalls a source tree every time.
        STAGE=$(mktemp -d)
        trap 'rm -rf "$STAGE"' EXIT
        cp -r "$target/pyproject.toml" "$target/README.md" "$target/daemon" "$STAGE/"
        # What goes onto rented instances (probe, dead-man switch, job runner) is package data
        # in daemon/gpuwarden/remote/assets/, so the copy of daemon/ carries it.
        find "$STAGE" \( -name '*.egg-info' -o -name __pycache__ \) -prune -exec rm -rf {} +
        "$py" -m pip install --quiet --upgrade "$STAGE"
    else
        "$py" -m pip install --quiet --upgrade "$target"
        # pip skips a wheel of the version already installed: reinstall it, not its deps.
        "$py" -m pip install --quiet --force-reinstall --no-deps "$target"
    fi
    CHANGED=1
}

install_cli_link() {
    mkdir -p "$ROOT$(dirname "$BIN_LINK")"
    if [[ "$(readlink "$ROOT$BIN_LINK" 2>/dev/null)" != "$VENV/bin/gpuwarden" ]]; then
        ln -sfn "$VENV/bin/gpuwarden" "$ROOT$BIN_LINK"
        say "linked $BIN_LINK -> $VENV/bin/gpuwarden"
    fi
}

install_config() {
    local dest=$ROOT$CONF tmp id
    mkdir -p "$ROOT$CONF_DIR"
    chmod 0755 "$ROOT$CONF_DIR"
    if [[ -e $dest ]]; then
        say "kept $CONF (never overwritten; compare with $SRC/config.example.toml after upgrades)"
        return 0
    fi
    [[ -f $SRC/config.example.toml ]] || die "missing $SRC/config.example.toml"
    tmp=$(mktemp)
    cp "$SRC/config.example.toml" "$tmp"
    # Production: the directories the unit gives the service (it also forces them through
    # the environment), and no simulated cloud.
    set_toml_key "$tmp" daemon state_dir "\"$STATE_DIR\""
    set_toml_key "$tmp" daemon socket '"/run/gpuwarden/control.sock"'
    set_toml_key "$tmp" providers.sim enabled false
    # A provider whose key is being installed is one the operator means to use.
    for id in "${!KEY_FILES[@]}"; do
        case $id in
        vast_api_key) set_toml_key "$tmp" providers.vast enabled true ;;
        lambda_api_key) set_toml_key "$tmp" providers.lambda enabled true ;;
        esac
    done
    install -m 0640 "$tmp" "$dest"
    rm -f "$tmp"
    live chown root:gpuwarden "$CONF"
    say "created $CONF from config.example.toml: review it, then systemctl reload gpuwarden"
    CHANGED=1
}

can_encrypt() { [[ -z $ROOT && $NO_ENCRYPT -eq 0 ]] && have systemd-creds; }

install_credentials() {
    local id src
    mkdir -p "$ROOT$CREDSTORE" "$ROOT$CREDSTORE_ENC"
    chmod 0700 "$ROOT$CREDSTORE" "$ROOT$CREDSTORE_ENC"
    for id in "${CRED_IDS[@]}"; do
        [[ -n ${KEY_FILES[$id]:-} ]] || continue
        src=${KEY_FILES[$id]}
        if can_encrypt; then
            # The name is sealed into the credential: LoadCredentialEncrypted=$id checks it.
            (umask 077 && systemd-creds encrypt --name="$id" "$src" "$CREDSTORE_ENC/$id")
            chmod 0600 "$CREDSTORE_ENC/$id"
            rm -f "$CREDSTORE/$id"
            say "encrypted $id into $CREDSTORE_ENC/$id"
        else
            install -m 0600 "$src" "$ROOT$CREDSTORE/$id"
            rm -f "$ROOT$CREDSTORE_ENC/$id"
            say "stored $id in $CREDSTORE/$id (mode 0600)"
        fi
        CHANGED=1
    done
    write_credentials_dropin
}

# The unit loads every credential plain from /etc/credstore; this drop-in says, per credential,
# which store holds it, so that unit and credstore always agree (LoadCredentialEncrypted= fails
# on a plain file, LoadCredential= does not look in credstore.encrypted).
write_credentials_dropin() {
    local tmp id
    tmp=$(mktemp)
    {
        echo "# Written by deploy/install.sh from what is in $CREDSTORE and $CREDSTORE_ENC."
        echo "# Re-run install.sh after adding or removing a credential by hand."
        echo "[Service]"
        echo "LoadCredential="
        for id in "${CRED_IDS[@]}"; do
            if [[ -f $ROOT$CREDSTORE_ENC/$id ]]; then
                echo "LoadCredentialEncrypted=$id"
            else
                echo "LoadCredential=$id"
            fi
        done
    } >"$tmp"
    install_file "$tmp" "$DROPIN" 0644
    rm -f "$tmp"
}

install_units() {
    install_file "$SRC/systemd/gpuwarden.service" "$UNIT" 0644
    install_file "$SRC/systemd/gpuwarden.tmpfiles" "$TMPFILES" 0644
    mkdir -p "$ROOT$STATE_DIR"
    chmod 0750 "$ROOT$STATE_DIR"
    live chown gpuwarden:gpuwarden "$STATE_DIR"
}

start_service() {
    if [[ -n $ROOT ]] || ! have_systemd; then
        [[ -n $ROOT ]] || say "systemd is not running here: enable and start gpuwarden yourself"
        live systemctl daemon-reload
        live systemctl enable gpuwarden.service
        [[ $NO_START -eq 1 ]] || live systemctl restart gpuwarden.service
        return 0
    fi
    systemctl daemon-reload
    systemctl enable --quiet gpuwarden.service
    if [[ $NO_START -eq 1 ]]; then
        say "enabled gpuwarden.service (not started: --no-start)"
    elif ! systemctl is-active --quiet gpuwarden.service; then
        systemctl start gpuwarden.service
        say "started gpuwarden.service"
    elif [[ $CHANGED -eq 1 ]]; then
        systemctl restart gpuwarden.service
        say "restarted gpuwarden.service to pick up the changes"
    else
        say "gpuwarden.service is running and nothing changed"
    fi
}

do_install() {
    [[ -n $ROOT || $(id -u) -eq 0 ]] || die "run as root (or with --root DIR to try it out)"
    install_user
    install_venv
    install_cli_link
    install_config
    install_credentials
    install_units
    start_service
    say "done. Operators join the group to use the CLI: usermod -aG gpuwarden NAME"
    say "follow the daemon with: journalctl -u gpuwarden -f"
}

do_uninstall() {
    [[ -n $ROOT || $(id -u) -eq 0 ]] || die "run as root (or with --root DIR)"
    local id
    if have_systemd || [[ -n $ROOT ]]; then
        say "note: a stopped daemon leaves rented instances to their dead-man switches;" \
            "to end them now, run 'gpuwarden destroy-all --yes' before uninstalling"
        live systemctl disable --now gpuwarden.service
    fi
    rm -f "$ROOT$UNIT" "$ROOT$DROPIN"
    rmdir "$ROOT$DROPIN_DIR" 2>/dev/null || true
    rm -rf "$ROOT$VENV"
    rmdir "$ROOT$OPT" 2>/dev/null || true
    if [[ "$(readlink "$ROOT$BIN_LINK" 2>/dev/null)" == "$VENV/bin/gpuwarden" ]]; then
        rm -f "$ROOT$BIN_LINK"
    fi
    say "removed the unit, $VENV and $BIN_LINK"
    if [[ $PURGE -eq 1 ]]; then
        rm -rf "$ROOT$CONF_DIR" "$ROOT$STATE_DIR"
        for id in "${CRED_IDS[@]}"; do
            rm -f "$ROOT$CREDSTORE/$id" "$ROOT$CREDSTORE_ENC/$id"
        done
        rm -f "$ROOT$SYSUSERS" "$ROOT$TMPFILES"
        say "purged $CONF_DIR, $STATE_DIR and the gpuwarden credentials (user gpuwarden kept)"
    else
        say "kept $CONF_DIR, $STATE_DIR and the credentials (--purge removes them)"
    fi
    if have_systemd || [[ -n $ROOT ]]; then
        live systemctl daemon-reload
    fi
}

if [[ $UNINSTALL -eq 1 ]]; then
    do_uninstall
else
    do_install
fi
