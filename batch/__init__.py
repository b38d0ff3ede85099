"""A mass-mail batch sender that mails every recipient of a list exactly once."""
