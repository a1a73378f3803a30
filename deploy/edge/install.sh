#!/usr/bin/env bash
# Installs the Tributary agent on a gateway without apt: the binary, a config (an existing one
# is kept), the systemd unit and the `tributary` system user. One step, safe to run again, and
# `--uninstall` undoes it (the buffered data stays unless `--purge`).
#
# Why a script next to the Debian package: many gateways run Yocto, Buildroot or a vendor image
# with systemd but no dpkg. The script installs the same unit as the package, with the binary in
# /usr/local/bin. `--root DIR` installs into another root (an image being built, or a scratch
# directory in the tests) without touching the running system.
#
# Usage (run `install.sh --help` for all options):
#   sudo ./install.sh --collector collector.example.com:4433 \
#       --fingerprint 5E:9B:...:D6 --token-file ./agent.token [--agent-id gw-berlin-01]
#   sudo ./install.sh --uninstall [--purge]
#
# Inputs may also come from the environment: TRIBUTARY_COLLECTOR, TRIBUTARY_CERT_FINGERPRINT,
# TRIBUTARY_TOKEN, TRIBUTARY_AGENT_ID, TRIBUTARY_AGENT_BINARY. Command-line options win.
set -euo pipefail

SCRIPT_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)

USER_NAME=tributary
SERIAL_GROUP=dialout
BIN_PATH=/usr/local/bin/tributary-agent
CONFIG_DIR=/etc/tributary
CONFIG_PATH=$CONFIG_DIR/agent.toml
TOKEN_PATH=$CONFIG_DIR/agent.token
STATE_DIR=/var/lib/tributary
UNIT_NAME=tributary-agent.service
UNIT_PATH=/etc/systemd/system/$UNIT_NAME
DROPIN_DIR=/etc/systemd/system/$UNIT_NAME.d
WANTS_LINK=/etc/systemd/system/multi-user.target.wants/$UNIT_NAME
# The Debian package's paths, rewritten in the unit for this install.
PACKAGE_BIN_PATH=/usr/bin/tributary-agent

usage() {
    cat <<EOF
Usage: install.sh [options]             install or update the agent
       install.sh --uninstall [--purge] remove it (the buffer in $STATE_DIR stays unless --purge)

Required on the first install (an existing $CONFIG_PATH is kept, and then they are not needed):
  --collector HOST:PORT     the collector's QUIC address          (env TRIBUTARY_COLLECTOR)
  --fingerprint HEX         SHA-256 of the collector's certificate, 64 hex digits, ':' allowed
                            (env TRIBUTARY_CERT_FINGERPRINT; printed by the collector at start)
  --token TOKEN | --token-file PATH
                            the agent's token from \`tributary-collector token add\`
                            (env TRIBUTARY_TOKEN; a file keeps it out of the process list)
Optional:
  --agent-id ID             this gateway's name, 1-64 of A-Z a-z 0-9 _ - .
                            (env TRIBUTARY_AGENT_ID; default: the host name)
  --server-name NAME        TLS name of the collector (default: the host of --collector)
  --mqtt-broker HOST:PORT   the gateway's MQTT broker the first source subscribes to
                            (default 127.0.0.1:1883; edit the config for serial sensors)
  --binary PATH             the tributary-agent binary to install (env TRIBUTARY_AGENT_BINARY;
                            default: ./tributary-agent next to this script)
  --unit PATH               the unit file (default: next to this script, or ../systemd/)
  --root DIR                install into DIR instead of / (no service is started)
  --no-start                install and enable, but do not (re)start the service
  --uninstall               stop and remove the agent, its config, token and unit
  --purge                   with --uninstall: also remove the buffered data and the user
  -h, --help                this text
EOF
}

say() { echo "install.sh: $*"; }
die() {
    echo "install.sh: ERROR: $*" >&2
    exit 1
}

collector=${TRIBUTARY_COLLECTOR:-}
fingerprint=${TRIBUTARY_CERT_FINGERPRINT:-}
token=${TRIBUTARY_TOKEN:-}
token_file=
agent_id=${TRIBUTARY_AGENT_ID:-}
server_name=
mqtt_broker=127.0.0.1:1883
binary=${TRIBUTARY_AGENT_BINARY:-}
unit_source=
root=/
start=1
mode=install
purge=0

