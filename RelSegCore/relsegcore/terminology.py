"""Segment names, colours and standard terminology for the lungs and the infection classes.

``relseg.term.json`` (Slicer's segmentation-category-and-type JSON format, loadable with
``slicer.modules.terminologies.logic().LoadTerminologyFromFile``) is the single source of
the codes and colours; this module reads it and serialises each segment's terminology as
Slicer stores it in the ``TerminologyEntry`` tag of a ``.seg.nrrd``::

    context~category~type~typeModifier~anatomicContext~anatomicRegion~regionModifier

with each coded item written ``scheme^value^meaning``. Ground-glass opacity has no concept
in Slicer's lists; it is coded with RadLex (RID28531) and consolidation with SNOMED CT
95436008 "Lung consolidation". Infection findings carry the anatomic region Lung.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from functools import cache
from importlib import resources

TERMINOLOGY_FILE = "relseg.term.json"
ANATOMIC_CONTEXT = "Anatomic codes - DICOM master list"
LUNG_REGION = ("SCT", "39607008", "Lung")

# Segment key -> (the type's 3dSlicerLabel in relseg.term.json, segment name shown to users).
_SEGMENTS = {
    "left_lung": ("left lung", "Left lung"),
    "right_lung": ("right lung", "Right lung"),
    "infection": ("infection", "Infection"),
    "ground_glass": ("ground-glass opacity", "Ground-glass opacity"),
    "consolidation": ("consolidation", "Consolidation"),
}
# Normalised spellings a model card may use for its class names.
_ALIASES = {
    "leftlung": "left_lung",
    "rightlung": "right_lung",
    "infection": "infection",
    "lesion": "infection",
    "opacity": "infection",
    "inflammation": "infection",
    "groundglass": "ground_glass",
    "groundglassopacity": "ground_glass",
    "ggo": "ground_glass",
    "consolidation": "consolidation",
    "lungconsolidation": "consolidation",
}

Code = tuple[str, str, str]  # (coding scheme designator, code value, code meaning)


@dataclass(frozen=True)
class SegmentDefinition:
    """What a segment is: a stable key, a display name, a colour (0..1 RGB) and its codes."""

    key: str
    name: str
    color: tuple[float, float, float]
    context: str
    category: Code
    type: Code
    anatomic_region: Code | None = None

    @property
    def terminology_entry(self) -> str:
        """The value of the ``TerminologyEntry`` segment tag, as Slicer 5 writes it."""
        region = self.anatomic_region or ("", "", "")
        anatomic_context = ANATOMIC_CONTEXT if self.anatomic_region else ""
        items = [self.context, self.category, self.type, ("", "", ""), anatomic_context, region, ("", "", "")]
        return "~".join(item if isinstance(item, str) else "^".join(item) for item in items)


def terminology_path() -> str:
    """Path of the shipped terminology JSON (for Slicer's terminology logic)."""
    return str(resources.files(__package__) / TERMINOLOGY_FILE)


@cache
def _definitions() -> dict[str, SegmentDefinition]:
    data = json.loads((resources.files(__package__) / TERMINOLOGY_FILE).read_text(encoding="utf-8"))
    context = data["SegmentationCategoryTypeContextName"]
    by_label = {}
    for category in data["SegmentationCodes"]["Category"]:
        for entry in category["Type"]:
            by_label[entry["3dSlicerLabel"]] = (category, entry)
    definitions = {}
    for key, (slicer_label, name) in _SEGMENTS.items():
        category, entry = by_label[slicer_label]
        definitions[key] = SegmentDefinition(
            key=key,
            name=name,
            color=tuple(round(c / 255, 6) for c in entry["recommendedDisplayRGBValue"]),
            context=context,
            category=_code(category),
            type=_code(entry),
            anatomic_region=LUNG_REGION if category.get("showAnatomy") else None,
        )
    return definitions


def _code(item: dict) -> Code:
    return (item["CodingSchemeDesignator"], item["CodeValue"], item["CodeMeaning"])


def segment_definition(key: str) -> SegmentDefinition:
    """Definition by key: ``left_lung``, ``right_lung``, ``infection``, ``ground_glass``, ``consolidation``."""
    return _definitions()[key]


def lung_definitions() -> list[SegmentDefinition]:
    """Left lung (label 1) and right lung (label 2), in label order."""
    return [segment_definition("left_lung"), segment_definition("right_lung")]


def infection_definitions(class_names: list[str]) -> list[SegmentDefinition]:
    """Definitions for infection labels 1..n, from a model's class names.

    A leading ``background`` is dropped. Known spellings (``infection``, ``ground-glass
    opacity``, ``GGO``, ``consolidation`` ...) map to the shipped definitions; any other name
    keeps its own text as the segment name, with the generic infection codes and colour.
    """
    names = list(class_names)
    if names and _normalise(names[0]) == "background":
        names = names[1:]
    return [_infection_definition(name) for name in names]


def _infection_definition(class_name: str) -> SegmentDefinition:
    key = _ALIASES.get(_normalise(class_name))
    if key is not None and key not in ("left_lung", "right_lung"):
        return segment_definition(key)
    generic = segment_definition("infection")
    return SegmentDefinition(
        key=re.sub(r"[^a-z0-9]+", "_", class_name.lower()).strip("_") or "infection",
        name=class_name,
        color=generic.color,
        context=generic.context,
        category=generic.category,
        type=generic.type,
        anatomic_region=generic.anatomic_region,
    )


def _normalise(name: str) -> str:
    return re.sub(r"[^a-z0-9]", "", name.lower())
