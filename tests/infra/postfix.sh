#!/usr/bin/env bash
# Runs four real Postfix instances on loopback aliases for relayprobe's tests:
#   closed      127.0.0.2:25  Debian's stock relay restrictions; relaying is deferred (454)
#   open        127.0.0.3:25  mynetworks = 0.0.0.0/0, an open relay; relaytest.invalid goes to
#                             relayprobe's canary sink on 127.0.0.1:2525 (plaintext)
#   tls-open    127.0.0.4:25  requires STARTTLS before MAIL (530 until then), then relays
#                             like open
#   tls-closed  127.0.0.5:25  offers STARTTLS, closed like closed
# Each TLS instance presents a self-signed certificate for <name>.relayprobe.test that this
# script generates into its config directory (tls-cert.pem, tls-key.pem).
# No instance ever reaches the network: every non-test destination goes to the error
# transport and nothing does DNS. Stock error limits are kept on purpose (soft 10, hard 20,
# 1 s sleep): the tests prove relayprobe stays under them.
#
# Usage (as root): tests/infra/postfix.sh start|stop|status
# Idempotent; works on a Postfix installed with "No configuration" (no main.cf yet) and on
# one where an earlier version of this script set up only closed and open.
set -euo pipefail

readonly INSTANCES=(closed open tls-open tls-closed)
readonly -A HOSTS=([closed]=127.0.0.2 [open]=127.0.0.3 [tls-open]=127.0.0.4 [tls-closed]=127.0.0.5)
# Whether an instance relays for anyone, and its smtpd_tls_security_level (empty: no TLS).
readonly -A RELAYS=([closed]=no [open]=yes [tls-open]=yes [tls-closed]=no)
readonly -A TLS_LEVELS=([closed]="" [open]="" [tls-open]=encrypt [tls-closed]=may)
readonly PRIMARY=closed
readonly SMTP_PORT=25
readonly SINK_HOST=127.0.0.1
readonly SINK_PORT=2525
readonly TEST_DOMAIN=relaytest.invalid
readonly CERT_DAYS=365
# A certificate closer than this to its end is replaced, so no test run sees it expire.
readonly CERT_RENEW_S=$((7 * 86400))
readonly LOCK=/run/relayprobe-postfix.lock
readonly START_TIMEOUT_S=30

die() {
    echo "postfix.sh: $*" >&2
    exit 1
}

# The primary instance lives in /etc/postfix; the others are postmulti instances.
instance_dir() {
    if [[ $1 == "$PRIMARY" ]]; then echo /etc/postfix; else echo "/etc/postfix-$1"; fi
}

instance_log() { echo "/var/log/postfix-$1.log"; }
hostname_of() { echo "$1.relayprobe.test"; }
cert_file() { echo "$(instance_dir "$1")/tls-cert.pem"; }
key_file() { echo "$(instance_dir "$1")/tls-key.pem"; }

# Settings every instance shares. Postfix logs to syslog by default and no syslog runs
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

relaying_settings=(
    "mynetworks = 0.0.0.0/0"
    "transport_maps = inline:{$TEST_DOMAIN=smtp:[$SINK_HOST]:$SINK_PORT}"
    # The sink runs only while a test does. By default one refused connection marks it dead and
    # suspends delivery to it for minutes, so a test after one that left mail behind would see
    # nothing arrive: keep trying instead.
    "default_destination_concurrency_failed_cohort_limit = 1000"
)

# No loopback range: a client here connects from 127.0.0.x and must look foreign.
closed_settings=("mynetworks = 192.0.2.250/32")

# What "postmulti -e init" would write, which "postmulti -e create" needs.
primary_settings=(
    "multi_instance_enable = yes"
    "multi_instance_wrapper = \${command_directory}/postmulti -p --"
)

secondary_settings=(
    "multi_instance_enable = yes"
    "master_service_disable ="
)

# Fills the global array "settings" with everything instance $1 sets in its main.cf.
settings_of() {
    local name=$1
    settings=(
        "${common_settings[@]}"
        "myhostname = $(hostname_of "$name")"
        "inet_interfaces = ${HOSTS[$name]}"
        "maillog_file = $(instance_log "$name")"
    )
    if [[ ${RELAYS[$name]} == yes ]]; then
        settings+=("${relaying_settings[@]}")
    else
        settings+=("${closed_settings[@]}")
    fi
    if [[ $name == "$PRIMARY" ]]; then
        settings+=("${primary_settings[@]}")
    else
        settings+=("${secondary_settings[@]}")
    fi
    if [[ -n ${TLS_LEVELS[$name]} ]]; then
        settings+=(
            "smtpd_tls_security_level = ${TLS_LEVELS[$name]}"
            "smtpd_tls_cert_file = $(cert_file "$name")"
            "smtpd_tls_key_file = $(key_file "$name")"
        )
    fi
}

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

