"""HTML alternatives, List-Unsubscribe and attachments, as the relay receives them."""

from __future__ import annotations

import email
import email.policy
import os
import re
from email.utils import parsedate_to_datetime
from urllib.parse import quote

from tests.conftest import people, received_counts, write_csv, write_template

TEMPLATE = """\
From: Test Sender <sender@example.com>
Subject: Grüße {{ name }}

Dear {{ name }},
this is the text part.
"""
HTML = "<p>Dear {{ name }},</p>\n<p>this is the HTML part.</p>\n"
HOSTILE_NAME = 'Zoë <script>alert("x")</script>'
URL = "https://example.com/unsubscribe?list=news&e={{ email | urlencode }}"
MAILTO = "leave@example.com?subject=unsubscribe"
# One or more URIs in angle brackets, separated by commas (RFC 2369).
LIST_UNSUBSCRIBE = re.compile(r"<[^<>\s]+>(\s*,\s*<[^<>\s]+>)*")


def parsed(content: bytes) -> email.message.EmailMessage:
    return email.message_from_bytes(content, policy=email.policy.default)


def write_templates(tmp_path, html: str | None = HTML):
    """Write template.txt, and template.html beside it when html is given."""
    if html is not None:
        (tmp_path / "template.html").write_text(html, encoding="utf-8")
    return write_template(tmp_path / "template.txt", TEMPLATE)


def links(message) -> list[str]:
    """The URIs of a List-Unsubscribe header, in their order."""
    return re.findall(r"<([^<>]*)>", str(message["List-Unsubscribe"]))


def raw_header(content: bytes, name: str) -> bytes:
    """The bytes of one header as they came over the wire, folds included."""
    head = content.partition(b"\r\n\r\n")[0]
    pattern = rb"(?:^|\r\n)" + re.escape(name.encode()) + rb": (.*?)(?=\r\n(?![ \t])|$)"
    return re.search(pattern, head, re.S).group(1)


def short_template(tmp_path, headers: str):
    """Write a template of these header lines, a Subject and a one-word body."""
    return write_template(tmp_path / "template.txt", f"{headers}\nSubject: Hi\n\nHi.\n")


def reply_to_template(tmp_path, reply_to: str):
    """Write a short template whose Reply-To header is reply_to."""
    sender = "From: Test Sender <sender@example.com>"
    return short_template(tmp_path, f"{sender}\nReply-To: {reply_to}")


def assert_refused_and_nothing_sent(job, result, *parts: str) -> None:
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    for part in parts:
        assert part in result.stderr
    assert job.relay.count() == 0
    assert not job.folder.exists()


# Headers, as a mail program reads them.


def test_a_from_name_outside_ascii_shows_intact_and_goes_as_an_ascii_encoded_word(job, tmp_path):
    source = write_csv(tmp_path / "list.csv", people(1))
    template = short_template(tmp_path, "From: Jörg Müller <news@example.com>")

    result = job.run(source, template)

    assert result.returncode == 0, result.stderr
    [accepted] = job.relay.messages()
    assert accepted.mail_from == "news@example.com"
    [sender] = parsed(accepted.content)["From"].addresses
    assert (sender.display_name, sender.addr_spec) == ("Jörg Müller", "news@example.com")
    # The relay does not announce SMTPUTF8, so the header must be ASCII (RFC 2047).
    raw = raw_header(accepted.content, "From")
    assert raw.isascii(), raw
    assert re.search(rb"=\?utf-8\?[bq]\?[^?\s]+\?=", raw, re.I), raw
    assert raw.endswith(b" <news@example.com>"), raw


def test_a_reply_to_column_with_a_comma_in_its_display_name_is_one_address(job, tmp_path):
    rows = [{"email": "ann@example.com", "reply_to": "Smith, John <j@x.example>"}]
    source = write_csv(tmp_path / "list.csv", rows)
    template = reply_to_template(tmp_path, "{{ reply_to }}")

    result = job.run(source, template)

    assert result.returncode == 0, result.stderr
    [accepted] = job.relay.messages()
    [reply_to] = parsed(accepted.content)["Reply-To"].addresses
    assert (reply_to.display_name, reply_to.addr_spec) == ("Smith, John", "j@x.example")


