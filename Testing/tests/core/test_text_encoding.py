"""Text files are UTF-8 whatever the host's locale: Slicer on Windows reads with cp1252 by default, and a DICOM
writer can leave a process in the ASCII "C" locale."""

from __future__ import annotations

import json
import locale
import shutil

import pytest

from relsegcore import zoo
from relsegcore.data.ctseg import read_cases_csv


@pytest.fixture
def ascii_locale():
    locale.setlocale(locale.LC_ALL, "C")  # conftest puts the test's locale back
    if locale.getpreferredencoding(False).lower().replace("-", "") == "utf8":
        pytest.skip("this platform's C locale is UTF-8 already")


def test_a_card_with_a_sites_accented_description_loads_in_an_ascii_locale(tmp_path, ascii_locale):
    shipped = zoo.find_model("covid-infection-2d")
    card = json.loads(shipped.path.with_suffix(".json").read_text(encoding="utf-8"))
    card["description"] = "fine-tuned at Universitätsklinikum Köln, Dice 0.71 ± 0.05"
    (tmp_path / "site.json").write_text(json.dumps(card, ensure_ascii=False), encoding="utf-8")
    shutil.copy(shipped.path, tmp_path / card["file"])
    assert zoo.read_card(tmp_path / "site.json").description.endswith("Köln, Dice 0.71 ± 0.05")


def test_cases_csv_saved_by_a_spreadsheet_with_a_byte_order_mark_is_read(tmp_path, ascii_locale):
    (tmp_path / "cases.csv").write_text("file,case,source,order_in_case\n0000.png,zürich_001,site,0\n",
                                        encoding="utf-8-sig")
    rows = read_cases_csv(tmp_path)
    assert rows[0]["file"] == "0000.png" and rows[0]["case"] == "zürich_001"