# Prints everything that defines a configured instance, so a running one is restarted only
# on change: its settings (less the list of other instances, which the primary holds but
# its daemons ignore), its services, and its certificate.
fingerprint() {
    local dir=$1 cert
    [[ -f $dir/main.cf ]] || return 0
    postconf -c "$dir" -n | grep -v '^multi_instance_directories = '
    postconf -c "$dir" -M
    cert=$(postconf -c "$dir" -xh smtpd_tls_cert_file)
    if [[ -n $cert && -f $cert ]]; then
        cksum "$cert"
    fi
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

# Succeeds when instance $1 has a key and a matching certificate for its hostname that is
# not about to expire.
certificate_current() {
    local name=$1 cert key
    cert=$(cert_file "$name")
    key=$(key_file "$name")
    [[ -s $cert && -s $key ]] || return 1
    openssl x509 -in "$cert" -noout -checkend "$CERT_RENEW_S" >/dev/null 2>&1 || return 1
    [[ $(openssl x509 -in "$cert" -noout -subject -nameopt RFC2253 2>/dev/null) \
        == "subject=CN=$(hostname_of "$name")" ]] || return 1
    [[ $(openssl x509 -in "$cert" -noout -pubkey 2>/dev/null) \
        == "$(openssl pkey -in "$key" -pubout 2>/dev/null)" ]]
}

# A fresh self-signed certificate, written beside the old one and moved in place, so a
# failed run leaves no half-written file behind.
generate_certificate() {
    local name=$1 cert key common_name output
    cert=$(cert_file "$name")
    key=$(key_file "$name")
    common_name=$(hostname_of "$name")
    output=$(umask 077 && openssl req -x509 -newkey rsa:2048 -nodes -days "$CERT_DAYS" \
        -subj "/CN=$common_name" -addext "subjectAltName = DNS:$common_name" \
        -keyout "$key.new" -out "$cert.new" 2>&1) \
        || die "openssl could not make a certificate for $common_name: $output"
    chmod 0644 "$cert.new"
    mv -f "$key.new" "$key"
    mv -f "$cert.new" "$cert"
}

postmulti_instance_exists() {
    postmulti -l | awk -v name="$1" '$1 == name {found = 1} END {exit !found}'
}

configure() {
    local name dir
    [[ -f /etc/postfix/main.cf ]] || touch /etc/postfix/main.cf
    # The primary comes first: "postmulti -e create" needs its multi-instance settings.
    for name in "$PRIMARY" "${INSTANCES[@]}"; do
        dir=$(instance_dir "$name")
        if [[ $name != "$PRIMARY" ]] && ! postmulti_instance_exists "postfix-$name"; then
            postmulti -I "postfix-$name" -G mta -e create
        fi
        settings_of "$name"
        apply_settings "$dir" "${settings[@]}"
        if [[ -n ${TLS_LEVELS[$name]} ]] && ! certificate_current "$name"; then
            generate_certificate "$name"
        fi
        touch "$(instance_log "$name")"
    done
}

running() {
    postfix -c "$1" status >/dev/null 2>&1
}

start_instance() {
    local name=$1 before=$2 dir log output
    dir=$(instance_dir "$name")
    log=$(instance_log "$name")
    if running "$dir"; then
        [[ $before == "$(fingerprint "$dir")" ]] && return 0
        postfix -c "$dir" stop >/dev/null 2>&1
    fi
    # Mail left by an earlier run is for tests that are over: it would only be refused.
    postsuper -c "$dir" -d ALL >/dev/null 2>&1 || true
    output=$(postfix -c "$dir" start 2>&1) || {
        printf '%s\n' "$output" >&2
        tail -n 20 "$log" >&2
        die "postfix -c $dir start failed (output and log above, full log in $log)"
    }
}

wait_until_answering() {
    local deadline=$((SECONDS + START_TIMEOUT_S)) name
    for name in "${INSTANCES[@]}"; do
        until answers "${HOSTS[$name]}"; do
            ((SECONDS < deadline)) \
                || die "$name (${HOSTS[$name]}:$SMTP_PORT) does not answer after ${START_TIMEOUT_S}s"
            sleep 0.2
        done
    done
}

start() {
    local name
    local -A before=()
    for name in "${INSTANCES[@]}"; do
        add_loopback_alias "${HOSTS[$name]}"
        before[$name]=$(fingerprint "$(instance_dir "$name")")
    done
    configure
    for name in "${INSTANCES[@]}"; do
        start_instance "$name" "${before[$name]}"
    done
    wait_until_answering
}

stop() {
    local name dir
    for name in "${INSTANCES[@]}"; do
        dir=$(instance_dir "$name")
        if [[ -f $dir/main.cf ]] && running "$dir"; then
            postfix -c "$dir" stop >/dev/null 2>&1 || die "postfix -c $dir stop failed"
        fi
    done
}

status() {
    local name failed=0
    for name in "${INSTANCES[@]}"; do
        if answers "${HOSTS[$name]}"; then
            echo "$name ${HOSTS[$name]}:$SMTP_PORT answers"
        else
            echo "$name ${HOSTS[$name]}:$SMTP_PORT does not answer"
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
