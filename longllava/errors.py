"""One exception family for bad user input across the suite.

Every package raises a subclass of :class:`UserInputError` for input a user can fix (a missing
file, a corrupt study, an unknown preset). The message names the path or value, what is wrong and
what to do. The CLI prints it as one line and exits with code 2; apps show it in the page.
"""

from __future__ import annotations


class UserInputError(Exception):
    """Bad input that the user can fix. The message is shown verbatim, without a traceback."""


class ModelInputError(UserInputError):
    """Bad model folder, config, checkpoint or prompt given to the model core."""