def test_a_reply_to_column_without_a_readable_address_fails_that_recipient_alone(job, tmp_path):
    rows = [
        {"email": "ann@example.com", "reply_to": "Müller, Hans <hans@example.com>, Team"},
        {"email": "bob@example.com", "reply_to": ""},
        {"email": "cat@example.com", "reply_to": "desk@example.com"},
    ]
    source = write_csv(tmp_path / "list.csv", rows)
    template = reply_to_template(tmp_path, "{{ reply_to }}")

    result = job.run(source, template)

    # Encoding the value whole would hide its addresses in an encoded word, or turn its
    # words into addresses: Ann's message is not sent at all, and says why.
    assert result.returncode == 1, result.stderr
    assert received_counts(job.relay) == {"bob@example.com": 1, "cat@example.com": 1}
    [ann] = [row for row in job.sent_log() if row["recipient"] == "ann@example.com"][-1:]
    assert ann["status"] == "failed"
    assert f"{template}: Reply-To: no address a mail program could read" in ann["smtp_reply"]
    by_recipient = {m.rcpt_tos[0]: parsed(m.content) for m in job.relay.messages()}
    assert "Reply-To" not in by_recipient["bob@example.com"]  # an empty column: no header
    assert by_recipient["cat@example.com"]["Reply-To"] == "desk@example.com"


def test_a_fixed_reply_to_without_an_address_is_refused_before_anything_is_sent(job, tmp_path):
    source = write_csv(tmp_path / "list.csv", people(2))
    template = reply_to_template(tmp_path, "the help desk")

    result = job.run(source, template)

    assert_refused_and_nothing_sent(
        job, result, f"{template}: Reply-To: no address a mail program could read"
    )


def test_a_template_expression_that_fails_for_everyone_stops_the_run_with_2(job, tmp_path):
    source = write_csv(tmp_path / "list.csv", people(2))
    template = write_template(
        tmp_path / "template.txt",
        "From: Test Sender <sender@example.com>\nSubject: Hi\n\nTotal: {{ 10 // 0 }}\n",
    )

    result = job.run(source, template)

    assert_refused_and_nothing_sent(job, result, f"{template}: cannot be rendered: ZeroDivision")


def test_an_expression_that_fails_for_the_first_row_stops_the_run_naming_row_and_template(
    job, tmp_path
):
    source = write_csv(tmp_path / "list.csv", people(3))
    bodies = {
        "Dear {{ name + 1 }},\n": "TypeError",  # a column is text, never a number
        "Hi {{ name.first }}.\n": "has no attribute 'first'",
    }
    for body, problem in bodies.items():
        template = short_template(tmp_path, "From: Test Sender <sender@example.com>")
        template.write_text(template.read_text().replace("Hi.\n", body))

        result = job.run(source, template)

        assert_refused_and_nothing_sent(job, result, f"{source}, first row: {template}:", problem)


def test_an_expression_that_fails_for_a_later_row_fails_that_recipient_alone(job, tmp_path):
    rows = [{"email": f"person{n}@example.com", "count": str(n % 3)} for n in range(1, 7)]
    source = write_csv(tmp_path / "list.csv", rows)
    template = short_template(tmp_path, "From: Test Sender <sender@example.com>")
    template.write_text(template.read_text().replace("Hi.", "Share: {{ 60 // count|int }}"))

    result = job.run(source, template)

    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr
    zero = {r["email"] for r in rows if r["count"] == "0"}
    assert received_counts(job.relay) == {r["email"]: 1 for r in rows if r["email"] not in zero}
    failed = {r["recipient"]: r for r in job.sent_log() if r["status"] == "failed"}
    assert set(failed) == zero
    assert all("cannot be rendered: ZeroDivisionError" in r["smtp_reply"] for r in failed.values())


def test_a_from_header_or_link_that_fails_for_everyone_stops_the_run_with_2(job, tmp_path):
    source = write_csv(tmp_path / "list.csv", people(2))
    broken_from = short_template(tmp_path, "From: Sender {{ 1 // 0 }} <sender@example.com>")

    result = job.run(source, broken_from)

    assert_refused_and_nothing_sent(job, result, f"{broken_from}: cannot be rendered: ZeroDiv")

    template = short_template(tmp_path, "From: Test Sender <sender@example.com>")
    link = "https://example.com/u?n={{ 1 // 0 }}"

    result = job.run(source, template, "--unsubscribe-url", link)

    assert_refused_and_nothing_sent(job, result, "--unsubscribe-url: cannot be rendered: ZeroDiv")


def test_a_sender_domain_outside_ascii_gives_an_ascii_message_id(job, tmp_path):
    source = write_csv(tmp_path / "list.csv", people(1))
    template = short_template(tmp_path, "From: Bücher <news@bücher.example>")

    result = job.run(source, template)

    assert result.returncode == 0, result.stderr
    [accepted] = job.relay.messages()
    message_id = raw_header(accepted.content, "Message-ID")
    assert message_id.isascii() and message_id.endswith(b"@xn--bcher-kva.example>")


