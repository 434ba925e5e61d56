#!/usr/bin/env bash
# Everything the test suite needs besides the venv, then the command given (normally pytest):
#
#   scripts/test-deps.sh .venv/bin/python -m pytest -q
#
# * Debian's chromium (the browser test drives /usr/bin/chromium; Playwright's own browser
#   download does not work offline) and dcmtk (dcmdump checks the served DICOM files), installed
#   when missing;
# * a throw-away PostgreSQL cluster on 127.0.0.1 for tests/test_registry_postgres.py (initdb in a
#   temporary folder, a free port, stopped and deleted when the command ends), unless
#   MEDSR_TEST_POSTGRES_URL already names a server.
#
# `make test` and .ci/run both come through here, so a README user gets exactly what CI gets.
# A step that needs root, run by someone who is not root, stops with the one command to run.
# The command's exit status is passed on (pytest's 5, "no tests collected", fails too).
set -euo pipefail

say() { printf 'test-deps: %s\n' "$*" >&2; }

as_root() {  # as_root CMD...: run as root, or stop with the command a user should run
  if [ "$(id -u)" -eq 0 ]; then
    "$@"
  else
    say "needs root: run   sudo $*   then run this again"
    exit 1
  fi
}

apt_install() {  # apt_install PACKAGE...: one apt-get run, waiting for a concurrent apt's lock
  local lock=(-o DPkg::Lock::Timeout=600)
  if [ "$(id -u)" -ne 0 ]; then
    say "needs root: run   sudo apt-get update && sudo apt-get install -y $*   then run this again"
    exit 1
  fi
  say "installing $* from Debian"
  apt-get "${lock[@]}" update -qq
  DEBIAN_FRONTEND=noninteractive apt-get "${lock[@]}" install -y -qq --no-install-recommends "$@" >/dev/null
}

# --- Debian packages ---------------------------------------------------------------------------
missing=()
[ -x /usr/bin/chromium ] || missing+=(chromium)
command -v dcmdump >/dev/null 2>&1 || missing+=(dcmtk)
pg_bin=""
if [ -z "${MEDSR_TEST_POSTGRES_URL:-}" ]; then
  pg_bin=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1 || true)
  if [ -z "$pg_bin" ] && command -v initdb >/dev/null 2>&1; then pg_bin=$(dirname "$(command -v initdb)"); fi
  # The suite's cluster is its own (below); Debian's package only provides the binaries here.
  [ -n "$pg_bin" ] || missing+=(postgresql)
fi
if [ ${#missing[@]} -gt 0 ]; then
  apt_install "${missing[@]}"
fi

if [ $# -eq 0 ]; then
  say "ready (no command given)"
  exit 0
fi

# --- throw-away PostgreSQL ---------------------------------------------------------------------
if [ -z "${MEDSR_TEST_POSTGRES_URL:-}" ]; then
  [ -n "$pg_bin" ] || pg_bin=$(ls -d /usr/lib/postgresql/*/bin | sort -V | tail -n 1)
  pg_dir=$(mktemp -d "${TMPDIR:-/tmp}/medsr-pg.XXXXXX")
  run_pg() { "$@"; }
  if [ "$(id -u)" -eq 0 ]; then
    # initdb and postgres refuse to run as root: the cluster belongs to the postgres account.
    id postgres >/dev/null 2>&1 || as_root useradd --system --home-dir /var/lib/postgresql --shell /bin/sh postgres
    chown postgres "$pg_dir"
    run_pg() { (cd "$pg_dir" && runuser -u postgres -- "$@"); }  # from a folder the account can read
  fi
  stop_pg() {
    run_pg "$pg_bin/pg_ctl" -D "$pg_dir/data" -m fast -w stop >/dev/null 2>&1 || true
    rm -rf "$pg_dir"
  }
  trap stop_pg EXIT
  port=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
  printf 'medsr\n' > "$pg_dir/pw"
  chmod 644 "$pg_dir/pw"
  run_pg "$pg_bin/initdb" -D "$pg_dir/data" -U medsr --pwfile="$pg_dir/pw" -A scram-sha-256 --no-sync >"$pg_dir/initdb.log" 2>&1 \
    || { say "initdb failed: $(tail -n 1 "$pg_dir/initdb.log")"; exit 1; }
  run_pg "$pg_bin/pg_ctl" -D "$pg_dir/data" -l "$pg_dir/server.log" -w -t 60 \
    -o "-c listen_addresses=127.0.0.1 -p $port -k $pg_dir -c fsync=off" start >/dev/null \
    || { say "PostgreSQL did not start: $(tail -n 1 "$pg_dir/server.log")"; exit 1; }
  export MEDSR_TEST_POSTGRES_URL="postgresql://medsr:medsr@127.0.0.1:$port/postgres"
  say "throw-away PostgreSQL on 127.0.0.1:$port (removed afterwards)"
fi

# Not exec: the trap above must stop the cluster when the command ends.
set +e
"$@"
status=$?
set -e
if [ "$status" -eq 5 ]; then
  say "pytest collected no tests (exit 5): failing"
fi
exit "$status"
