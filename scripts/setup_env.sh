#!/usr/bin/env bash
# Creates .venv (once) and installs syncsn with its test, dev and example extras, torch
# pinned by constraints.txt. Re-running is cheap: it reinstalls only when setup.cfg or
# constraints.txt changed.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
python="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
    echo "[setup] creating .venv with $($python --version)"
    "$python" -m venv .venv
fi
stamp=.venv/.syncsn-installed
want="$(cat setup.cfg constraints.txt pyproject.toml | sha256sum | cut -d' ' -f1)"
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
    echo "[setup] installing syncsn[test,dev,examples] (torch pinned by constraints.txt)"
    .venv/bin/python -m pip install --quiet --upgrade pip
    .venv/bin/python -m pip install --quiet -c constraints.txt -e ".[test,dev,examples]"
    # The CPU kernels, compiled now rather than in the first training step (about a minute,
    # once per machine; without a compiler one line says the layers run in pure torch).
    .venv/bin/python -c "from syncsn._native import main; main()"
    echo "$want" > "$stamp"
fi
