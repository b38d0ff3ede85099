@echo off
rem Nightly run for the Windows Task Scheduler; the same as massmail-nightly.sh, less the lock.
rem
rem Usage: massmail-nightly.cmd [batch.run options...]
rem The campaign is nightly-yyyy-MM-dd, named after the date: a rerun the same day resumes
rem it, the next day starts a new one. Everything goes to LOG_DIR\massmail-yyyy-MM-dd.log.
rem Exits with batch.run's code (see --help), 2 when this script is set up wrong. The task
rem never starts a second instance while one runs (MultipleInstancesPolicy IgnoreNew in
rem massmail-task.xml), and batch.run ends a second run of one campaign with 3.
rem
rem Settings from the environment, with their defaults:
rem   MASSMAIL_CONFIG    config\massmail.toml    batch.run's settings: list, template, relay...
rem   MASSMAIL_LOG_DIR   logs                    the daily log files
rem   MASSMAIL_DATE      today, from PowerShell  the date in the campaign's and the log's name
rem   MASSMAIL_CAMPAIGN  nightly-<date>          another campaign name, for a one-off run
rem Relative paths are taken from the project folder, where the job runs.
rem
rem This file needs CRLF line endings: cmd.exe can miss a label in a file without them.
setlocal

rem The project is found from this file, whatever folder the task starts in.
cd /d "%~dp0.."

rem %DATE% follows the regional settings; PowerShell's Get-Date gives a fixed format.
set "TODAY=%MASSMAIL_DATE%"
if defined TODAY goto :have_date
set "POWERSHELL=%SystemRoot%\System32\WindowsPowerShell\v1.0\powershell.exe"
for /f %%d in ('%POWERSHELL% -NoProfile -Command "Get-Date -Format yyyy-MM-dd"') do set "TODAY=%%d"
if defined TODAY goto :have_date
>&2 echo massmail-nightly: could not read the date from PowerShell
exit /b 2
:have_date

set "CAMPAIGN=%MASSMAIL_CAMPAIGN%"
if not defined CAMPAIGN set "CAMPAIGN=nightly-%TODAY%"

rem batch.run reads MASSMAIL_CONFIG itself; a --config flag here would override the caller's.
if not defined MASSMAIL_CONFIG set "MASSMAIL_CONFIG=config\massmail.toml"

set "LOG_DIR=%MASSMAIL_LOG_DIR%"
if not defined LOG_DIR set "LOG_DIR=logs"
if not exist "%LOG_DIR%" mkdir "%LOG_DIR%"
set "LOG=%LOG_DIR%\massmail-%TODAY%.log"

if exist ".venv\Scripts\python.exe" goto :run
>&2 echo massmail-nightly: no .venv in %CD%: py -m venv .venv ^&^& .venv\Scripts\pip install -e .
exit /b 2

:run
rem The redirection comes first so that a digit at the end of a line is not read as a handle.
>> "%LOG%" echo %TODAY% %TIME% campaign=%CAMPAIGN% config=%MASSMAIL_CONFIG% start
".venv\Scripts\python.exe" -m batch.run --campaign "%CAMPAIGN%" %* < nul >> "%LOG%" 2>&1
set "RC=%ERRORLEVEL%"
>> "%LOG%" echo %TODAY% %TIME% campaign=%CAMPAIGN% exit=%RC%

if not "%RC%"=="0" >&2 echo massmail-nightly: campaign %CAMPAIGN% ended with exit %RC%; log: %LOG%
exit /b %RC%
