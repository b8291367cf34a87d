"""Remote sensing: giant rasters as LongLLaVA sub-image grids, georeferenced answers, FIT-RS data.

``raster`` (windowed RGB reads, one stretch), ``tiling`` (thumbnail + row-major tiles under a tile
budget), ``georef`` (answers -> GeoJSON), ``datasets`` (FIT-RS / FIT-RSFG-Bench), ``metrics``
(official FIT-RSFG scores), ``inspect`` (``longllava inspect --geotiff``). Uses only
``longllava.protocol`` and ``longllava.errors`` from the core.
"""