def test_each_message_has_one_date_that_a_mail_program_reads_with_its_time_zone(job, tmp_path):
    source = write_csv(tmp_path / "list.csv", people(2))
    template = write_templates(tmp_path, html=None)

    result = job.run(source, template)

    assert result.returncode == 0, result.stderr
    assert job.relay.count() == 2
    for accepted in job.relay.messages():
        [date] = parsed(accepted.content).get_all("Date")
        assert parsedate_to_datetime(str(date)).tzinfo is not None


def test_list_unsubscribe_is_one_header_of_both_links_filled_and_percent_encoded_per_recipient(
    job, tmp_path
):
    rows = [
        {"email": "ann+news@example.com", "name": "Ann"},
        {"email": "bob@example.com", "name": "Bob"},
    ]
    source = write_csv(tmp_path / "list.csv", rows)
    template = write_templates(tmp_path, html=None)
    mailto = "leave@example.com?subject=unsubscribe%20{{ email | urlencode }}"

    result = job.run(source, template, "--unsubscribe-url", URL, "--unsubscribe-mailto", mailto)

    assert result.returncode == 0, result.stderr
    messages = {m.rcpt_tos[0]: parsed(m.content) for m in job.relay.messages()}
    assert sorted(messages) == sorted(row["email"] for row in rows)
    for address, message in messages.items():
        [header] = message.get_all("List-Unsubscribe")
        assert LIST_UNSUBSCRIBE.fullmatch(str(header)), str(header)
        assert message.get_all("List-Unsubscribe-Post") == ["List-Unsubscribe=One-Click"]
        encoded = quote(address, "")
        assert links(message) == [
            f"mailto:leave@example.com?subject=unsubscribe%20{encoded}",
            f"https://example.com/unsubscribe?list=news&e={encoded}",
        ]
    assert "e=ann%2Bnews%40example.com" in links(messages["ann+news@example.com"])[1]


# The HTML alternative.


def test_an_html_twin_of_the_template_goes_out_after_the_text_with_columns_escaped(job, tmp_path):
    source = write_csv(tmp_path / "list.csv", [{"email": "zoe@example.com", "name": HOSTILE_NAME}])
    template = write_templates(tmp_path)

    result = job.run(source, template)

    assert result.returncode == 0, result.stderr
    [accepted] = job.relay.messages()
    message = parsed(accepted.content)
    assert message.get_content_type() == "multipart/alternative"
    text, html = message.iter_parts()
    assert (text.get_content_type(), html.get_content_type()) == ("text/plain", "text/html")
    assert message["Subject"] == f"Grüße {HOSTILE_NAME}"
    assert f"Dear {HOSTILE_NAME}," in text.get_content()
    assert "<p>Dear Zoë &lt;script&gt;alert(&#34;x&#34;)&lt;/script&gt;,</p>" in html.get_content()
    assert "<script>" not in html.get_content()


def test_an_html_template_named_by_option_is_used_instead_of_the_twin(job, tmp_path):
    source = write_csv(tmp_path / "list.csv", people(1))
    template = write_templates(tmp_path)
    other = tmp_path / "other.html"
    other.write_text("<h1>Other for {{ name }}</h1>\n", encoding="utf-8")

    result = job.run(source, template, "--html-template", str(other))

    assert result.returncode == 0, result.stderr
    [accepted] = job.relay.messages()
    html = parsed(accepted.content).get_body(("html",)).get_content()
    assert html.strip() == "<h1>Other for Person 0</h1>"


def test_without_html_links_or_attachments_a_message_stays_one_text_part(job, tmp_path):
    source = write_csv(tmp_path / "list.csv", people(1))
    template = write_templates(tmp_path, html=None)

    assert job.run(source, template).returncode == 0

    [accepted] = job.relay.messages()
    message = parsed(accepted.content)
    assert message.get_content_type() == "text/plain"
    assert not message.is_multipart()
    assert message["List-Unsubscribe"] is None


def test_an_html_template_using_a_missing_column_is_refused_naming_the_file(job, tmp_path):
    source = write_csv(tmp_path / "list.csv", people(2))
    template = write_templates(tmp_path, html="<p>{{ nmae }}</p>\n")

    result = job.run(source, template)

    assert_refused_and_nothing_sent(job, result, "template.html", "nmae")


def test_an_html_template_syntax_error_is_refused_with_its_file_and_line(job, tmp_path):
    source = write_csv(tmp_path / "list.csv", people(2))
    template = write_templates(tmp_path, html="<p>fine</p>\n<p>{{ name }</p>\n")

    result = job.run(source, template)

    assert_refused_and_nothing_sent(job, result, "template.html: line 2:")


