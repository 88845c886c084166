#!/usr/bin/env bash
# The dashboard's PromQL on Prometheus' engine, then its panels drawn:
#
#   render.sh --check                      every target parses (no capture)
#   render.sh CAPTURE_DIR OUT.png [NOTE]   every target evaluated over the
#                                          capture (series in CAPTURE_DIR/series.json),
#                                          then drawn into OUT.png
#
# The PromQL program is build.sh's (make dashboard-build builds it first).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
# shellcheck source=tests/cluster/lib.sh
source "$here/../cluster/lib.sh"
# shellcheck source=tests/dashboard/lib.sh
source "$here/lib.sh"
[[ -x $DASH_BIN ]] || ddie "$DASH_BIN is missing: run make dashboard-build"

if [[ ${1:-} == --check ]]; then
  exec "$DASH_BIN" --check --dashboard "$DASHBOARD_JSON" --fixture "$DASH_MOD/testdata/every-family.om"
fi
(($# >= 2)) || ddie "usage: $0 --check | CAPTURE_DIR OUT.png [NOTE]"
capture=$1 png=$2 note=${3:-}
"$DASH_BIN" --dashboard "$DASHBOARD_JSON" --capture "$capture" --out "$capture/series.json"
# The first Python with matplotlib: a pyenv or venv python3 on PATH may lack
# the one apt installed for /usr/bin/python3.
python=
for p in ${STEAD_PYTHON:-python3 /usr/bin/python3}; do
  if "$p" -c 'import matplotlib' 2>/dev/null; then python=$p; break; fi
done
[[ -n $python ]] ||
  ddie "no python3 with matplotlib: apt-get install python3-matplotlib (or pip install matplotlib), or set STEAD_PYTHON"
"$python" "$here/draw.py" "$capture/series.json" "$png" --note "$note"
