#!/usr/bin/env bash
# Install sevenn_mf and what it needs into the current python (idempotent).
# torch is pinned: on these machines torch==2.13.0 is a local CPU wheel, while an
# unpinned torch would pull gigabytes of CUDA packages.
set -euo pipefail
PY="${PYTHON:-python3}"
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
have() { "$PY" - "$@" <<'PYEOF' 2>/dev/null
import importlib.metadata as md, sys
want = dict(a.split('==') for a in sys.argv[1:])
sys.exit(0 if all(md.version(k).split('+')[0] == v for k, v in want.items()) else 1)
PYEOF
}
if ! have torch==2.13.0; then
    echo "[setup] installing torch==2.13.0 (CPU)" >&2
    "$PY" -m pip install -q torch==2.13.0
fi
if ! have sevenn==0.13.0 || ! "$PY" -c 'import sevenn_mf, lmdb' 2>/dev/null \
        || ! "$PY" -m ruff --version >/dev/null 2>&1; then
    echo "[setup] installing sevenn_mf (editable) with sevenn 0.13.0" >&2
    "$PY" -m pip install -q -e "$REPO[test]"
fi
"$PY" -c 'import sevenn_mf, sevenn, torch; print(f"[setup] sevenn_mf ready: sevenn {sevenn.__version__}, torch {torch.__version__}")' >&2
