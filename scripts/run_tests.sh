#!/usr/bin/env bash
# Set up everything and run the test suite: the README's test command and CI's.
#   bash scripts/run_tests.sh [pytest args...]
# Builds LAMMPS (serial + MPI, cached outside the repo) for the LAMMPS tests;
# set SEVENN_MF_SKIP_LAMMPS_BUILD=1 to skip the build (those tests then skip
# with a message saying how to build it).
set -uo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO"
bash scripts/setup_env.sh || exit 1
# lint and format (ruff, configured in pyproject.toml): a failure fails the run
if ! python3 -m ruff check . || ! python3 -m ruff format --check .; then
    echo "[tests] ruff found problems: run 'ruff check --fix . && ruff format .'" >&2
    exit 1
fi
if [ -z "${SEVENN_MF_SKIP_LAMMPS_BUILD:-}" ]; then
    if out=$(bash scripts/build_lammps.sh --both); then
        echo "[tests] LAMMPS: $(echo "$out" | tail -n 1)" >&2
    else
        echo "[tests] WARNING: the LAMMPS build failed; LAMMPS tests will be skipped." >&2
    fi
fi
# 2 cores: one torch thread per process keeps tests from oversubscribing
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
python3 -m pytest -q -rs -p no:cacheprovider "$@"
rc=$?
if [ "$rc" -eq 5 ]; then
    echo "[tests] pytest collected no tests: that is a failure" >&2
    exit 1
fi
exit "$rc"
