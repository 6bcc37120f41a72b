#!/usr/bin/env bash
# wantrainer launcher.
#   ./run_trainer.sh                     pick a config (here or under configs/) and an operation from a menu
#   ./run_trainer.sh --config X.toml     train with X.toml (the default operation)
#   ./run_trainer.sh <command> [args]    any wantrainer command, e.g. ./run_trainer.sh validate --config X.toml
# Uses .venv (created by ./install.sh); set WANTRAINER_PYTHON to use another Python environment.
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
PY="${WANTRAINER_PYTHON:-$HERE/.venv/bin/python}"
if ! command -v "$PY" >/dev/null 2>&1; then
  echo "error: $PY not found: run ./install.sh first" >&2
  exit 2
fi
if [ $# -eq 0 ]; then
  exec "$PY" -m wantrainer.cli menu --also "$HERE/configs"
fi
case "$1" in
  --config|-c|--config=*) exec "$PY" -m wantrainer.cli train "$@" ;;
esac
exec "$PY" -m wantrainer.cli "$@"
