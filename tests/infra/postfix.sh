#!/usr/bin/env bash
# Runs two real Postfix instances on loopback aliases for relayprobe's tests:
#   closed  127.0.0.2:25  Debian's stock relay restrictions; relaying is deferred (454)
#   open    127.0.0.3:25  mynetworks = 0.0.0.0/0, an open relay; relaytest.invalid goes to
#                         relayprobe's canary sink on 127.0.0.1:2525
# Neither instance ever reaches the network: every non-test destination goes to the error
# transport and nothing does DNS. Stock error limits are kept on purpose (soft 10, hard 20,
# 1 s sleep): the tests prove relayprobe stays under them.
#
# Usage (as root): tests/infra/postfix.sh start|stop|status
# Idempotent; works on a Postfix installed with "No configuration" (no main.cf yet).
set -euo pipefail

readonly CLOSED_HOST=127.0.0.2
readonly OPEN_HOST=127.0.0.3
readonly SMTP_PORT=25
readonly SINK_HOST=127.0.0.1
readonly SINK_PORT=2525
readonly TEST_DOMAIN=relaytest.invalid
readonly CLOSED_DIR=/etc/postfix
readonly OPEN_NAME=postfix-open
readonly OPEN_DIR=/etc/$OPEN_NAME
readonly CLOSED_LOG=/var/log/postfix-closed.log
readonly OPEN_LOG=/var/log/postfix-open.log
readonly LOCK=/run/relayprobe-postfix.lock
readonly START_TIMEOUT_S=30

die() {
    echo "postfix.sh: $*" >&2
    exit 1
}

# Settings both instances share. Postfix logs to syslog by default and no syslog runs
# here, so maillog_file keeps its errors visible.
common_settings=(
    "compatibility_level = 3.6"
    "inet_protocols = ipv4"
    "mydestination = \$myhostname, localhost.\$mydomain, localhost"
    "myorigin = \$myhostname"
    "relayhost ="
    "append_dot_mydomain = no"
    "biff = no"
    "smtpd_banner = \$myhostname ESMTP \$mail_name (Debian/GNU)"
    "alias_maps = inline:{postmaster=root}"
    "alias_database ="
    "smtpd_relay_restrictions = permit_mynetworks permit_sasl_authenticated defer_unauth_destination"
    "smtpd_peername_lookup = no"
    "smtp_dns_support_level = disabled"
    "smtp_host_lookup = native"
    "default_transport = error:no outbound mail from the relayprobe test instances"
    "relay_transport = error:no outbound mail from the relayprobe test instances"
    "maximal_queue_lifetime = 10m"
    "bounce_queue_lifetime = 10m"
)

closed_settings=(
    "myhostname = closed.relayprobe.test"
    "inet_interfaces = $CLOSED_HOST"
    # No loopback range: a client here connects from 127.0.0.x and must look foreign.
    "mynetworks = 192.0.2.250/32"
    "maillog_file = $CLOSED_LOG"
    "multi_instance_enable = yes"
    "multi_instance_wrapper = \${command_directory}/postmulti -p --"
)

open_settings=(
    "myhostname = open.relayprobe.test"
    "inet_interfaces = $OPEN_HOST"
    "mynetworks = 0.0.0.0/0"
    "transport_maps = inline:{$TEST_DOMAIN=smtp:[$SINK_HOST]:$SINK_PORT}"
    "maillog_file = $OPEN_LOG"
    "multi_instance_enable = yes"
    "master_service_disable ="
)

# Succeeds when HOST:25 answers with a 220 banner within 2 s.
answers() {
    local host=$1 banner
    banner=$(timeout 2 bash -c "exec 3<>/dev/tcp/$host/$SMTP_PORT && head -c 3 <&3" 2>/dev/null) \
        || return 1
    [[ $banner == 220 ]]
}

add_loopback_alias() {
    local address=$1 output
    # "ip addr add" fails on an existing address; its wording differs between versions.
    [[ $(ip -4 addr show dev lo) == *" $address/"* ]] && return 0
    output=$(ip addr add "$address/32" dev lo 2>&1) || die "ip addr add $address/32 dev lo: $output"
}

# Prints everything that defines an instance, so a running one is restarted only on change.
fingerprint() {
    local dir=$1
    postconf -c "$dir" -n
    postconf -c "$dir" -M
}

