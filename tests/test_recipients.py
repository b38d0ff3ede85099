"""Turning list rows into distinct, valid recipients, and the reasons rows are refused."""

import itertools

import pytest

from batch.errors import SourceError
from batch.recipients import Recipient, RecipientList, Rejection, normalise
from batch.source import Row, read_rows


def rows(*addresses: str, column: str = "email") -> list[Row]:
    """Return rows numbered from 2, as in a CSV file, each with an address and a name."""
    return [
        Row(number, {column: address, "name": f"Person {number}"})
        for number, address in enumerate(addresses, start=2)
    ]


def rejections(*addresses: str, **options: object) -> list[Rejection]:
    """Run addresses through a RecipientList and return what it refused."""
    recipients = RecipientList(rows(*addresses), source="list.csv", **options)
    list(recipients)
    return recipients.rejections


def test_valid_addresses_come_out_normalised_with_their_row_fields_and_place_in_the_list():
    listed = rows(" Ann@Example.COM ", "not an address", "ann@example.com", "bob@example.com")

    recipients = list(RecipientList(listed, source="list.csv"))

    # --limit counts places: a refused row and a duplicate take none.
    assert recipients == [
        Recipient("ann@example.com", 2, {"email": " Ann@Example.COM ", "name": "Person 2"}, 1),
        Recipient("bob@example.com", 5, {"email": "bob@example.com", "name": "Person 5"}, 2),
    ]


def test_a_second_occurrence_is_rejected_as_a_duplicate_of_the_first_row():
    recipients = RecipientList(
        rows("ann@example.com", "bob@example.com", "ANN@example.com ", "ann@example.com"),
        source="list.csv",
    )

    addresses = [recipient.address for recipient in recipients]

    assert addresses == ["ann@example.com", "bob@example.com"]
    assert recipients.rejections == [
        Rejection(4, "ANN@example.com ", "duplicate of row 2"),
        Rejection(5, "ann@example.com", "duplicate of row 2"),
    ]


def test_one_mailbox_written_with_its_domain_in_unicode_and_in_ascii_is_one_recipient():
    recipients = RecipientList(
        rows("ann@bücher.example", "Ann@XN--BCHER-KVA.example", "bob@bücher.example"),
        source="list.csv",
    )

    addresses = [recipient.address for recipient in recipients]

    # Both forms reach RCPT TO:<ann@xn--bcher-kva.example>: one message, not two.
    assert addresses == ["ann@bücher.example", "bob@bücher.example"]
    assert recipients.rejections == [
        Rejection(3, "Ann@XN--BCHER-KVA.example", "duplicate of row 2"),
    ]


@pytest.mark.parametrize("value", ["", "   ", "\t"])
def test_an_empty_cell_is_rejected_as_an_empty_address(value):
    assert rejections(value) == [Rejection(2, value, "empty address")]


@pytest.mark.parametrize(
    ("value", "reason"),
    [
        ("ann.example.com", "An email address must have an @-sign."),
        ("ann@example", "The part after the @-sign is not valid. It should have a period."),
        (
            "ann smith@example.com",
            "The email address contains invalid characters before the @-sign: SPACE.",
        ),
        (
            "Ann <ann@example.com>",
            "A display name and angle brackets around the email address are not permitted here.",
        ),
        (
            "a" * 65 + "@example.com",
            "The email address is too long before the @-sign (1 character too many).",
        ),
    ],
)
def test_an_invalid_address_is_rejected_with_the_validators_reason(value, reason):
    assert rejections(value) == [Rejection(2, value, f"not a valid address: {reason}")]


def test_a_local_part_of_64_characters_is_still_accepted():
    address = "a" * 64 + "@example.com"

    assert [r.address for r in RecipientList(rows(address), source="list.csv")] == [address]


@pytest.mark.parametrize(
    "value", ["ann@example.com\n", "\r\nann@example.com", "ann@example.com\nBcc: x@example.com"]
)
def test_a_line_break_in_the_cell_is_rejected(value):
    reason = "contains a line break: put one address per cell, on one line"

    assert rejections(value) == [Rejection(2, value, reason)]


