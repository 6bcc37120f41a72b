#!/usr/bin/env bash
# Creates .venv next to this script and installs wantrainer into it.
#
# torch is installed only when .venv has none (torch==2.13.0 from PyPI). GPU users who want a particular
# CUDA build install it first, then run this script, e.g.:
#   python3 -m venv .venv
#   .venv/bin/python -m pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128
#   ./install.sh
# or let this script do it: TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128 ./install.sh
# PYTHON=python3.12 ./install.sh picks the interpreter (3.11 or newer).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")"
PYTHON="${PYTHON:-python3}"
if ! "$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
  echo "error: wantrainer needs Python 3.11 or newer; set PYTHON=/path/to/python3.11 and run again" >&2
  exit 2
fi
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
if .venv/bin/python -c "import torch" 2>/dev/null; then
  echo "keeping the installed torch $(.venv/bin/python -c 'import torch; print(torch.__version__)')"
else
  .venv/bin/python -m pip install torch==2.13.0 ${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"}
fi
.venv/bin/python -m pip install -e .
echo
echo "installed. Next: ./run_trainer.sh (menu), or .venv/bin/wantrainer --help"
