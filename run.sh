#!/usr/bin/env bash
# Set up everything this project needs (a virtualenv from requirements.txt), then run it.
#   ./run.sh repro        the pipeline: dvc repro (extra arguments go to dvc repro)
#   ./run.sh test         the test suite: pytest (extra arguments go to pytest)
#   ./run.sh dvc ...      any dvc command inside the environment (./run.sh python ... likewise)
#   ./run.sh plots        dvc plots show, with Vega copied from npm so the page works offline
#   ./run.sh plots diff [REV ...]   the same for dvc plots diff (workspace against HEAD, or experiments)
# Set RESNET8_MIRROR to a directory holding pretrainedResnet.h5 to work offline.
set -euo pipefail
cd "$(dirname "$0")"

venv="${VENV:-.venv}"
python="${PYTHON:-$(command -v python3.11 || command -v python3)}"
stamp="$venv/.requirements.sha256"
want="$(sha256sum requirements.txt | cut -d' ' -f1)"
if [ ! -x "$venv/bin/python" ] || [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  echo "run.sh: installing requirements into $venv (first run takes a few minutes)" >&2
  "$python" -m venv "$venv"
  "$venv/bin/python" -m pip install --quiet --disable-pip-version-check -r requirements.txt
  echo "$want" > "$stamp"
fi
venv="$(cd "$venv" && pwd)"  # absolute: VENV may be given either way
export PATH="$venv/bin:$PATH"
if [ -n "${RESNET8_MIRROR:-}" ]; then
  RESNET8_MIRROR="$(cd "$RESNET8_MIRROR" && pwd)"  # absolute, for stages run from copies
  export RESNET8_MIRROR
fi

command="${1:-repro}"
shift || true
case "$command" in
  repro) python -m stages.lib.lockfile_guard && exec dvc repro "$@" ;;
  test) exec python -m pytest "$@" ;;
  dvc)
    case "${1:-}" in repro|exp) python -m stages.lib.lockfile_guard ;; esac  # a killed run's dvc.lock
    exec dvc "$@" ;;
  python) exec python "$@" ;;
  plots)
    if [ "${1:-}" = diff ]; then shift; dvc plots diff "$@"; else dvc plots show "$@"; fi
    vega=(vega@5.20.2 vega-lite@5.2.0 vega-embed@6.18.2)
    work="$(mktemp -d)"
    for spec in "${vega[@]}"; do
      (cd "$work" && npm pack "$spec" --silent >/dev/null && tar xzf ./*.tgz && rm ./*.tgz \
        && cp package/build/"${spec%@*}".min.js "$OLDPWD/dvc_plots/" && rm -r package)
      sed -i "s#https://cdn.jsdelivr.net/npm/$spec#${spec%@*}.min.js#" dvc_plots/index.html
    done
    rm -r "$work"
    echo "run.sh: dvc_plots/index.html now loads Vega from dvc_plots/ (works offline)" ;;
  *) echo "run.sh: unknown command '$command' (expected repro, test, dvc, python or plots)" >&2; exit 2 ;;
esac