# Writes only the settings that differ: Postfix commands pause about 1.5 s after main.cf
# changes, so an unconditional "postconf -e" would make every start slow.
apply_settings() {
    local dir=$1 setting
    shift
    local names=() wanted=() current=() changed=() value
    for setting in "$@"; do
        names+=("${setting%% =*}")
        value=${setting#* =}
        wanted+=("${value# }")
    done
    mapfile -t current < <(postconf -c "$dir" -h "${names[@]}")
    local i
    for i in "${!names[@]}"; do
        [[ ${current[i]} == "${wanted[i]}" ]] || changed+=("${names[i]} = ${wanted[i]}")
    done
    if ((${#changed[@]} > 0)); then
        postconf -c "$dir" -e "${changed[@]}"
    fi
    # Debian's master.cf chroots most daemons, which needs files copied in by Debian's init
    # script; no init system runs here, so run them unchrooted.
    if [[ $(postconf -c "$dir" -F '*/*/chroot') == *"= y"* ]]; then
        postconf -c "$dir" -F '*/*/chroot = n'
    fi
}

configure() {
    [[ -f $CLOSED_DIR/main.cf ]] || touch "$CLOSED_DIR/main.cf"
    # The primary instance is the closed one; its settings include what "postmulti -e init"
    # would write, which "postmulti -e create" needs.
    apply_settings "$CLOSED_DIR" "${common_settings[@]}" "${closed_settings[@]}"
    if ! postmulti -l | awk -v name="$OPEN_NAME" '$1 == name {found = 1} END {exit !found}'; then
        postmulti -I "$OPEN_NAME" -G mta -e create
    fi
    apply_settings "$OPEN_DIR" "${common_settings[@]}" "${open_settings[@]}"
    touch "$CLOSED_LOG" "$OPEN_LOG"
}

running() {
    postfix -c "$1" status >/dev/null 2>&1
}

start_instance() {
    local dir=$1 before=$2 log=$3
    if running "$dir"; then
        [[ $before == "$(fingerprint "$dir")" ]] && return 0
        postfix -c "$dir" stop >/dev/null 2>&1
    fi
    local output
    output=$(postfix -c "$dir" start 2>&1) || {
        printf '%s\n' "$output" >&2
        tail -n 20 "$log" >&2
        die "postfix -c $dir start failed (output and log above, full log in $log)"
    }
}

wait_until_answering() {
    local deadline=$((SECONDS + START_TIMEOUT_S)) host
    for host in "$CLOSED_HOST" "$OPEN_HOST"; do
        until answers "$host"; do
            ((SECONDS < deadline)) || die "$host:$SMTP_PORT does not answer after ${START_TIMEOUT_S}s"
            sleep 0.2
        done
    done
}

start() {
    add_loopback_alias "$CLOSED_HOST"
    add_loopback_alias "$OPEN_HOST"
    local closed_before="" open_before=""
    if [[ -f $CLOSED_DIR/main.cf ]]; then
        closed_before=$(fingerprint "$CLOSED_DIR")
    fi
    if [[ -f $OPEN_DIR/main.cf ]]; then
        open_before=$(fingerprint "$OPEN_DIR")
    fi
    configure
    start_instance "$CLOSED_DIR" "$closed_before" "$CLOSED_LOG"
    start_instance "$OPEN_DIR" "$open_before" "$OPEN_LOG"
    wait_until_answering
}

stop() {
    local dir
    for dir in "$CLOSED_DIR" "$OPEN_DIR"; do
        if [[ -f $dir/main.cf ]] && running "$dir"; then
            postfix -c "$dir" stop >/dev/null 2>&1 || die "postfix -c $dir stop failed"
        fi
    done
}

status() {
    local host failed=0
    for host in "$CLOSED_HOST" "$OPEN_HOST"; do
        if answers "$host"; then
            echo "$host:$SMTP_PORT answers"
        else
            echo "$host:$SMTP_PORT does not answer"
            failed=1
        fi
    done
    return "$failed"
}

case ${1:-} in
    start | stop)
        ((EUID == 0)) || die "$1 needs root"
        command -v postfix >/dev/null || die "Postfix is not installed (run .ci/system-packages)"
        exec 9>"$LOCK"
        flock -w 60 9 || die "another postfix.sh holds $LOCK"
        "$1"
        ;;
    status) status ;;
    *)
        echo "usage: $0 start|stop|status" >&2
        exit 2
        ;;
esac
