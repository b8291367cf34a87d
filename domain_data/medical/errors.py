"""Bad-input errors of the medical domain (both are :class:`longllava.errors.UserInputError`)."""

from __future__ import annotations

from longllava.errors import UserInputError


class CTInputError(UserInputError):
    """A CT study (NIfTI file, DICOM folder or .zip) that cannot be loaded as given.

    The message names the file or folder, what is wrong and what to do. It never contains patient
    identifiers (name, ID, birth date, accession number, institution).
    """


class MedicalDatasetError(UserInputError):
    """A medical dataset (CT-RATE, PubMedVision, VQA-RAD/PathVQA/SLAKE) with a missing or malformed file."""
