#!/bin/sh
# Installs the Debian packages clawback's demo and tests need, when run as root
# and only if something is missing. Without root it only says what is missing.
set -eu
need=""
python3 -c 'import venv, ensurepip' 2>/dev/null || need="$need python3-venv"
command -v xattr >/dev/null 2>&1 || true   # not needed: os.*xattr is used
command -v setfattr >/dev/null 2>&1 || need="$need attr"
[ -z "$need" ] && exit 0
if [ "$(id -u)" = "0" ] && command -v apt-get >/dev/null 2>&1; then
    echo "system-deps: installing$need"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq >/dev/null
    # shellcheck disable=SC2086
    apt-get install -y -qq $need >/dev/null
else
    echo "system-deps: missing$need (run as root, or install them yourself)" >&2
fi
