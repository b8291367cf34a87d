"""Bad-input errors of the remote-sensing package.

Every message names the file or value, says what is wrong and what to do. All subclass
:class:`longllava.errors.UserInputError`, so the CLI prints them as one line (exit code 2) and the
apps show them in the page.
"""

from __future__ import annotations

from longllava.errors import UserInputError


class RemoteSensingInputError(UserInputError):
    """Bad input given to ``domain_data.remote_sensing`` (base of the package's errors)."""


class RasterInputError(RemoteSensingInputError):
    """A raster (GeoTIFF/COG, PNG, JPEG) that cannot be opened, read or tiled as asked."""


class DatasetInputError(RemoteSensingInputError):
    """A FIT-RS / FIT-RSFG annotation file, answers file or image folder that cannot be used."""
