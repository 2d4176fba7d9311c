"""relsegcore: dual-encoder COVID-19 lung infection segmentation (Zhang et al., IEEE JBHI 2021).

Public API (one code path for the CLI, the Python API and the Slicer module)::

    import relsegcore
    result = relsegcore.segment(sitk_image)          # lungs, infection, report
    lungs = relsegcore.segment_lungs(sitk_image)     # 1 left lung, 2 right lung
"""

from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["__version__", "segment", "segment_lungs", "SegmentationResult"]


def __getattr__(name: str):
    # Lazy imports keep ``import relsegcore`` fast and torch-free until needed.
    if name in ("segment", "SegmentationResult"):
        from . import pipeline

        return getattr(pipeline, name)
    if name == "segment_lungs":
        from .pipeline import segment_lungs

        return segment_lungs
    raise AttributeError(name)
