# shellcheck shell=bash
# Shared functions for scripts/dev and scripts/test. Source it; do not run it.
#
# Everything here is idempotent: each ensure_* function first checks whether
# its job is already done and only acts when it is not, so re-running the
# scripts on a prepared machine is quick and changes nothing.

# --- constants (local development layout, matching config.toml) ------------

PAYD_ROOT=${PAYD_ROOT:-$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)}
VENV_DIR="$PAYD_ROOT/.venv"
VENV_MARKER="$VENV_DIR/.payd-installed"
SECRETS_DIR="$PAYD_ROOT/.secrets"
# shellcheck disable=SC2034  # used by scripts/dev
RUN_DIR="$PAYD_ROOT/.run"

MYSQL_HOST=127.0.0.1
MYSQL_PORT=3306
MYSQL_USER=payd
# payd: the daemon; payd_test: the test suite; payd_bench: load/ benchmarks.
MYSQL_DATABASES=(payd payd_test payd_bench)
RABBITMQ_HOST=127.0.0.1
RABBITMQ_PORT=5672
RABBITMQ_USER=payd
RABBITMQ_VHOST=/
REDIS_HOST=127.0.0.1
REDIS_PORT=6379

# Secrets generated for local development (redis_password is optional and
# not generated: the local Redis runs without a password).
DEV_SECRETS=(mysql_password rabbitmq_password control_token)

# --- output ----------------------------------------------------------------

if [[ -t 1 && -z ${NO_COLOR:-} ]]; then
    _BOLD=$'\e[1m' _RED=$'\e[31m' _YELLOW=$'\e[33m' _RESET=$'\e[0m'
else
    _BOLD='' _RED='' _YELLOW='' _RESET=''
fi

# log MESSAGE... : a progress line.
log() { printf '%s==>%s %s\n' "$_BOLD" "$_RESET" "$*"; }

# note MESSAGE... : an indented detail line under the last progress line.
note() { printf '    %s\n' "$*"; }

# warn MESSAGE... : something is off but we carry on.
warn() { printf '%swarning:%s %s\n' "$_YELLOW" "$_RESET" "$*" >&2; }

# die MESSAGE [HINT...] : print the error and what to do about it, exit 1.
die() {
    printf '%serror:%s %s\n' "$_RED$_BOLD" "$_RESET" "$1" >&2
    shift
    local line
    for line in "$@"; do
        printf '       %s\n' "$line" >&2
    done
    exit 1
}

# Report unexpected failures (set -e exits) with their location instead of
# exiting silently. Callers enable it with: trap on_unexpected_error ERR
on_unexpected_error() {
    local rc=$?
    printf '%serror:%s unexpected failure (exit %s) at %s line %s: %s\n' \
        "$_RED$_BOLD" "$_RESET" "$rc" "${BASH_SOURCE[1]:-?}" "${BASH_LINENO[0]:-?}" \
        "$BASH_COMMAND" >&2
    exit "$rc"
}

# --- privileges, packages, init system -------------------------------------

# as_root CMD... : run CMD as root (directly when we are root, else via sudo).
as_root() {
    if [[ $EUID -eq 0 ]]; then
        "$@"
    elif command -v sudo >/dev/null 2>&1; then
        sudo "$@"
    else
        die "'$*' needs root and sudo is not installed" \
            "re-run this script as root, or install sudo"
    fi
}

have_apt() { command -v apt-get >/dev/null 2>&1; }

# True when systemd is the init system (PID 1), the same test as sd_booted(3).
have_systemd() { [[ -d /run/systemd/system ]]; }

_APT_UPDATED=0

# apt_install PACKAGE... : install Debian packages (apt-get update once per run).
apt_install() {
    have_apt || die "cannot install $* automatically: apt-get not found" \
        "install $* with your system's package manager, then re-run"
    if [[ $_APT_UPDATED -eq 0 ]]; then
        log "apt-get update"
        as_root apt-get update -qq \
            || die "apt-get update failed" "check network access and /etc/apt/sources.list"
        _APT_UPDATED=1
    fi
    log "installing $*"
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >/dev/null \
        || die "apt-get install $* failed" \
            "run: sudo DEBIAN_FRONTEND=noninteractive apt-get install -y $*  to see the full error"
}

