#!/usr/bin/env bash
# Nightly run for cron: one campaign per day, one log file per day, never two runs at once.
#
# Usage: massmail-nightly.sh [batch.run options...]
# The campaign is nightly-YYYY-MM-DD unless MASSMAIL_CAMPAIGN is set. Output goes to
# logs/massmail-YYYY-MM-DD.log; only a run that does not end with 0 prints a line, so cron
# mails only then. Exits with batch.run's code, or 3 when another nightly run holds the lock.
set -euo pipefail

root="$(cd "$(dirname "$(readlink -f "${BASH_SOURCE[0]}")")/.." && pwd)"
cd "$root"

today="$(date +%F)"
campaign="${MASSMAIL_CAMPAIGN:-nightly-$today}"
mkdir -p logs
log="$root/logs/massmail-$today.log"

if [[ ! -x .venv/bin/python ]]; then
    echo "massmail-nightly: no $root/.venv; create it with: bash -c 'source scripts/env'" >&2
    exit 2
fi

# Yesterday's run may still be going under another campaign name, which batch.run's own
# per-campaign lock would not catch; this lock covers every nightly run.
exec 9>>"$root/logs/massmail-nightly.lock"
if ! flock -n 9; then
    echo "$(date -Is) campaign=$campaign not started: another nightly run is active" >>"$log"
    echo "massmail-nightly: another nightly run is active; $campaign not started" >&2
    exit 3
fi

echo "$(date -Is) campaign=$campaign start" >>"$log"
rc=0
.venv/bin/python -m batch.run --config config/massmail.toml --campaign "$campaign" \
    --workers 8 "$@" >>"$log" 2>&1 || rc=$?
echo "$(date -Is) campaign=$campaign exit=$rc" >>"$log"

if ((rc != 0)); then
    echo "massmail-nightly: campaign $campaign ended with exit $rc; see $log" >&2
fi
exit "$rc"