needs_value() {
    [[ $# -ge 2 && -n $2 ]] || die "$1 needs a value (see --help)"
}

while (($# > 0)); do
    case $1 in
        --collector) needs_value "$@"; collector=$2; shift 2 ;;
        --fingerprint) needs_value "$@"; fingerprint=$2; shift 2 ;;
        --token) needs_value "$@"; token=$2; shift 2 ;;
        --token-file) needs_value "$@"; token_file=$2; shift 2 ;;
        --agent-id) needs_value "$@"; agent_id=$2; shift 2 ;;
        --server-name) needs_value "$@"; server_name=$2; shift 2 ;;
        --mqtt-broker) needs_value "$@"; mqtt_broker=$2; shift 2 ;;
        --binary) needs_value "$@"; binary=$2; shift 2 ;;
        --unit) needs_value "$@"; unit_source=$2; shift 2 ;;
        --root) needs_value "$@"; root=$2; shift 2 ;;
        --no-start) start=0; shift ;;
        --uninstall) mode=uninstall; shift ;;
        --purge) purge=1; shift ;;
        -h | --help) usage; exit 0 ;;
        *) die "unknown option \`$1\` (see --help)" ;;
    esac
done

((purge == 0)) || [[ $mode == uninstall ]] || die "--purge only goes with --uninstall"
[[ -d $root ]] || die "--root $root is not a directory; create it first"
root=$(cd "$root" && pwd)
# The target path of an absolute path inside the root ("/" + "/etc" must not become "//etc").
target() { if [[ $root == / ]]; then echo "$1"; else echo "$root$1"; fi; }

is_root_user() { [[ $(id -u) == 0 ]]; }
if ! is_root_user; then
    [[ $root != / ]] || die "run as root (sudo $0 ...): installing a service needs it"
    say "not running as root: files in $root are installed without the $USER_NAME owner and no user is created"
fi

# systemd is managing this very root right now (not true for --root, chroots and containers).
systemd_running() { [[ $root == / && -d /run/systemd/system ]] && command -v systemctl >/dev/null; }

# ---------------------------------------------------------------------------------------------
# Users, in the target root. useradd --root applies the change to DIR/etc/passwd and friends.

root_option=()
[[ $root == / ]] || root_option=(--root "$root")

user_exists() {
    if [[ $root == / ]]; then getent passwd "$USER_NAME" >/dev/null; else grep -q "^$USER_NAME:" "$root/etc/passwd" 2>/dev/null; fi
}
group_exists() {
    if [[ $root == / ]]; then getent group "$1" >/dev/null; else grep -q "^$1:" "$root/etc/group" 2>/dev/null; fi
}
user_in_group() {
    local members
    if [[ $root == / ]]; then members=$(getent group "$1" | cut -d: -f4); else members=$(grep "^$1:" "$root/etc/group" | cut -d: -f4); fi
    [[ ,$members, == *",$USER_NAME,"* ]]
}

ensure_user() {
    is_root_user || return 0
    [[ $root == / || -f $root/etc/passwd ]] ||
        die "$root/etc/passwd does not exist: --root must hold an /etc with passwd and group files to add the $USER_NAME user"
    if user_exists; then
        say "user $USER_NAME exists"
    else
        command -v useradd >/dev/null || die "useradd not found; install the shadow/passwd tools or create a system user $USER_NAME by hand"
        useradd "${root_option[@]}" --system --user-group --home-dir "$STATE_DIR" --no-create-home \
            --shell /usr/sbin/nologin --comment "Tributary agent" "$USER_NAME" ||
            die "useradd $USER_NAME failed (see above)"
        say "created system user $USER_NAME"
    fi
    if ! group_exists "$SERIAL_GROUP"; then
        say "warning: no group $SERIAL_GROUP; serial sensors need the agent to be able to open the tty (add a udev rule or the group)"
    elif ! user_in_group "$SERIAL_GROUP"; then
        usermod "${root_option[@]}" --append --groups "$SERIAL_GROUP" "$USER_NAME" ||
            die "usermod: adding $USER_NAME to $SERIAL_GROUP failed (see above)"
        say "added $USER_NAME to $SERIAL_GROUP (serial ports)"
    fi
}

