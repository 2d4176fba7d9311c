"""Colours and standard terminology of the result segments, from ``relsegcore.terminology``.

relsegcore is imported lazily: the module must load in Slicer before it is installed.
"""

from __future__ import annotations


def definitions_by_label(class_names: list[str]) -> tuple[dict, dict]:
    """(lung definitions, infection definitions), each keyed by label value 1..n."""
    from relsegcore import terminology

    lungs = dict(enumerate(terminology.lung_definitions(), start=1))
    infection = dict(enumerate(terminology.infection_definitions(class_names), start=1))
    return lungs, infection


def apply_definition(segment, definition) -> None:
    """Set a segment's colour and its ``TerminologyEntry`` tag (what Slicer and DICOM SEG export read)."""
    segment.SetColor(*definition.color)
    if hasattr(segment, "SetTerminology"):
        segment.SetTerminology(definition.terminology_entry)
    else:  # Slicer before 5.8
        segment.SetTag(segment.GetTerminologyEntryTagName(), definition.terminology_entry)


def load_into_slicer() -> None:
    """Register relseg.term.json with Slicer's terminology logic so the Segment Editor lists its entries."""
    import slicer

    terminologies = getattr(slicer.modules, "terminologies", None)
    if terminologies is None:
        return
    from relsegcore.terminology import terminology_path

    terminologies.logic().LoadTerminologyFromFile(terminology_path())
