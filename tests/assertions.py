"""Assertions shared by the tests."""

import pytest


def one_line_error(match: str, fn, *args, exception: type = ValueError, **kwargs) -> str:
    """Call ``fn``, expect ``exception`` matching ``match`` with a one-line message, and return the message."""
    with pytest.raises(exception, match=match) as info:
        fn(*args, **kwargs)
    message = str(info.value)
    assert "\n" not in message
    return message
