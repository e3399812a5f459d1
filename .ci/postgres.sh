#!/usr/bin/env bash
# A local PostgreSQL for the tests that need one (tests/test_load.py runs the MLflow load test on it).
#
#   export ICH_TEST_POSTGRES_URI="$(.ci/postgres.sh)"        # port 5432
#   ICH_PG_PORT=55432 .ci/postgres.sh                         # another port (its own cluster)
#
# Installs PostgreSQL from Debian's packages when missing (root only), starts a cluster that listens on
# 127.0.0.1 only, and makes sure a login role `ich` (password `ich`, may create databases) owns a
# database `ich`. Prints the DSN as the only line on stdout; progress goes to stderr. Idempotent: when
# the server already answers with these credentials it only prints the DSN (well under a second).
#
# As root it uses Debian's cluster tools (pg_ctlcluster, run as the postgres user): port 5432 is the
# packaged `main` cluster, another port gets a cluster named `ich<port>`. As another user, with the
# binaries installed, it runs its own cluster with initdb/pg_ctl under $ICH_PG_DIR (default
# ~/.ich-pg/<port>). The password is a throwaway for a test database on the loopback interface.
set -euo pipefail

PORT="${ICH_PG_PORT:-5432}"
ROLE=ich
PASSWORD=ich
DB=ich
HOST=127.0.0.1
DSN="postgresql://${ROLE}:${PASSWORD}@${HOST}:${PORT}/${DB}"

say() { echo "postgres.sh: $*" >&2; }
die() { say "error: $*"; exit 1; }

answers() {  # the server is up and our role can log in to our database
    PGPASSWORD="$PASSWORD" PGCONNECT_TIMEOUT=3 psql -X -q -h "$HOST" -p "$PORT" -U "$ROLE" -d "$DB" \
        -tAc 'select 1' >/dev/null 2>&1
}

if command -v psql >/dev/null 2>&1 && answers; then
    echo "$DSN"
    exit 0
fi

pg_bindir() {
    local v
    v="$(ls -1 /usr/lib/postgresql 2>/dev/null | sort -V | tail -n 1)"
    if [[ -n "$v" && -x "/usr/lib/postgresql/$v/bin/postgres" ]]; then
        echo "/usr/lib/postgresql/$v/bin"
    elif command -v pg_ctl >/dev/null 2>&1 && command -v initdb >/dev/null 2>&1; then
        dirname "$(command -v pg_ctl)"
    fi
}

if [[ -z "$(pg_bindir)" ]] || ! command -v psql >/dev/null 2>&1; then
    [[ "$(id -u)" == 0 ]] || die "PostgreSQL is not installed and installing it needs root (apt-get install postgresql)"
    command -v apt-get >/dev/null 2>&1 || die "PostgreSQL is not installed and there is no apt-get to install it"
    say "installing PostgreSQL from Debian's packages"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq >&2
    apt-get install -y -qq postgresql >&2
fi
BINDIR="$(pg_bindir)"
[[ -n "$BINDIR" ]] || die "no PostgreSQL server binaries found after installing"

wait_ready() {
    for _ in $(seq 1 60); do
        "$BINDIR/pg_isready" -q -h "$HOST" -p "$PORT" && return 0
        sleep 0.5
    done
    die "PostgreSQL on $HOST:$PORT did not become ready within 30 s"
}

if [[ "$(id -u)" == 0 ]] && command -v pg_ctlcluster >/dev/null 2>&1; then
    VERSION="$(basename "$(dirname "$BINDIR")")"
    CLUSTER=main
    [[ "$PORT" == 5432 ]] || CLUSTER="ich${PORT}"
    if ! pg_lsclusters -h 2>/dev/null | awk -v v="$VERSION" -v c="$CLUSTER" '$1==v && $2==c {f=1} END {exit !f}'; then
        say "creating cluster $VERSION/$CLUSTER on port $PORT"
        pg_createcluster "$VERSION" "$CLUSTER" -p "$PORT" >&2
    fi
    CONF_PORT="$(pg_conftool -s "$VERSION" "$CLUSTER" show port 2>/dev/null || echo "$PORT")"
    [[ "$CONF_PORT" == "$PORT" ]] || die "cluster $VERSION/$CLUSTER is configured for port $CONF_PORT, not $PORT"
    # Loopback only, whatever the packaged default says (a conf.d file: the packaged config stays as is).
    CONF_D="/etc/postgresql/$VERSION/$CLUSTER/conf.d"
    WANT="listen_addresses = '$HOST'"
    if [[ "$(cat "$CONF_D/ich-loopback.conf" 2>/dev/null)" != "$WANT" ]]; then
        mkdir -p "$CONF_D"
        echo "$WANT" > "$CONF_D/ich-loopback.conf"
        if pg_ctlcluster "$VERSION" "$CLUSTER" status >/dev/null 2>&1; then
            say "restarting cluster $VERSION/$CLUSTER to listen on $HOST only"
            pg_ctlcluster "$VERSION" "$CLUSTER" restart >&2
        fi
    fi
    if ! pg_ctlcluster "$VERSION" "$CLUSTER" status >/dev/null 2>&1; then
        say "starting cluster $VERSION/$CLUSTER on $HOST:$PORT"
        pg_ctlcluster "$VERSION" "$CLUSTER" start >&2
    fi
    wait_ready
    as_admin() { (cd / && runuser -u postgres -- psql -X -q -v ON_ERROR_STOP=1 -p "$PORT" -d postgres "$@"); }
else
    DATA="${ICH_PG_DIR:-$HOME/.ich-pg/$PORT}"
    if [[ ! -s "$DATA/PG_VERSION" ]]; then
        say "initdb in $DATA"
        mkdir -p "$DATA"
        "$BINDIR/initdb" -D "$DATA" -U postgres --auth-local=trust --auth-host=scram-sha-256 >&2
    fi
    if ! "$BINDIR/pg_ctl" -D "$DATA" status >/dev/null 2>&1; then
        say "starting PostgreSQL in $DATA on $HOST:$PORT"
        "$BINDIR/pg_ctl" -D "$DATA" -l "$DATA/server.log" -w \
            -o "-c listen_addresses=$HOST -p $PORT -k $DATA" start >&2
    fi
    wait_ready
    as_admin() { psql -X -q -v ON_ERROR_STOP=1 -h "$DATA" -p "$PORT" -U postgres -d postgres "$@"; }
fi

# Role and database, created once; the password is (re)set so a changed one cannot lock the tests out.
as_admin <<SQL >&2
DO \$\$
BEGIN
    IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = '${ROLE}') THEN
        CREATE ROLE ${ROLE} LOGIN CREATEDB PASSWORD '${PASSWORD}';
    ELSE
        ALTER ROLE ${ROLE} LOGIN CREATEDB PASSWORD '${PASSWORD}';
    END IF;
END
\$\$;
SQL
if [[ "$(as_admin -tAc "SELECT 1 FROM pg_database WHERE datname = '${DB}'" </dev/null)" != 1 ]]; then
    as_admin -c "CREATE DATABASE ${DB} OWNER ${ROLE}" </dev/null >&2
fi

answers || die "PostgreSQL on $HOST:$PORT is up but $ROLE cannot log in to $DB (check pg_hba.conf)"
say "ready: $DSN"
echo "$DSN"