# --- readiness -------------------------------------------------------------

# port_open HOST PORT : true when something accepts TCP connections there.
port_open() {
    # shellcheck disable=SC2016  # $1/$2 expand in the inner shell
    timeout 2 bash -c 'exec 3<>"/dev/tcp/$1/$2"' _ "$1" "$2" 2>/dev/null
}

# wait_for NAME TIMEOUT_S CMD... : poll CMD every second until it succeeds;
# print a progress line every 5 s; false on timeout.
wait_for() {
    local name=$1 timeout_s=$2 waited=0
    shift 2
    until "$@" >/dev/null 2>&1; do
        if ((waited >= timeout_s)); then
            return 1
        fi
        if ((waited > 0 && waited % 5 == 0)); then
            note "still waiting for $name (${waited}s of ${timeout_s}s)"
        fi
        sleep 1
        waited=$((waited + 1))
    done
}

# --- Python and the virtual environment ------------------------------------

# ensure_venv : Python >= 3.11, .venv, and payd installed into it with the
# dev and load extras, with the sandbox gateway (sandbox/, payd-sandbox) beside
# it. Reinstalls only when pyproject.toml or sandbox/pyproject.toml changed
# since the last successful install (tracked by $VENV_MARKER).
ensure_venv() {
    local py=${PYTHON:-python3}
    if ! command -v "$py" >/dev/null 2>&1; then
        if [[ $py == python3 ]] && have_apt; then
            apt_install python3
        else
            die "$py not found" "install Python 3.11 or newer (Debian 12: apt-get install python3)"
        fi
    fi
    if ! "$py" -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then
        die "payd needs Python >= 3.11, but $py is $("$py" -c 'import platform; print(platform.python_version())')" \
            "install Python 3.11+ and re-run with PYTHON=/path/to/python3.11 $0"
    fi

    if [[ ! -e $VENV_DIR ]]; then
        # Debian splits venv/ensurepip out of the interpreter package.
        if ! "$py" -c 'import ensurepip, venv' >/dev/null 2>&1; then
            if have_apt && [[ $(command -v "$py") == /usr/bin/* ]]; then
                apt_install python3-venv
            else
                die "$py cannot create virtual environments (module venv/ensurepip missing)" \
                    "install the venv support for $py (Debian/Ubuntu: apt-get install python3-venv)"
            fi
        fi
        log "creating virtual environment .venv ($("$py" -c 'import platform; print(platform.python_version())'))"
        if ! "$py" -m venv "$VENV_DIR"; then
            rm -rf "$VENV_DIR"
            die "python3 -m venv .venv failed" "see the error above; fix it and re-run"
        fi
    fi

    if ! "$VENV_DIR/bin/python" -c 'import sys; sys.exit(sys.version_info < (3, 11))' >/dev/null 2>&1; then
        die ".venv is broken or uses Python < 3.11" "remove it (rm -rf .venv) and re-run"
    fi

    if [[ -f $VENV_MARKER && ! $PAYD_ROOT/pyproject.toml -nt $VENV_MARKER
        && ! $PAYD_ROOT/sandbox/pyproject.toml -nt $VENV_MARKER && -x $VENV_DIR/bin/payd ]]; then
        log "payd already installed in .venv (pyproject.toml unchanged)"
        return
    fi
    # The sandbox gateway is a distribution of its own (the production wheel leaves it
    # out); an extra cannot name it by a relative path, so it is installed here, editable.
    log "installing payd into .venv: pip install -e '.[dev,load]' -e ./sandbox (first time takes a minute)"
    if ! (cd "$PAYD_ROOT" && "$VENV_DIR/bin/python" -m pip install -qq -e '.[dev,load]' -e ./sandbox); then
        rm -f "$VENV_MARKER"
        die "pip install -e '.[dev,load]' -e ./sandbox failed" \
            "see pip's error above (network access? a dependency pin in pyproject.toml?)"
    fi
    touch "$VENV_MARKER"
}

# --- services --------------------------------------------------------------

mariadb_ready() {
    port_open "$MYSQL_HOST" "$MYSQL_PORT"
}

rabbitmq_ready() {
    # The AMQP listener opens last during boot, so the port answering means
    # the node is up; ping as well so rabbitmqctl will work.
    port_open "$RABBITMQ_HOST" "$RABBITMQ_PORT" && as_root rabbitmq-diagnostics -q ping
}

redis_ready() {
    port_open "$REDIS_HOST" "$REDIS_PORT"
}

start_mariadb() {
    if have_systemd; then
        as_root systemctl start mariadb
    else
        if [[ ! -d /run/mysqld ]]; then
            as_root install -d -o mysql -g mysql -m 0755 /run/mysqld
        fi
        # --user=mysql: Debian's stock my.cnf does not set it, and mariadbd
        # refuses to run as root.
        as_root start-stop-daemon --start --oknodo --background \
            --exec /usr/sbin/mariadbd -- --user=mysql
    fi
}

start_rabbitmq() {
    if have_systemd; then
        as_root systemctl start rabbitmq-server
    else
        as_root rabbitmq-server -detached
    fi
}

start_redis() {
    if have_systemd; then
        as_root systemctl start redis-server
    else
        as_root redis-server --daemonize yes --bind 127.0.0.1 --port "$REDIS_PORT" \
            --save "" --appendonly no >/dev/null
    fi
}

# ensure_service NAME PACKAGE BINARY READY_FN START_FN TIMEOUT_S LOG_HINT
ensure_service() {
    local name=$1 package=$2 binary=$3 ready_fn=$4 start_fn=$5 timeout_s=$6 log_hint=$7
    if "$ready_fn" >/dev/null 2>&1; then
        log "$name already running"
        return
    fi
    if [[ ! -x $binary ]]; then
        apt_install "$package"
        # The package's post-install script may have started it.
        if "$ready_fn" >/dev/null 2>&1; then
            log "$name running"
            return
        fi
    fi
    log "starting $name"
    "$start_fn" || die "could not start $name" "look at $log_hint"
    log "waiting for $name to accept connections (up to ${timeout_s}s)"
    wait_for "$name" "$timeout_s" "$ready_fn" \
        || die "$name did not become ready within ${timeout_s}s" "look at $log_hint"
    log "$name running"
}

# ensure_tools : command-line tools the test suite uses (systemd-analyze checks the units).
ensure_tools() {
    # The Redis failover tests run private Sentinels (Debian ships them apart from redis-server).
    if ! command -v redis-sentinel >/dev/null 2>&1; then
        apt_install redis-sentinel
    fi
    # The TLS tests make a throwaway CA and certificates with the openssl command.
    if ! command -v openssl >/dev/null 2>&1; then
        apt_install openssl
    fi
    if command -v systemd-analyze >/dev/null 2>&1; then
        log "systemd-analyze present (unit checks)"
        return
    fi
    have_apt || die "systemd-analyze is missing and apt-get is not available" "install systemd's tools, then re-run"
    log "installing systemd (for systemd-analyze, used to verify the unit files)"
    apt_install systemd
}

ensure_services() {
    local mariadb_hint rabbitmq_hint redis_hint
    if have_systemd; then
        mariadb_hint='journalctl -u mariadb'
        rabbitmq_hint='journalctl -u rabbitmq-server and /var/log/rabbitmq/'
        redis_hint='journalctl -u redis-server and /var/log/redis/'
    else
        mariadb_hint='/var/log/mysql/ if logging is configured, or run /usr/sbin/mariadbd --user=mysql in a terminal to see why it stops'
        rabbitmq_hint='/var/log/rabbitmq/'
        redis_hint='the output above, or run redis-server --port 6379 in a terminal'
    fi
    ensure_service MariaDB mariadb-server /usr/sbin/mariadbd mariadb_ready start_mariadb 60 "$mariadb_hint"
    ensure_service RabbitMQ rabbitmq-server /usr/sbin/rabbitmq-server rabbitmq_ready start_rabbitmq 90 "$rabbitmq_hint"
    ensure_service Redis redis-server /usr/bin/redis-server redis_ready start_redis 30 "$redis_hint"
}

# --- secrets ---------------------------------------------------------------

# ensure_secrets : .secrets/ (mode 700) with one file per secret (mode 600),
# random values generated once. Values are never printed.
ensure_secrets() {
    local name file created=()
    if [[ ! -d $SECRETS_DIR ]]; then
        (umask 077 && mkdir "$SECRETS_DIR")
    fi
    [[ $(stat -c %a "$SECRETS_DIR") == 700 ]] || chmod 700 "$SECRETS_DIR"
    for name in "${DEV_SECRETS[@]}"; do
        file="$SECRETS_DIR/$name"
        if [[ ! -s $file ]]; then
            # No trailing newline: the same shape as a systemd credential file.
            (umask 077 && "$VENV_DIR/bin/python" -c \
                'import secrets, sys; sys.stdout.write(secrets.token_hex(24))' >"$file")
            created+=("$name")
        fi
        [[ $(stat -c %a "$file") == 600 ]] || chmod 600 "$file"
    done
    if ((${#created[@]})); then
        log "generated .secrets/{$(IFS=,; echo "${created[*]}")}"
    else
        log "secrets already in .secrets/"
    fi
}

# secret NAME : print a secret's value (for piping into tools, never to a terminal).
secret() {
    local value
    value=$(<"$SECRETS_DIR/$1")
    printf '%s' "$value"
}

# --- MySQL -----------------------------------------------------------------

MYSQL_CLIENT=''

# require_mysql_client : set MYSQL_CLIENT to the mariadb (or mysql) client.
require_mysql_client() {
    if command -v mariadb >/dev/null 2>&1; then
        MYSQL_CLIENT=mariadb
    elif command -v mysql >/dev/null 2>&1; then
        MYSQL_CLIENT=mysql
    else
        die "neither the mariadb nor the mysql client is installed" \
            "install mariadb-client (Debian: apt-get install mariadb-client)"
    fi
}

# _sql_quote VALUE : VALUE as a single-quoted SQL string literal.
_sql_quote() {
    local v=${1//\\/\\\\}
    printf "'%s'" "${v//\'/\'\'}"
}

# mysql_as_payd SQL : run SQL over TCP as the payd user. The password goes
# through an option file on a pipe, never on a command line.
mysql_as_payd() {
    "$MYSQL_CLIENT" --defaults-extra-file=<(printf '[client]\npassword=%s\n' "$(secret mysql_password)") \
        --protocol=tcp -h "$MYSQL_HOST" -P "$MYSQL_PORT" -u "$MYSQL_USER" \
        --batch --skip-column-names -e "$1"
}

# ensure_mysql : the databases in MYSQL_DATABASES, user payd@localhost and
# payd@127.0.0.1 with the password from .secrets/mysql_password and all
# privileges on both databases. Uses the local root account (unix socket)
# only when the payd user cannot already reach both databases.
ensure_mysql() {
    local db probe='' sql host pw
    require_mysql_client
    for db in "${MYSQL_DATABASES[@]}"; do
        probe+="USE \`$db\`; "
    done
    if mysql_as_payd "$probe" >/dev/null 2>&1; then
        log "MySQL user $MYSQL_USER already reaches databases ${MYSQL_DATABASES[*]}"
        return
    fi
    log "creating/updating MySQL databases ${MYSQL_DATABASES[*]} and user $MYSQL_USER (as root via the local socket)"
    pw=$(_sql_quote "$(secret mysql_password)")
    sql=''
    for db in "${MYSQL_DATABASES[@]}"; do
        sql+="CREATE DATABASE IF NOT EXISTS \`$db\` CHARACTER SET utf8mb4;"$'\n'
    done
    for host in localhost 127.0.0.1; do
        sql+="CREATE USER IF NOT EXISTS '$MYSQL_USER'@'$host' IDENTIFIED BY $pw;"$'\n'
        sql+="ALTER USER '$MYSQL_USER'@'$host' IDENTIFIED BY $pw;"$'\n'
        for db in "${MYSQL_DATABASES[@]}"; do
            sql+="GRANT ALL PRIVILEGES ON \`$db\`.* TO '$MYSQL_USER'@'$host';"$'\n'
        done
    done
    # SQL (with the password) on stdin, not on the command line.
    if ! printf '%s' "$sql" | as_root "$MYSQL_CLIENT" -uroot; then
        die "could not set up MySQL as root through the local socket ($MYSQL_CLIENT -uroot)" \
            "if your root account needs a password, run these statements yourself as an admin:" \
            "  CREATE DATABASE IF NOT EXISTS <each of: ${MYSQL_DATABASES[*]}>;" \
            "  CREATE USER 'payd'@'localhost' IDENTIFIED BY '<contents of .secrets/mysql_password>';" \
            "  CREATE USER 'payd'@'127.0.0.1' IDENTIFIED BY '<same>';" \
            "  GRANT ALL ON <each database>.* TO both users;  then re-run"
    fi
    mysql_as_payd "$probe" >/dev/null \
        || die "MySQL user $MYSQL_USER still cannot reach ${MYSQL_DATABASES[*]} over TCP $MYSQL_HOST:$MYSQL_PORT" \
            "check that the server on port $MYSQL_PORT is the local one and allows TCP logins"
}

# --- RabbitMQ --------------------------------------------------------------

_rabbitmq_permissions_ok() {
    local line
    while IFS=$'\t' read -r -a line; do
        if [[ ${line[0]:-} == "$RABBITMQ_VHOST" && ${line[1]:-} == '.*' \
            && ${line[2]:-} == '.*' && ${line[3]:-} == '.*' ]]; then
            return 0
        fi
    done < <(as_root rabbitmqctl -q -s list_user_permissions "$RABBITMQ_USER" 2>/dev/null)
    return 1
}

# ensure_rabbitmq : user payd with the password from .secrets/rabbitmq_password
# and configure/write/read permissions on the default vhost. Passwords go to
# rabbitmqctl on stdin, never on its command line.
ensure_rabbitmq() {
    command -v rabbitmqctl >/dev/null 2>&1 || as_root test -x /usr/sbin/rabbitmqctl \
        || die "rabbitmqctl not found" "install rabbitmq-server (Debian: apt-get install rabbitmq-server)"
    local changed=0
    if secret rabbitmq_password | as_root rabbitmqctl -q authenticate_user "$RABBITMQ_USER" >/dev/null 2>&1; then
        :
    elif as_root rabbitmqctl -q -s list_users 2>/dev/null | cut -f1 | grep -qx "$RABBITMQ_USER"; then
        log "RabbitMQ: updating the password of user $RABBITMQ_USER to match .secrets/rabbitmq_password"
        secret rabbitmq_password | as_root rabbitmqctl -q change_password "$RABBITMQ_USER" >/dev/null \
            || die "rabbitmqctl change_password $RABBITMQ_USER failed" "see the error above"
        changed=1
    else
        log "RabbitMQ: creating user $RABBITMQ_USER"
        secret rabbitmq_password | as_root rabbitmqctl -q add_user "$RABBITMQ_USER" >/dev/null \
            || die "rabbitmqctl add_user $RABBITMQ_USER failed" \
                "is the node running and is this root (rabbitmqctl needs the Erlang cookie)?"
        changed=1
    fi
    if ! _rabbitmq_permissions_ok; then
        log "RabbitMQ: granting $RABBITMQ_USER '.*' '.*' '.*' on vhost $RABBITMQ_VHOST"
        as_root rabbitmqctl -q set_permissions -p "$RABBITMQ_VHOST" "$RABBITMQ_USER" '.*' '.*' '.*' >/dev/null \
            || die "rabbitmqctl set_permissions failed" "see the error above"
        changed=1
    fi
    secret rabbitmq_password | as_root rabbitmqctl -q authenticate_user "$RABBITMQ_USER" >/dev/null 2>&1 \
        || die "RabbitMQ user $RABBITMQ_USER cannot authenticate with .secrets/rabbitmq_password" \
            "check rabbitmqctl list_users; delete the user (rabbitmqctl delete_user payd) and re-run"
    if ((changed == 0)); then
        log "RabbitMQ user $RABBITMQ_USER already set up on vhost $RABBITMQ_VHOST"
    fi
}
