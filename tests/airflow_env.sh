#!/usr/bin/env bash
# Build (once) the separate Python environment the Airflow test runs the DAG under.
#
# Airflow pins its own versions of many packages that clip-etl also uses, so it gets its own venv
# instead of a place in .venv. The DAG talks to Ray only through the Jobs REST API, so this venv
# holds Airflow alone (no Ray, no clip-etl). Airflow's official constraints files are not used:
# uv resolves the exact Airflow pin from the package index. A stamp file with the pin marks a
# finished install; a missing or different stamp rebuilds the venv.
#
# Usage: [PYTHON=python3.11] tests/airflow_env.sh [VENV_DIR]   (default: .venv-airflow next to .venv)
set -euo pipefail

AIRFLOW_VERSION="3.3.2"
UV_VERSION="0.13.9"
PYTHON="${PYTHON:-python3}"
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${1:-${CLIP_ETL_AIRFLOW_VENV:-$ROOT/.venv-airflow}}"
STAMP="$VENV/.installed"
WANT="apache-airflow==$AIRFLOW_VERSION uv==$UV_VERSION python==$("$PYTHON" -c 'import platform; print(platform.python_version())')"

mkdir -p "$(dirname "$VENV")"
exec 9>"$VENV.lock"
flock 9  # two test runs at once: the second waits for the first's install, then reuses it
if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$WANT" ] && [ -x "$VENV/bin/airflow" ]; then
    exit 0
fi
rm -rf "$VENV"
"$PYTHON" -m venv "$VENV"
"$VENV/bin/pip" install --quiet "uv==$UV_VERSION"
"$VENV/bin/uv" pip install --quiet --python "$VENV/bin/python" "apache-airflow==$AIRFLOW_VERSION"
echo "$WANT" > "$STAMP"
