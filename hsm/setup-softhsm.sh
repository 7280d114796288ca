#!/usr/bin/env bash
# Create a SoftHSM2 token for development and tests.
#
#   hsm/setup-softhsm.sh STATE_DIR [TOKEN_LABEL]
#
# Creates, under STATE_DIR (default label: kms-dev):
#   softhsm/softhsm2.conf   SoftHSM2 configuration (token directory, file object store, log level ERROR)
#   softhsm/tokens/         the token files
#   hsm-pin, hsm-so-pin     random user and security-officer PINs, mode 0600
# and initializes the token. Running it again is safe: an existing token is left as it is.
#
# Prints on stdout two KEY=VALUE lines for programs to read:
#   SOFTHSM2_CONF=<absolute path of the configuration>
#   PKCS11_URI=pkcs11:token=<label>?module-path=<libsofthsm2.so>&pin-source=file:<STATE_DIR>/hsm-pin
# SoftHSM2 finds its tokens through SOFTHSM2_CONF: export it before starting the service.
#
# The PINs never appear in the output. softhsm2-util takes them only as --pin/--so-pin arguments (it
# refuses to read them from a pipe), so they are visible in the process list while it runs; this is a
# development token, and production HSMs are initialized by their own tooling.
#
# The library is found in $SOFTHSM2_MODULE, else in the usual Debian, Fedora, Alpine and Homebrew places.

set -eu
umask 077

die() {
    printf 'setup-softhsm: %s\n' "$*" >&2
    exit 1
}

[ $# -ge 1 ] && [ $# -le 2 ] || die "usage: $0 STATE_DIR [TOKEN_LABEL]"
label=${2:-kms-dev}

# The label and the state directory go into a PKCS#11 URI unencoded: allow only characters that need
# no percent-encoding there. SoftHSM2 labels are at most 32 bytes.
case $label in
    '' | *[!A-Za-z0-9._-]*) die "token label must be 1-32 of A-Z a-z 0-9 . _ -" ;;
esac
[ ${#label} -le 32 ] || die "token label must be at most 32 characters"

command -v softhsm2-util >/dev/null 2>&1 || die "softhsm2-util not found; install SoftHSM2 (Debian/Ubuntu: apt-get install softhsm2)"

find_module() {
    if [ -n "${SOFTHSM2_MODULE:-}" ]; then
        [ -f "$SOFTHSM2_MODULE" ] || die "SOFTHSM2_MODULE does not name a file: $SOFTHSM2_MODULE"
        printf '%s\n' "$SOFTHSM2_MODULE"
        return
    fi
    for candidate in \
        /usr/lib/softhsm/libsofthsm2.so \
        /usr/lib/x86_64-linux-gnu/softhsm/libsofthsm2.so \
        /usr/lib/aarch64-linux-gnu/softhsm/libsofthsm2.so \
        /usr/lib/*/softhsm/libsofthsm2.so \
        /usr/lib64/softhsm/libsofthsm2.so \
        /usr/lib64/pkcs11/libsofthsm2.so \
        /usr/lib/pkcs11/libsofthsm2.so \
        /usr/local/lib/softhsm/libsofthsm2.so \
        /opt/homebrew/lib/softhsm/libsofthsm2.so; do
        if [ -f "$candidate" ]; then
            printf '%s\n' "$candidate"
            return
        fi
    done
    die "libsofthsm2.so not found; install SoftHSM2 or set SOFTHSM2_MODULE to its path"
}
module=$(find_module)

# Characters that may stand unencoded in a PKCS#11 URI query value.
path_chars_ok() {
    case $1 in
        *[!A-Za-z0-9._/+,:@=-]*) return 1 ;;
    esac
}
path_chars_ok "$1" || die "state directory path must use only A-Z a-z 0-9 . _ / + , : @ = -"
mkdir -p "$1"
state_dir=$(cd "$1" && pwd -P)
path_chars_ok "$state_dir" || die "state directory path must use only A-Z a-z 0-9 . _ / + , : @ = -"
path_chars_ok "$module" || die "module path must use only A-Z a-z 0-9 . _ / + , : @ = -"

softhsm_dir=$state_dir/softhsm
conf=$softhsm_dir/softhsm2.conf
pin_file=$state_dir/hsm-pin
so_pin_file=$state_dir/hsm-so-pin
mkdir -p "$softhsm_dir/tokens"

# The configuration follows from STATE_DIR alone; rewrite it every time (atomically) so that it is
# always right, even after the directory was moved.
cat >"$conf.tmp" <<EOF
# Written by hsm/setup-softhsm.sh; rewritten on every run.
directories.tokendir = $softhsm_dir/tokens
objectstore.backend = file
log.level = ERROR
slots.removable = false
EOF
mv -f "$conf.tmp" "$conf"
SOFTHSM2_CONF=$conf
export SOFTHSM2_CONF

token_exists() {
    # --show-slots prints "Label:" followed by the label padded with spaces to 32 characters.
    softhsm2-util --show-slots 2>/dev/null |
        awk -v want="$label" '$1 == "Label:" { sub(/^[ \t]*Label:[ \t]*/, ""); sub(/[ \t]+$/, ""); if ($0 == want) found = 1 }
                             END { exit found ? 0 : 1 }'
}

new_pin() {
    # 128 random bits as 32 hex digits.
    od -An -N16 -tx1 /dev/urandom | tr -d ' \n'
}

write_pin() {
    # $1: file. Written to a temporary file first so that a PIN file is never half written.
    [ -s "$1" ] && return
    new_pin >"$1.tmp"
    chmod 600 "$1.tmp"
    mv -f "$1.tmp" "$1"
}

if token_exists; then
    [ -s "$pin_file" ] || die "token '$label' exists but $pin_file is missing; delete $softhsm_dir to start over"
    printf 'setup-softhsm: token %s already exists; left unchanged\n' "$label" >&2
else
    write_pin "$pin_file"
    write_pin "$so_pin_file"
    # Output of softhsm2-util goes to stderr; it never prints the PINs.
    softhsm2-util --init-token --free --label "$label" \
        --so-pin "$(cat "$so_pin_file")" --pin "$(cat "$pin_file")" >&2 ||
        die "softhsm2-util could not initialize the token"
    token_exists || die "token '$label' was not found after initialization"
fi

printf 'SOFTHSM2_CONF=%s\n' "$conf"
printf 'PKCS11_URI=pkcs11:token=%s?module-path=%s&pin-source=file:%s\n' "$label" "$module" "$pin_file"
printf 'setup-softhsm: export SOFTHSM2_CONF=%s before starting the service\n' "$conf" >&2
