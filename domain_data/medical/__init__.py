"""Medical domain: CT studies -> HU volumes -> ordered slice images, medical datasets and metrics.

Modules: ``ct`` (load_ct, CTVolume), ``dicom`` (series reading, safe zip), ``windows``, ``slices``
(ct_to_slices, montage), ``inspect`` (``longllava inspect --ct``), ``ct_rate``, ``pubmedvision``,
``closed_vqa`` (datasets; re-exported by ``datasets``), ``metrics``, ``errors`` (CTInputError,
MedicalDatasetError). Seeded DICOM/NIfTI test studies come from ``domain_data.synthetic``.
Uses only ``longllava.protocol`` and ``longllava.errors`` from the model core.
"""