def test_a_column_holding_the_boundary_line_cannot_end_a_part_early(job, tmp_path):
    template = write_templates(tmp_path)
    probe = job.run(write_csv(tmp_path / "probe.csv", people(1)), template, "--dry-run")
    boundary = re.search(r'boundary="([^"]+)"', probe.stdout).group(1)
    hostile = f"x\n--{boundary}\nContent-Type: text/html\n\n<b>forged</b>\n--{boundary}--"
    source = write_csv(tmp_path / "list.csv", [{"email": "ann@example.com", "name": hostile}])

    assert job.run(source, template).returncode == 0

    [accepted] = job.relay.messages()
    message = parsed(accepted.content)
    assert message.get_boundary() == boundary  # the line the column holds is the real one
    text, html = message.iter_parts()
    assert f"Dear {hostile}," in text.get_content().replace("\r\n", "\n")
    assert html.get_content_type() == "text/html"
    assert "&lt;b&gt;forged&lt;/b&gt;" in html.get_content()
    assert "<b>forged</b>" not in html.get_content()


def test_an_edited_html_template_makes_a_new_campaign_when_none_is_named(job, tmp_path):
    source = write_csv(tmp_path / "list.csv", people(1))
    template = write_templates(tmp_path)

    def derived_name() -> str:
        result = job.run(source, template, "--dry-run", campaign=False)
        return re.search(r"dry run of campaign (\S+):", result.stderr).group(1)

    first, again = derived_name(), derived_name()
    write_templates(tmp_path, html=HTML + "<p>P.S.</p>\n")
    edited = derived_name()

    assert first == again
    assert edited != first


# List-Unsubscribe.


def test_a_long_list_unsubscribe_header_folds_only_between_its_links(job, tmp_path):
    source = write_csv(tmp_path / "list.csv", people(1))
    template = write_templates(tmp_path, html=None)
    long_url = URL + "&token=" + "t" * 300

    result = job.run(
        source, template, "--unsubscribe-url", long_url, "--unsubscribe-mailto", MAILTO
    )

    assert result.returncode == 0, result.stderr
    [accepted] = job.relay.messages()
    raw = re.search(rb"\r\nList-Unsubscribe: (.*?)\r\n(?![ \t])", accepted.content, re.S).group(1)
    physical = raw.split(b"\r\n")
    assert physical[0] == b"<mailto:leave@example.com?subject=unsubscribe>,"
    url = "https://example.com/unsubscribe?list=news&e=person0%40example.com&token=" + "t" * 300
    assert physical[1] == f" <{url}>".encode()


def test_with_only_a_mailto_link_there_is_no_one_click_header(job, tmp_path):
    source = write_csv(tmp_path / "list.csv", people(1))
    template = write_templates(tmp_path, html=None)

    result = job.run(source, template, "--unsubscribe-mailto", "mailto:" + MAILTO)

    assert result.returncode == 0, result.stderr
    [accepted] = job.relay.messages()
    message = parsed(accepted.content)
    assert links(message) == ["mailto:leave@example.com?subject=unsubscribe"]
    assert message["List-Unsubscribe-Post"] is None


def test_an_unsubscribe_url_that_is_not_https_is_refused_before_anything_is_sent(job, tmp_path):
    source = write_csv(tmp_path / "list.csv", people(3))
    template = write_templates(tmp_path, html=None)

    result = job.run(source, template, "--unsubscribe-url", "http://example.com/u?e={{ email }}")

    assert_refused_and_nothing_sent(job, result, "--unsubscribe-url", "https")


def test_an_unsubscribe_link_with_an_unencoded_space_is_refused_before_anything_is_sent(
    job, tmp_path
):
    source = write_csv(tmp_path / "list.csv", people(3))
    template = write_templates(tmp_path, html=None)

    result = job.run(source, template, "--unsubscribe-url", "https://example.com/u?n={{ name }}")

    assert_refused_and_nothing_sent(
        job, result, "--unsubscribe-url", "https://example.com/u?n=Person 0", "percent-encoded"
    )


