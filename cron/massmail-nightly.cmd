@echo off
rem Nightly run for the Windows Task Scheduler; the same as massmail-nightly.sh.
rem
rem Usage: massmail-nightly.cmd [batch.run options...]
rem The campaign is nightly-yyyy-MM-dd unless MASSMAIL_CAMPAIGN is set. Output goes to
rem logs\massmail-yyyy-MM-dd.log. Exits with batch.run's code. Overlapping runs are kept
rem apart by the task's MultipleInstancesPolicy (IgnoreNew), see massmail-task.xml.
setlocal

cd /d "%~dp0.."

rem %DATE% follows the regional settings; PowerShell gives a fixed format.
for /f %%d in ('powershell -NoProfile -Command "Get-Date -Format yyyy-MM-dd"') do set "TODAY=%%d"
if defined TODAY goto :have_date
>&2 echo massmail-nightly: could not read the date from PowerShell
exit /b 70
:have_date

set "CAMPAIGN=%MASSMAIL_CAMPAIGN%"
if not defined CAMPAIGN set "CAMPAIGN=nightly-%TODAY%"
if not exist logs mkdir logs
set "LOG=%CD%\logs\massmail-%TODAY%.log"

if exist ".venv\Scripts\python.exe" goto :run
>&2 echo massmail-nightly: no .venv in %CD%: run py -m venv .venv, then .venv\Scripts\pip install -e .[test]
exit /b 2

:run
rem The redirection comes first so that a digit at the end of a line is not read as a handle.
>> "%LOG%" echo %TODAY% %TIME% campaign=%CAMPAIGN% start
".venv\Scripts\python.exe" -m batch.run --config config\massmail.toml --campaign "%CAMPAIGN%" --workers 8 %* >> "%LOG%" 2>&1
set "RC=%ERRORLEVEL%"
>> "%LOG%" echo %TODAY% %TIME% campaign=%CAMPAIGN% exit=%RC%

if not "%RC%"=="0" >&2 echo massmail-nightly: campaign %CAMPAIGN% ended with exit %RC%, see %LOG%
exit /b %RC%