@pytest.mark.parametrize(
    "value",
    ["ann@example.com, bob@example.com", "ann@example.com;bob@example.com", "ann@x.org bob@x.org"],
)
def test_two_addresses_in_one_cell_are_rejected_as_more_than_one(value):
    assert rejections(value) == [
        Rejection(2, value, "more than one address: put one address per row")
    ]


def test_an_international_address_is_accepted_unless_smtputf8_is_off():
    address = "jörg@bücher.example"

    accepted = list(RecipientList(rows(address), source="list.csv"))

    assert [r.address for r in accepted] == [address]
    assert rejections(address, allow_smtputf8=False) == [
        Rejection(
            2,
            address,
            "not a valid address: Internationalized characters before the @-sign are not "
            "supported: 'ö'.",
        )
    ]


def test_the_address_column_is_found_without_regard_to_case_or_spaces():
    recipients = RecipientList(
        rows("ann@example.com", column="E-Mail"), source="list.csv", email_column=" e-mail "
    )

    assert [r.address for r in recipients] == ["ann@example.com"]


def test_a_missing_address_column_is_refused_naming_the_columns_found():
    recipients = RecipientList(rows("ann@example.com", column="mail"), source="list.csv")

    with pytest.raises(SourceError) as raised:
        list(recipients)

    assert str(raised.value) == (
        "list.csv: no address column 'email' (columns found: mail, name): use --email-column"
    )


def test_two_columns_that_both_match_the_address_column_are_refused():
    row = Row(2, {"Email": "ann@example.com", "email": "bob@example.com"})

    with pytest.raises(SourceError) as raised:
        list(RecipientList([row], source="list.csv"))

    assert str(raised.value) == (
        "list.csv: more than one address column matches 'email' (Email, email): rename all but one"
    )


def test_a_list_without_rows_yields_nothing_and_raises_nothing():
    recipients = RecipientList([], source="list.csv", email_column="nowhere")

    assert list(recipients) == []
    assert recipients.seen == 0
    assert recipients.rejections == []


def test_seen_counts_every_row_read_including_the_rejected_ones():
    recipients = RecipientList(rows("ann@example.com", "", "ann@example.com"), source="list.csv")

    list(recipients)

    assert recipients.seen == 3
    assert len(recipients.rejections) == 2


def test_rows_are_read_only_as_recipients_are_asked_for():
    def endless():
        number = 1
        while True:
            number += 1
            yield Row(number, {"email": f"user{number}@example.com"})

    recipients = RecipientList(endless(), source="list.csv")
    first_two = list(itertools.islice(recipients, 2))

    assert [r.row for r in first_two] == [2, 3]
    assert recipients.seen == 2


def test_a_recipient_list_can_be_iterated_only_once():
    recipients = RecipientList(rows("ann@example.com"), source="list.csv")
    list(recipients)

    with pytest.raises(RuntimeError):
        list(recipients)


def test_normalise_strips_and_lower_cases():
    assert normalise("  Ann.Smith@Example.COM\t") == "ann.smith@example.com"


def test_a_csv_list_becomes_recipients_and_rejections(tmp_path):
    path = tmp_path / "list.csv"
    path.write_text(
        "Name;E-mail\nAnn;ann@example.com\n\nBob;bob@example\nAnn again;ANN@example.com\n",
        encoding="utf-8",
    )

    recipients = RecipientList(read_rows(path), source=str(path), email_column="e-mail")

    assert [(r.address, r.row, r.fields["Name"]) for r in recipients] == [
        ("ann@example.com", 2, "Ann")
    ]
    assert recipients.rejections == [
        Rejection(
            4,
            "bob@example",
            "not a valid address: The part after the @-sign is not valid. "
            "It should have a period.",
        ),
        Rejection(5, "ANN@example.com", "duplicate of row 2"),
    ]
