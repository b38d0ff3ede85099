"""Options from a TOML file, the environment and flags, and the command's help."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from batch import config
from batch.errors import UsageError
from tests.conftest import run_batch

REQUIRED = ["--source", "list.csv", "--template", "t.txt"]


def test_a_flag_wins_over_the_environment_which_wins_over_the_file(tmp_path, monkeypatch):
    file = tmp_path / "massmail.toml"
    file.write_text('smtp_host = "from-file"\nsmtp_port = 2525\nworkers = 3\n')
    monkeypatch.setenv("MASSMAIL_SMTP_HOST", "from-env")
    monkeypatch.setenv("MASSMAIL_WORKERS", "5")

    settings = config.load([*REQUIRED, "--config", str(file), "--workers", "7"])

    assert (settings.smtp_host, settings.smtp_port, settings.workers) == ("from-env", 2525, 7)


def test_the_relay_port_follows_the_tls_mode_unless_given():
    assert config.load([*REQUIRED, "--smtp-tls", "ssl"]).smtp_port == 465
    assert config.load([*REQUIRED, "--smtp-tls", "starttls"]).smtp_port == 587
    assert config.load([*REQUIRED, "--smtp-tls", "none", "--smtp-port", "2525"]).smtp_port == 2525


def test_an_unknown_key_in_the_file_is_refused_with_the_file_and_key(tmp_path):
    file = tmp_path / "massmail.toml"
    file.write_text('smpt_host = "typo"\n')

    with pytest.raises(UsageError, match=rf"{file}: unknown option smpt_host"):
        config.load([*REQUIRED, "--config", str(file)])


def test_a_password_in_the_file_is_refused_and_never_echoed(tmp_path):
    file = tmp_path / "massmail.toml"
    file.write_text('smtp_password = "hunter2-secret"\n')

    with pytest.raises(UsageError) as raised:
        config.load([*REQUIRED, "--config", str(file)])

    assert "MASSMAIL_SMTP_PASSWORD" in str(raised.value)
    assert "hunter2-secret" not in str(raised.value)


def test_a_bad_value_names_where_it_came_from(monkeypatch):
    monkeypatch.setenv("MASSMAIL_WORKERS", "many")

    with pytest.raises(UsageError, match=r"\$MASSMAIL_WORKERS: 'many'"):
        config.load(REQUIRED)


def test_a_configuration_saved_in_another_encoding_is_refused_naming_the_file(tmp_path):
    file = tmp_path / "massmail.toml"
    file.write_bytes("# Relais de la société\nworkers = 3\n".encode("cp1252"))

    result = run_batch([*REQUIRED, "--config", str(file)])

    assert result.returncode == 2, result.stderr
    assert f"error: {file}: the configuration is not UTF-8" in result.stderr
    assert "Traceback" not in result.stderr


def test_numbers_no_run_can_use_are_refused_naming_the_option():
    for flag, value in (
        ("--rate", "nan/s"),
        ("--rate", "inf/min"),
        ("--rate", "1e400/h"),
        ("--smtp-timeout", "nan"),
        ("--retry-delay", "inf"),
        ("--smtp-port", "70000"),
        ("--smtp-port", "0"),
    ):
        with pytest.raises(UsageError, match=rf"^{flag}: '{value}': must be"):
            config.load([*REQUIRED, flag, value])


def test_the_password_comes_from_the_environment_and_stays_out_of_the_repr(monkeypatch):
    monkeypatch.setenv("MASSMAIL_SMTP_PASSWORD", "hunter2-secret")

    settings = config.load([*REQUIRED, "--smtp-user", "mailer@example.com"])

    assert settings.smtp_password == "hunter2-secret"
    assert "hunter2-secret" not in repr(settings)


def test_help_lists_every_exit_code_and_an_example():
    result = run_batch(["--help"], timeout_s=60)

    assert result.returncode == 0
    for code in ("0", "1", "2", "3", "70", "75"):
        assert f"\n  {code} " in result.stdout
    assert "python -m batch.run --source" in result.stdout


def test_a_missing_template_is_a_usage_error_naming_the_file(tmp_path):
    source = tmp_path / "list.csv"
    source.write_text("email\nann@example.com\n")
    missing = Path(tmp_path / "nowhere.txt")

    result = run_batch(["--source", str(source), "--template", str(missing)], timeout_s=60)

    assert result.returncode == 2
    assert str(missing) in result.stderr


def test_the_documented_default_configuration_names_every_option_and_loads():
    path = Path(__file__).resolve().parent.parent / "config" / "massmail.toml"
    text = path.read_text()

    settings = config.load([*REQUIRED, "--config", str(path)])

    for option in config.OPTIONS:
        assert f"{option.name} =" in text, f"{path} does not document {option.name}"
    assert settings.workers == 8
    # The file leaves the port to follow the TLS mode, as the option's default does.
    assert config.load([*REQUIRED, "--config", str(path), "--smtp-tls", "ssl"]).smtp_port == 465


def test_a_rate_is_read_per_second_minute_or_hour_and_a_bad_one_is_refused():
    assert config.load([*REQUIRED, "--rate", "10/s"]).rate == 10
    assert config.load([*REQUIRED, "--rate", "300/min"]).rate == 5
    assert config.load([*REQUIRED, "--rate", "7200/h"]).rate == 2

    for bad in ("300", "300/day", "-5/s", "fast/s"):
        with pytest.raises(UsageError, match=rf"--rate: '{bad}': must be a number"):
            config.load([*REQUIRED, f"--rate={bad}"])


def test_a_rate_so_slow_that_a_message_would_outwait_the_broker_is_refused():
    assert config.load([*REQUIRED, "--rate", "3/h"]).rate == 3 / 3600

    with pytest.raises(UsageError, match=r"--rate: '2/h': must be at least 3/h: a worker"):
        config.load([*REQUIRED, "--rate=2/h"])


def test_attach_is_repeatable_from_flags_the_environment_and_the_file(tmp_path, monkeypatch):
    file = tmp_path / "massmail.toml"
    file.write_text('attach = ["a.pdf", "b.pdf"]\n')

    from_file = config.load([*REQUIRED, "--config", str(file)])
    monkeypatch.setenv("MASSMAIL_ATTACH", os.pathsep.join(["c.pdf", "d.pdf"]))
    from_env = config.load([*REQUIRED, "--config", str(file)])
    from_flags = config.load([*REQUIRED, "--attach", "e.pdf", "--attach", "f.pdf"])

    assert from_file.attach == (Path("a.pdf"), Path("b.pdf"))
    assert from_env.attach == (Path("c.pdf"), Path("d.pdf"))
    assert from_flags.attach == (Path("e.pdf"), Path("f.pdf"))