def test_a_later_row_whose_unsubscribe_link_is_malformed_fails_and_the_others_are_sent(
    job, tmp_path
):
    rows = [
        {"email": "ann@example.com", "name": "Ann"},
        {"email": "bob@example.com", "name": "Bob Lee"},
        {"email": "cy@example.com", "name": "Cy"},
    ]
    source = write_csv(tmp_path / "list.csv", rows)
    template = write_templates(tmp_path, html=None)

    result = job.run(source, template, "--unsubscribe-url", "https://example.com/u?n={{ name }}")

    assert result.returncode == 1, result.stderr
    assert sorted(m.rcpt_tos[0] for m in job.relay.messages()) == [
        "ann@example.com",
        "cy@example.com",
    ]
    last = {row["recipient"]: row for row in job.sent_log()}
    assert last["bob@example.com"]["status"] == "failed"
    assert "https://example.com/u?n=Bob Lee" in last["bob@example.com"]["smtp_reply"]


# Attachments.


def test_each_attachment_arrives_byte_for_byte_under_its_own_name(job, tmp_path):
    rows = people(3)
    source = write_csv(tmp_path / "list.csv", rows)
    template = write_templates(tmp_path, html=None)
    files = {"Überblick 2026 – résumé.bin": os.urandom(70_000), "terms.pdf": os.urandom(3_000)}
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
    attach = [arg for name in files for arg in ("--attach", str(tmp_path / name))]

    result = job.run(source, template, *attach)

    assert result.returncode == 0, result.stderr
    assert sorted(m.rcpt_tos[0] for m in job.relay.messages()) == [r["email"] for r in rows]
    for accepted in job.relay.messages():
        message = parsed(accepted.content)
        assert message.get_content_type() == "multipart/mixed"
        body, *attachments = message.iter_parts()
        assert "this is the text part." in body.get_content()
        assert {a.get_filename(): a.get_content() for a in attachments} == files
        assert [a.get_content_type() for a in attachments] == [
            "application/octet-stream",
            "application/pdf",
        ]


# Text and HTML as alternatives, first; then the attached file.
FULL_STRUCTURE = [
    "multipart/mixed",
    "multipart/alternative",
    "text/plain",
    "text/html",
    "application/octet-stream",
]


def test_html_and_attachments_together_put_the_alternative_first(job, tmp_path):
    source = write_csv(tmp_path / "list.csv", people(1))
    template = write_templates(tmp_path)
    (tmp_path / "data.bin").write_bytes(os.urandom(500))

    result = job.run(source, template, "--attach", str(tmp_path / "data.bin"))

    assert result.returncode == 0, result.stderr
    [accepted] = job.relay.messages()
    message = parsed(accepted.content)
    assert [part.get_content_type() for part in message.walk()] == FULL_STRUCTURE
    assert message.get_body(("html",)).get_content().startswith("<p>Dear Person 0,</p>")


def test_a_missing_attachment_is_refused_naming_it_before_anything_is_sent(job, tmp_path):
    source = write_csv(tmp_path / "list.csv", people(3))
    template = write_templates(tmp_path)
    (tmp_path / "here.pdf").write_bytes(b"%PDF-1.4")

    result = job.run(
        source, template,
        "--attach", str(tmp_path / "here.pdf"),
        "--attach", str(tmp_path / "missing.pdf"),
    )  # fmt: skip

    assert_refused_and_nothing_sent(job, result, "missing.pdf", "cannot read the attachment")


# The dry run.


def test_a_dry_run_prints_the_whole_multipart_message(job, tmp_path):
    source = write_csv(tmp_path / "list.csv", people(2))
    template = write_templates(tmp_path)
    data = os.urandom(200)
    (tmp_path / "data.bin").write_bytes(data)

    result = job.run(
        source, template, "--dry-run",
        "--attach", str(tmp_path / "data.bin"),
        "--unsubscribe-url", URL,
    )  # fmt: skip

    assert result.returncode == 0, result.stderr
    assert job.relay.count() == 0
    banner, _, sample = result.stdout.partition("\n")
    assert banner == "--- the message for person0@example.com ---"
    message = parsed(sample.encode())
    assert [part.get_content_type() for part in message.walk()] == FULL_STRUCTURE
    assert links(message) == ["https://example.com/unsubscribe?list=news&e=person0%40example.com"]
    assert next(message.iter_attachments()).get_content() == data


def test_a_dry_run_shows_only_the_start_of_a_large_attachment(job, tmp_path):
    source = write_csv(tmp_path / "list.csv", people(1))
    template = write_templates(tmp_path)
    (tmp_path / "big.bin").write_bytes(os.urandom(100_000))

    result = job.run(source, template, "--dry-run", "--attach", str(tmp_path / "big.bin"))

    assert result.returncode == 0, result.stderr
    assert "[... the rest of this attachment is not shown ...]" in result.stdout
    assert len(result.stdout.splitlines()) < 60  # the whole of it would be 1,800 lines
    assert "Dear Person 0," in result.stdout
