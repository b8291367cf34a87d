"""The one bad-input exception of the synthetic generators."""

from __future__ import annotations

from longllava.errors import UserInputError


class SyntheticDataError(UserInputError, ValueError):
    """A generator was asked for something it cannot render (unknown finding, bad size, ...).

    Also a :class:`ValueError`, so callers that validate arguments generically still catch it.
    """