# Numeric ids from the target root's files: names resolve differently inside and outside it.
id_of() {
    local file=$1 name=$2
    if [[ $root == / ]]; then
        getent "$(basename "$file")" "$name" | cut -d: -f3
    else
        grep "^$name:" "$root/etc/$(basename "$file")" | head -n 1 | cut -d: -f3
    fi
}

set_owner() {
    local owner=$1 group=$2 path=$3 uid gid
    is_root_user || return 0
    uid=$([[ $owner == root ]] && echo 0 || id_of passwd "$owner")
    gid=$([[ $group == root ]] && echo 0 || id_of group "$group")
    [[ -n $uid && -n $gid ]] || die "cannot resolve $owner:$group in $root/etc/passwd and group"
    chown "$uid:$gid" "$path"
}

# ---------------------------------------------------------------------------------------------
# Input checks: say what is wrong with which input, and what to do.

problems=()
problem() { problems+=("$1"); }

check_host_port() {
    local name=$1 value=$2 host port
    host=${value%:*}
    port=${value##*:}
    if [[ $value != *:* || -z $host || ! $port =~ ^[0-9]+$ ]] || ((10#$port < 1 || 10#$port > 65535)); then
        problem "$name \`$value\` is not HOST:PORT with a port in 1-65535 (e.g. collector.example.com:4433)"
    fi
}

check_install_inputs() {
    local config_exists=$1
    if [[ -n $token_file ]]; then
        [[ -z $token ]] || problem "give --token or --token-file, not both"
        if [[ -r $token_file ]]; then
            token=$(tr -d '\r\n' <"$token_file")
            [[ -n $token ]] || problem "--token-file $token_file is empty"
        else
            problem "--token-file $token_file cannot be read"
        fi
    fi
    if ((config_exists)); then
        local ignored=()
        [[ -z $collector ]] || ignored+=(--collector)
        [[ -z $fingerprint ]] || ignored+=(--fingerprint)
        [[ -z $token ]] || ignored+=(--token)
        [[ -z $agent_id ]] || ignored+=(--agent-id)
        ((${#ignored[@]} == 0)) ||
            say "keeping the existing $CONFIG_PATH and $TOKEN_PATH: ${ignored[*]} not applied (edit the files, or --uninstall first)"
    else
        if [[ -z $collector ]]; then
            problem "--collector is missing: the collector's QUIC address, e.g. --collector collector.example.com:4433"
        else
            check_host_port --collector "$collector"
        fi
        local digits=${fingerprint//:/}
        if [[ -z $fingerprint ]]; then
            problem "--fingerprint is missing: the SHA-256 of the collector's certificate (the collector prints it at start; or openssl x509 -in collector.pem -noout -fingerprint -sha256)"
        elif [[ ! $digits =~ ^[0-9A-Fa-f]{64}$ ]]; then
            problem "--fingerprint \`$fingerprint\` is not a SHA-256 fingerprint: expected 64 hex digits (':' separators allowed), got ${#digits}"
        fi
        if [[ -z $token ]]; then
            problem "--token or --token-file is missing: create one with \`tributary-collector token add AGENT_ID\` on the collector"
        elif [[ $token =~ [[:space:]] || ${#token} -gt 512 ]]; then
            problem "the token must be 1-512 characters without spaces or line breaks"
        fi
        if [[ -z $agent_id ]]; then
            agent_id=$(hostname 2>/dev/null || echo gateway)
            agent_id=${agent_id//[^A-Za-z0-9_.-]/-}
            agent_id=${agent_id:0:64}
        fi
        [[ $agent_id =~ ^[A-Za-z0-9_.-]{1,64}$ ]] ||
            problem "--agent-id \`$agent_id\` is not valid: use 1-64 characters of A-Z a-z 0-9 _ - ."
        [[ -z $server_name || $server_name =~ ^[A-Za-z0-9.-]+$ ]] ||
            problem "--server-name \`$server_name\` is not a DNS name"
        check_host_port --mqtt-broker "$mqtt_broker"
    fi

    if [[ -z $binary ]]; then
        binary=$SCRIPT_DIR/tributary-agent
        [[ -e $binary ]] || problem "no tributary-agent binary next to the script ($binary): give --binary PATH (build: cargo build --release -p tributary-agent)"
    fi
    if [[ -e $binary ]]; then
        if [[ ! -f $binary || ! -x $binary ]]; then
            problem "--binary $binary is not an executable file"
        elif ! version=$("$binary" --version 2>&1) || [[ $version != tributary-agent* ]]; then
            problem "--binary $binary does not run as tributary-agent here (\`--version\` said: ${version:-nothing}); is it built for this CPU?"
        fi
    elif [[ -n $binary && $binary != "$SCRIPT_DIR/tributary-agent" ]]; then
        problem "--binary $binary does not exist"
    fi

    if [[ -z $unit_source ]]; then
        local candidate
        for candidate in "$SCRIPT_DIR/$UNIT_NAME" "$SCRIPT_DIR/../systemd/$UNIT_NAME"; do
            if [[ -f $candidate ]]; then unit_source=$candidate; break; fi
        done
        [[ -n $unit_source ]] || problem "no $UNIT_NAME next to the script or in ../systemd/: give --unit PATH"
    elif [[ ! -f $unit_source ]]; then
        problem "--unit $unit_source does not exist"
    fi

    if ((${#problems[@]} > 0)); then
        echo "install.sh: ERROR: nothing was installed; ${#problems[@]} problem(s):" >&2
        local line
        for line in "${problems[@]}"; do echo "  - $line" >&2; done
        exit 2
    fi
}

# ---------------------------------------------------------------------------------------------
# Install

write_config() {
    local path=$1 server_line=
    [[ -z $server_name ]] || server_line="server_name = \"$server_name\""
    cat >"$path" <<EOF
# Tributary agent configuration, written by deploy/edge/install.sh. Every field is explained in
# agent.example.toml (shipped with the agent); check edits with
#   tributary-agent check-config --config $CONFIG_PATH
# and apply them with: systemctl restart tributary-agent
agent_id = "$agent_id"

[collector]
address = "$collector"
$server_line
cert_fingerprint_sha256 = "$fingerprint"
token_file = "$TOKEN_PATH"

[buffer]
path = "$STATE_DIR/buffer"
# Keep well below the free space of the data partition; the oldest raw readings go first.
max_buffer_bytes = 268435456

[metrics]
listen_address = "127.0.0.1:9464"

[[sources]]
name = "gateway-broker"

[sources.mqtt_subscribe]
broker_address = "$mqtt_broker"
client_id = "tributary-$agent_id"
qos = 1

[[sources.mqtt_subscribe.topics]]
template = "sensors/{device}/{metric}"
payload = { format = "plain" }
EOF
}

# Writes a file atomically with mode and owner: a reader never sees half of it.
install_file() {
    local source=$1 destination=$2 mode=$3 owner=$4 group=$5 temporary
    temporary=$(mktemp "$(dirname "$destination")/.install.XXXXXX")
    cat "$source" >"$temporary"
    chmod "$mode" "$temporary"
    set_owner "$owner" "$group" "$temporary"
    mv -f "$temporary" "$destination"
}

make_directory() {
    local path=$1 mode=$2 owner=$3 group=$4
    mkdir -p "$path"
    chmod "$mode" "$path"
    set_owner "$owner" "$group" "$path"
}

systemd_version() { systemctl --version 2>/dev/null | sed -n '1s/^systemd \([0-9]*\).*/\1/p'; }

install_agent() {
    local config_exists=0
    [[ -f $(target "$CONFIG_PATH") ]] && config_exists=1
    check_install_inputs "$config_exists"

    ensure_user
    make_directory "$(target /usr/local/bin)" 0755 root root
    make_directory "$(target "$CONFIG_DIR")" 0750 root "$USER_NAME"
    make_directory "$(target "$STATE_DIR")" 0750 "$USER_NAME" "$USER_NAME"
    make_directory "$(target /etc/systemd/system)" 0755 root root

    install_file "$binary" "$(target "$BIN_PATH")" 0755 root root
    say "installed $BIN_PATH ($("$binary" --version))"

    if ((config_exists)); then
        say "kept the existing $CONFIG_PATH"
    else
        local scratch
        scratch=$(mktemp)
        write_config "$scratch"
        install_file "$scratch" "$(target "$CONFIG_PATH")" 0640 root "$USER_NAME"
        printf '%s\n' "$token" >"$scratch"
        install_file "$scratch" "$(target "$TOKEN_PATH")" 0640 root "$USER_NAME"
        rm -f "$scratch"
        say "wrote $CONFIG_PATH (agent_id $agent_id, collector $collector) and $TOKEN_PATH"
    fi
    # The installed config must be usable before a service is pointed at it.
    local check
    if ! check=$("$binary" check-config --config "$(target "$CONFIG_PATH")" 2>&1); then
        die "$CONFIG_PATH does not pass check-config; fix it and run the script again:
$check"
    fi

    local unit_text
    unit_text=$(sed "s#$PACKAGE_BIN_PATH#$BIN_PATH#g" "$unit_source")
    install_file <(printf '%s\n' "$unit_text") "$(target "$UNIT_PATH")" 0644 root root
    # The restart backoff needs systemd >= 254; older versions would warn about unknown keys.
    local dropin_source version
    dropin_source=$(dirname "$unit_source")/$UNIT_NAME.d/restart-backoff.conf
    version=$(systemd_version)
    if [[ -f $dropin_source && -n $version ]] && ((version >= 254)); then
        make_directory "$(target "$DROPIN_DIR")" 0755 root root
        install_file "$dropin_source" "$(target "$DROPIN_DIR")/restart-backoff.conf" 0644 root root
    fi
    say "installed $UNIT_PATH"

    if systemd_running; then
        systemctl daemon-reload
        systemctl enable "$UNIT_NAME" >/dev/null
        if ((start)); then
            systemctl restart "$UNIT_NAME"
            say "started $UNIT_NAME; follow it with: journalctl -u tributary-agent -f"
        else
            say "enabled $UNIT_NAME (not started: --no-start)"
        fi
    else
        # What `systemctl enable` does, done by hand so it works in an offline root.
        mkdir -p "$(dirname "$(target "$WANTS_LINK")")"
        ln -sfn "$UNIT_PATH" "$(target "$WANTS_LINK")"
        say "enabled $UNIT_NAME in $root (systemd is not running it here; it starts at the next boot)"
    fi
    say "done"
}

# ---------------------------------------------------------------------------------------------
# Uninstall

remove() {
    local path
    path=$(target "$1")
    if [[ -e $path || -L $path ]]; then
        rm -rf "$path"
        say "removed $1"
    fi
}

uninstall_agent() {
    if systemd_running && systemctl list-unit-files "$UNIT_NAME" >/dev/null 2>&1; then
        systemctl disable --now "$UNIT_NAME" >/dev/null 2>&1 || true
    fi
    remove "$WANTS_LINK"
    remove "$DROPIN_DIR"
    remove "$UNIT_PATH"
    systemd_running && systemctl daemon-reload
    remove "$BIN_PATH"
    remove "$CONFIG_PATH"
    remove "$TOKEN_PATH"
    local config_dir
    config_dir=$(target "$CONFIG_DIR")
    if [[ -d $config_dir ]]; then
        if rmdir "$config_dir" 2>/dev/null; then
            say "removed $CONFIG_DIR"
        else
            say "kept $CONFIG_DIR: it holds files this script did not install ($(ls -A "$config_dir" | tr '\n' ' '))"
        fi
    fi
    if ((purge)); then
        remove "$STATE_DIR"
        if is_root_user && user_exists; then
            userdel "${root_option[@]}" "$USER_NAME" || die "userdel $USER_NAME failed (see above)"
            # userdel leaves the user's group where login.defs lacks USERGROUPS_ENAB.
            if group_exists "$USER_NAME"; then
                groupdel "${root_option[@]}" "$USER_NAME" || die "groupdel $USER_NAME failed (see above)"
            fi
            say "removed user $USER_NAME"
        fi
    elif [[ -d $(target "$STATE_DIR") ]]; then
        say "kept the buffered data in $STATE_DIR and the user $USER_NAME that owns it (--uninstall --purge removes both)"
    fi
    say "uninstalled"
}

case $mode in
    install) install_agent ;;
    uninstall) uninstall_agent ;;
esac
