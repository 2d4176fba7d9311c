"""The panel's wording (``COVIDInfectionSegLib.panel``), driven by real background processes."""

from __future__ import annotations

import sys

from COVIDInfectionSegLib import panel
from COVIDInfectionSegLib.process import CommandProcess


def run(code: str) -> CommandProcess:
    process = CommandProcess([sys.executable, "-c", code])
    process.start()
    return process


def test_progress_line_shows_stage_then_time_left():
    process = run("import sys, time; print('PROGRESS 0.5000 Infection model', flush=True); time.sleep(30)")
    try:
        assert panel.progress_text(process) == "Starting..."
        while process.stage == "":
            process.poll()
        text = panel.progress_text(process)
        assert text.startswith("Infection model - about ") and text.endswith(" s left")
    finally:
        process.cancel()
    assert panel.status_text(process) == "Cancelled; the scene was not changed."


def test_fine_tuning_summary_is_its_last_output_line():
    process = run("print('PROGRESS 0.5 Training'); print('held-out Dice 0.648 -> 0.690; now the default')")
    assert process.wait(timeout_s=60) == "succeeded"
    assert panel.status_text(process) == "held-out Dice 0.648 -> 0.690; now the default"


def test_failure_names_the_error_line():
    process = run("import sys; print('relseg: error: the input is not a CT', file=sys.stderr); sys.exit(2)")
    assert process.wait(timeout_s=60) == "failed"
    assert panel.status_text(process) == "Failed: relseg: error: the input is not a CT"


def test_result_rows_and_model_line():
    measurement = {
        "lungs": {"left_ml": 2100.04, "right_ml": 2400.0, "total_ml": 4500.04},
        "infection": {"left_ml": 210.0, "right_ml": 0.0, "total_ml": 210.0, "classes": {
            "Ground-glass opacity": {"left_ml": 150.0, "right_ml": 0.0, "total_ml": 150.0},
            "Consolidation": {"left_ml": 60.0, "right_ml": 0.0, "total_ml": 60.0}}},
        "percent_opacity": {"left": 10.0, "right": 0.0, "overall": 4.666},
        "percent_high_opacity": {"left": 2.857, "right": 0.0, "overall": 1.333},
    }
    assert panel.result_rows(measurement) == [
        ("Left lung", ["2100.0", "210.0", "10.0", "2.9"]),
        ("Right lung", ["2400.0", "0.0", "0.0", "0.0"]),
        ("Both lungs", ["4500.0", "210.0", "4.7", "1.3"]),
        ("Ground-glass opacity", ["", "150.0", "3.3", ""]),  # its share of both lungs; no PHO of its own
        ("Consolidation", ["", "60.0", "1.3", ""]),
    ]
    report = {"model": {"name": "covid-infection-2d", "version": "1.0.0"}, "device": "cpu"}
    assert panel.model_info_text(report) == "Model covid-infection-2d 1.0.0 on cpu"
    assert panel.model_info_text(None) == "Model ? on ?"
    report["warnings"] = ["No left lung was found, so its percentage is not given."]
    assert panel.model_info_text(report) == ("Model covid-infection-2d 1.0.0 on cpu\n"
                                             "Warning: No left lung was found, so its percentage is not given.")


def test_model_line_says_which_lungs_the_numbers_are_divided_by():
    report = {"model": {"name": "covid-infection-2d", "version": "2.0.0"}, "device": "cpu",
              "lungs_method": "covid-lungs-2d 1.0.0"}
    assert panel.model_info_text(report) == "Model covid-infection-2d 2.0.0 on cpu\nLungs: covid-lungs-2d 1.0.0"
    report["engine"] = "openvino"
    assert panel.model_info_text(report).startswith("Model covid-infection-2d 2.0.0 on cpu (openvino)\n")


def test_model_line_gives_the_cts_noise_before_the_warnings():
    report = {"model": {"name": "covid-infection-2d", "version": "2.4.0"}, "device": "cpu", "noise_hu": 41.3,
              "warnings": ["This CT is noisier (41 HU) than those the model learned from (23-25 HU)."]}
    assert panel.model_info_text(report) == ("Model covid-infection-2d 2.4.0 on cpu\nCT noise: 41 HU\n"
                                             "Warning: This CT is noisier (41 HU) than those the model learned from "
                                             "(23-25 HU).")
