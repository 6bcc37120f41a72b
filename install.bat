@echo off
rem Creates .venv next to this script and installs wantrainer into it.
rem
rem torch is installed only when .venv has none (torch==2.13.0 from PyPI). GPU users who want a particular
rem CUDA build install it first, then run this script, e.g.:
rem   py -3.11 -m venv .venv
rem   .venv\Scripts\python.exe -m pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128
rem   install.bat
rem or let this script do it: set TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128 then run install.bat
rem Set PYTHON to choose the interpreter (3.11 or newer; default: python).
setlocal
cd /d "%~dp0"
if not defined PYTHON set "PYTHON=python"
"%PYTHON%" -c "import sys; sys.exit(sys.version_info < (3, 11))" 2>nul
if errorlevel 1 goto oldpython
if not exist ".venv\Scripts\python.exe" "%PYTHON%" -m venv .venv
if errorlevel 1 exit /b 1
set "PY=.venv\Scripts\python.exe"
"%PY%" -c "import torch" 2>nul
if not errorlevel 1 goto havetorch
if defined TORCH_INDEX_URL goto torchindex
"%PY%" -m pip install torch==2.13.0
if errorlevel 1 exit /b 1
goto project

:torchindex
"%PY%" -m pip install torch==2.13.0 --index-url "%TORCH_INDEX_URL%"
if errorlevel 1 exit /b 1
goto project

:havetorch
echo keeping the installed torch

:project
"%PY%" -m pip install -e .
if errorlevel 1 exit /b 1
echo.
echo installed. Next: run_trainer.bat (menu), or .venv\Scripts\wantrainer --help
exit /b 0

:oldpython
echo error: wantrainer needs Python 3.11 or newer; set PYTHON=C:\path\to\python.exe and run again 1>&2
exit /b 2
