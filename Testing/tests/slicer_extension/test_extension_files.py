"""The extension's build files: every file the CMake lists name exists; the catalog entry is complete."""

from __future__ import annotations

import json
import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[3]
MODULE = REPO / "COVIDInfectionSeg"


def cmake_sets(path: Path) -> dict[str, list[str]]:
    """``set(NAME value ...)`` blocks of a CMake file, values split on whitespace (quotes kept whole)."""
    text = re.sub(r"(?m)(^|\s)#[^\"\n]*$", "", path.read_text())  # comments, not the '#' inside URLs
    return {
        match.group(1): re.findall(r'"[^"]*"|\S+', match.group(2))
        for match in re.finditer(r"\bset\(\s*(\w+)\s+(.*?)\)", text, re.S)
    }


def expand(value: str, variables: dict[str, str]) -> str:
    return re.sub(r"\$\{(\w+)\}", lambda m: variables[m.group(1)], value.strip('"'))


def test_module_cmake_names_existing_scripts_and_resources():
    sets = cmake_sets(MODULE / "CMakeLists.txt")
    variables = {"MODULE_NAME": sets["MODULE_NAME"][0], "PROJECT_SOURCE_DIR": str(REPO)}
    listed = [expand(v, variables) for v in sets["MODULE_PYTHON_SCRIPTS"] + sets["MODULE_PYTHON_RESOURCES"]]
    missing = [name for name in listed if not (MODULE / name).is_file()]
    assert not missing
    # Every Python file of the Lib package is listed, so nothing is left out of the installed module.
    lib_files = {f"COVIDInfectionSegLib/{p.name}" for p in (MODULE / "COVIDInfectionSegLib").glob("*.py")}
    assert lib_files <= set(listed)
    assert "COVIDInfectionSeg.py" in listed and "Resources/UI/COVIDInfectionSeg.ui" in listed
    for folder in ("RELSEGCORE_SOURCE_DIR", "SHIPPED_MODELS_DIR"):
        assert Path(expand(sets[folder][0], variables)).is_dir(), folder
    assert (Path(expand(sets["RELSEGCORE_SOURCE_DIR"][0], variables)) / "pyproject.toml").is_file()
    text = (MODULE / "CMakeLists.txt").read_text()
    assert "WITH_GENERIC_TESTS" in text and "slicer_add_python_unittest(SCRIPT ${MODULE_NAME}.py)" in text


def test_top_level_cmake_metadata():
    sets = cmake_sets(REPO / "CMakeLists.txt")
    for field in ("HOMEPAGE", "CATEGORY", "CONTRIBUTORS", "DESCRIPTION", "ICONURL", "SCREENSHOTURLS", "DEPENDS"):
        assert sets.get(f"EXTENSION_{field}"), field
    assert sets["EXTENSION_CATEGORY"] == ['"Segmentation"']
    assert sets["EXTENSION_DEPENDS"] == ['"PyTorch"']
    # Icon and screenshot URLs point at files committed in this repository.
    urls = " ".join(sets["EXTENSION_ICONURL"] + sets["EXTENSION_SCREENSHOTURLS"]).strip('"').replace('"', "").split()
    for url in urls:
        relative = url.split("/main/", 1)[1]
        assert (REPO / relative).is_file(), relative
    text = (REPO / "CMakeLists.txt").read_text()
    for line in ("find_package(Slicer REQUIRED)", "add_subdirectory(COVIDInfectionSeg)",
                 "include(${Slicer_EXTENSION_GENERATE_CONFIG})", "include(${Slicer_EXTENSION_CPACK})"):
        assert line in text


def test_extensions_index_entry():
    entry = json.loads((REPO / "COVIDInfectionSeg.json").read_text())
    required = {"$schema", "scm_url", "scm_revision", "build_subdirectory", "build_dependencies", "category", "tier"}
    assert required <= entry.keys()
    assert entry["build_dependencies"] == ["PyTorch"]
    assert entry["category"] == "Segmentation"
    assert entry["scm_url"].startswith("https://") and entry["scm_url"].endswith(".git")
    assert (REPO / entry["build_subdirectory"] / "CMakeLists.txt").is_file()
