@echo off
rem wantrainer launcher.
rem   run_trainer.bat                     pick a config (here or under configs\) and an operation from a menu
rem   run_trainer.bat --config X.toml     train with X.toml (the default operation)
rem   run_trainer.bat <command> [args]    any wantrainer command, e.g. run_trainer.bat validate --config X.toml
rem Uses .venv (created by install.bat); set WANTRAINER_PYTHON to use another Python environment.
setlocal
set "HERE=%~dp0"
set "PY=%HERE%.venv\Scripts\python.exe"
if defined WANTRAINER_PYTHON set "PY=%WANTRAINER_PYTHON%"
if defined WANTRAINER_PYTHON goto dispatch
if exist "%PY%" goto dispatch
echo error: %PY% not found: run install.bat first 1>&2
exit /b 2

:dispatch
if "%~1"=="" goto menu
if /i "%~1"=="--config" goto train
if /i "%~1"=="-c" goto train
"%PY%" -m wantrainer.cli %*
exit /b %ERRORLEVEL%

:train
"%PY%" -m wantrainer.cli train %*
exit /b %ERRORLEVEL%

:menu
"%PY%" -m wantrainer.cli menu --also "%HERE%configs"
exit /b %ERRORLEVEL%
