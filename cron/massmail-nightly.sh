#!/usr/bin/env bash
# Nightly run for cron: one campaign per day, one log file per day, never two runs at once.
#
# Usage: massmail-nightly.sh [batch.run options...]
# The campaign is nightly-YYYY-MM-DD, named after the date: a rerun the same day resumes it,
# the next day starts a new one. Everything goes to LOG_DIR/massmail-YYYY-MM-DD.log; only a
# run that does not end with 0 prints a line, so cron mails only then. Exits with batch.run's
# code (see --help), 3 when another nightly run holds the lock, 2 when this script is set up
# wrong.
#
# Settings from the environment (a crontab may set them), with their defaults:
#   MASSMAIL_CONFIG    config/massmail.toml     batch.run's settings: list, template, relay...
#   MASSMAIL_LOG_DIR   logs                     the daily log files and the lock
#   MASSMAIL_DATE      today, from date +%F     the date in the campaign's and the log's name
#   MASSMAIL_CAMPAIGN  nightly-<date>           another campaign name, for a one-off run
# Relative paths are taken from the project folder, where the job runs. Any other
# MASSMAIL_<OPTION> reaches batch.run as it is, and wins over the config file.
set -euo pipefail

# Exit codes of this script's own; every other code is batch.run's.
EXIT_SETUP=2
EXIT_LOCKED=3

fail() {
    echo "massmail-nightly: $2" >&2
    exit "$1"
}

# The project is found from this file, whatever folder cron starts in.
root="$(cd "$(dirname "$(readlink -f "${BASH_SOURCE[0]}")")/.." && pwd)"
cd "$root"

today="${MASSMAIL_DATE:-$(date +%F)}"
if [[ ! $today =~ ^[0-9]{4}-[0-9]{2}-[0-9]{2}$ ]] ||
    [[ $(date -d "$today" +%F 2>/dev/null) != "$today" ]]; then
    fail $EXIT_SETUP "MASSMAIL_DATE=$today is not a date such as 2026-12-03"
fi
campaign="${MASSMAIL_CAMPAIGN:-nightly-$today}"

# batch.run reads MASSMAIL_CONFIG itself; a --config flag here would override the caller's.
config="${MASSMAIL_CONFIG:-config/massmail.toml}"
[[ $config == /* ]] || config="$root/$config"
export MASSMAIL_CONFIG="$config"

log_dir="${MASSMAIL_LOG_DIR:-logs}"
mkdir -p "$log_dir" 2>/dev/null || fail $EXIT_SETUP "cannot create the log folder $log_dir"
log_dir="$(cd "$log_dir" && pwd)"
log="$log_dir/massmail-$today.log"
: 2>/dev/null >>"$log" || fail $EXIT_SETUP "cannot write the log $log"

[[ -x .venv/bin/python ]] ||
    fail $EXIT_SETUP "no $root/.venv; create it with: bash -c 'source scripts/env'"
command -v flock >/dev/null || fail $EXIT_SETUP "flock is missing (it comes with util-linux)"

# Yesterday's run may still be going under another campaign name, which batch.run's own
# per-campaign lock would not catch; this lock covers every nightly run that logs to
# log_dir. batch.run inherits the descriptor, so the lock lasts as long as the run does,
# even if this shell is killed.
exec 9>>"$log_dir/massmail-nightly.lock"
if ! flock -n 9; then
    echo "$(date -Is) campaign=$campaign not started: another nightly run is active" >>"$log"
    fail $EXIT_LOCKED "another nightly run is active; campaign $campaign not started"
fi

# A stop signal to the whole process group (a shutdown, Ctrl-C) reaches batch.run too, which
# finishes the messages in hand and ends with 75. The trap makes this shell wait for that
# and still log the exit code, instead of dying first.
trap ':' TERM INT HUP
echo "$(date -Is) campaign=$campaign config=$config start" >>"$log"
rc=0
.venv/bin/python -m batch.run --campaign "$campaign" "$@" </dev/null >>"$log" 2>&1 || rc=$?
echo "$(date -Is) campaign=$campaign exit=$rc" >>"$log"

# The one line cron mails.
case $rc in
    0) exit 0 ;;
    1) meaning="some recipients failed or are in doubt: see the sent-log" ;;
    2) meaning="a usage, configuration, list or template error: nothing was sent" ;;
    3) meaning="another run of this campaign is active" ;;
    75) meaning="broker or relay unreachable, or the run was stopped: rerun to resume" ;;
    *) meaning="an unexpected error: read the log" ;;
esac
echo "massmail-nightly: campaign $campaign ended with exit $rc ($meaning); log: $log" >&2
exit "$rc"
