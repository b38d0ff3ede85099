"""The recording relay itself, checked with a plain smtplib client."""

import smtplib

import pytest

from tests.relay import RecordingRelay

MESSAGE = (
    "From: news@example.com\r\n"
    "To: ann@example.com\r\n"
    "Subject: Hello\r\n"
    "Message-ID: <m1@example.com>\r\n"
    "\r\n"
    "Hello Ann\r\n"
)


def test_the_relay_records_what_it_accepted():
    with RecordingRelay() as relay, smtplib.SMTP(relay.host, relay.port, timeout=5) as client:
        client.sendmail("news@example.com", ["Ann@Example.com", "bob@example.org"], MESSAGE)

    [message] = relay.messages()
    assert message.mail_from == "news@example.com"
    assert message.rcpt_tos == ("Ann@Example.com", "bob@example.org")
    assert message.message_id == "<m1@example.com>"
    assert b"Hello Ann" in message.content
    assert relay.received_by("ann@example.com") == 1
    assert relay.count() == 1


@pytest.mark.parametrize("code", [550, 451])
def test_the_relay_refuses_a_configured_recipient_with_the_configured_code(code):
    refuse = {"bob@example.org": (code, "not today")}
    with (
        RecordingRelay(refuse=refuse) as relay,
        smtplib.SMTP(relay.host, relay.port, timeout=5) as client,
        pytest.raises(smtplib.SMTPRecipientsRefused) as refused,
    ):
        client.sendmail("news@example.com", ["BOB@example.org"], MESSAGE)

    assert refused.value.recipients == {"BOB@example.org": (code, b"not today")}
    assert relay.count() == 0


def test_a_connection_dropped_after_data_leaves_the_client_without_an_answer():
    with RecordingRelay(drop_after_data=True) as relay:
        client = smtplib.SMTP(relay.host, relay.port, timeout=5)
        with pytest.raises(smtplib.SMTPServerDisconnected):
            client.sendmail("news@example.com", ["ann@example.com"], MESSAGE)
        client.close()

    assert relay.count() == 1
    assert relay.received_by("ann@example.com") == 1
