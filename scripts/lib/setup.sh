# Shared set-up steps for scripts/demo, scripts/test and scripts/bench (sourced, not run).
# Idempotent: each step checks first and does nothing when the machine is already ready.

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
VENV="$REPO/.venv"

# ensure_debs PKG...: install the Debian packages that are missing (needs root).
ensure_debs() {
    local missing=()
    local p
    for p in "$@"; do
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "ok installed" || missing+=("$p")
    done
    [ ${#missing[@]} -eq 0 ] && return 0
    if [ "$(id -u)" -ne 0 ]; then
        echo "missing Debian packages: ${missing[*]} (run as root, or: sudo apt-get install ${missing[*]})" >&2
        return 1
    fi
    echo "installing Debian packages: ${missing[*]}"
    apt-get update -q >/dev/null
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${missing[@]}" >/dev/null
}

# ensure_venv EXTRAS: a venv in .venv with qsd-py installed (editable) plus the given extras.
# editable_mode=compat puts the repo on sys.path with a one-line .pth: setuptools' default
# import-hook finder costs every daemon start-up ~5 ms (it imports pathlib, urllib, ...).
EDITABLE_MODE=compat
ensure_venv() {
    local extras=$1
    local stamp="$VENV/.qsd-py-$extras"
    local want
    want="$(sha1sum "$REPO/pyproject.toml" | cut -d' ' -f1) $EDITABLE_MODE"
    if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
        return 0
    fi
    [ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
    echo "installing Python packages into $VENV"
    "$VENV/bin/pip" install -q --disable-pip-version-check \
        --config-settings editable_mode=$EDITABLE_MODE -e "$REPO[$extras]"
    echo "$want" > "$stamp"
}

URING_KNOB=/sys/module/fuse/parameters/enable_uring
URING_KNOB_WAS=

# enable_uring_knob: turn FUSE-over-io_uring on when root; restore_uring_knob puts it back.
enable_uring_knob() {
    [ -w "$URING_KNOB" ] || return 0
    URING_KNOB_WAS=$(cat "$URING_KNOB")
    echo Y > "$URING_KNOB"
}

restore_uring_knob() {
    [ -n "$URING_KNOB_WAS" ] && [ -w "$URING_KNOB" ] && echo "$URING_KNOB_WAS" > "$URING_KNOB"
    return 0
}
