"""The report people look at: case pictures, headline, sortable tables, ROC bands, confusion matrices.

The HTML is checked in headless Chromium (rendered, its images decoded, its tables compared with
report.json); those tests skip where ``chromium`` is not installed (``.ci/run`` installs it).
"""

from __future__ import annotations

import json
import math
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest

from orthodiff_nnunet.evaluation.figures import (
    CaseScore,
    best_median_worst,
    confusion_counts,
    pick_slices,
    plot_case_overlay,
    roc_points,
    slice_view,
)
from orthodiff_nnunet.evaluation.report import _cls_table, _seg_table, _text, build_report

IDENTITY = (1, 0, 0, 0, 1, 0, 0, 0, 1)
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
needs_chromium = pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (Debian: apt-get install "
                                                             "chromium; .ci/run installs it): HTML not rendered")


# ----------------------------------------------------------------------------------------------
# slices, orientation, aspect


def test_slice_view_display_orientation_known_answers():
    # LPS identity grid: array (z, y, x) runs S, P, L
    ax = slice_view(IDENTITY, (0.5, 0.6, 3.0), "ax")
    assert (ax.axis, ax.rows_axis, ax.cols_axis) == (0, 1, 2)
    assert ax.letters == {"top": "A", "bottom": "P", "left": "R", "right": "L"}  # radiological, anterior up
    sag = slice_view(IDENTITY, (3.0, 0.5, 0.6), "sag")
    assert (sag.axis, sag.rows_axis, sag.cols_axis, sag.flip_rows, sag.flip_cols) == (2, 0, 1, True, False)
    assert sag.letters == {"top": "S", "bottom": "I", "left": "A", "right": "P"}
    cor = slice_view(IDENTITY, (0.5, 3.0, 0.6), "cor")
    assert (cor.axis, cor.rows_axis, cor.cols_axis) == (1, 0, 2)
    assert cor.letters == {"top": "S", "bottom": "I", "left": "R", "right": "L"}
    # a grid stored the other way round (x runs to R, y to A): columns and rows are flipped back
    ras = slice_view((-1, 0, 0, 0, -1, 0, 0, 0, 1), (0.5, 0.5, 3.0), "ax")
    assert (ras.flip_rows, ras.flip_cols) == (True, True)
    assert ras.letters == {"top": "A", "bottom": "P", "left": "R", "right": "L"}
    # the displayed slice follows the flips: element [z, y, x] = 100 y + x
    vol = (100 * np.arange(4)[None, :, None] + np.arange(5)[None, None, :]).repeat(3, axis=0)
    assert ras.cut(vol, 1)[0, 0] == 100 * 3 + 4  # top-left is the last y (most anterior), last x (most right)
    assert sag.cut(np.arange(60).reshape(3, 4, 5), 2).shape == (3, 4)  # rows z, columns y
    # unknown orientation: the coarsest axis is the slice axis
    assert slice_view(IDENTITY, (0.5, 0.5, 4.0), None).axis == 0


def test_extent_keeps_physical_aspect():
    view = slice_view(IDENTITY, (1.0, 2.0, 5.0), "ax")  # rows (y) 2 mm, columns (x) 1 mm
    left, right, bottom, top = view.extent_mm((20, 40))
    assert (right - left, bottom - top) == (40.0, 40.0)  # 20 rows x 2 mm = 40 columns x 1 mm: a square


def test_pick_slices_go_through_the_structures():
    ref = np.zeros((10, 8, 8), np.uint8)
    ref[4:7, 2:5, 2:5] = 1  # slices 4, 5, 6 along axis 0
    pred = np.zeros_like(ref)
    assert pick_slices([ref, pred], axis=0, n=3) == [4, 5, 6]
    assert pick_slices([pred], axis=0) == [5]  # nothing segmented: the middle slice
    pred[8, 0, 0] = 2
    assert set(pick_slices([ref, pred], axis=0, n=3)) <= {4, 5, 6, 8}


def test_case_overlay_names_the_slices(tmp_path):
    import SimpleITK as sitk

    vol = np.zeros((30, 30, 12), np.uint8)  # z, y, x: a sagittal stack of 12 slices along x
    vol[8:20, 10:22, 3:9] = 1
    vol[22:26, 5:25, 2:10] = 2
    files = {}
    for name, arr in (("img", vol * 50.0 + 10), ("ref", vol), ("pred", np.roll(vol, 2, axis=0))):
        im = sitk.GetImageFromArray(arr.astype(np.float32 if name == "img" else np.uint8))
        im.SetSpacing((3.5, 0.9, 0.9))
        files[name] = tmp_path / f"{name}.nii.gz"
        sitk.WriteImage(im, str(files[name]))
    info = plot_case_overlay(files["img"], files["ref"], files["pred"], {"femur": 1, "tibia": 2}, "sag",
                             tmp_path / "case.png", "worst case")
    assert info["plane"] == "sagittal" and info["axis"] == 2 and info["n"] == 12
    assert info["slices"] and all(2 <= s <= 9 for s in info["slices"])
    assert info["spacing_mm"] == pytest.approx([0.9, 0.9])
    assert (tmp_path / "case.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# ----------------------------------------------------------------------------------------------
# selection, resampling, counts, undefined values


def _score(case, d):
    return CaseScore(case, "sag", "S", d, 1, [])


def test_best_median_worst_known_answer():
    scores = [_score("a", 0.5), _score("b", 0.9), _score("c", 0.1), _score("d", None), _score("e", 0.7)]
    picks = [(rank, s.case) for rank, s in best_median_worst(scores)]
    assert picks == [("best", "b"), ("median", "a"), ("worst", "c")]  # d has no Dice: not ranked
    assert [(r, s.case) for r, s in best_median_worst(scores[:2])] == [("best", "b"), ("worst", "a")]
    assert [(r, s.case) for r, s in best_median_worst(scores[:1])] == [("only", "a")]


def test_roc_points_equal_scikit_learn():
    from sklearn.metrics import roc_curve

    rng = np.random.default_rng(4)
    for _ in range(20):
        y = (rng.random(40) < 0.3).astype(float)
        y[:2] = (0, 1)
        s = np.round(rng.random(40), 1)  # many ties
        fpr, tpr = roc_points(y, s)
        f_ref, t_ref, _ = roc_curve(y, s, drop_intermediate=False)
        np.testing.assert_allclose(fpr, f_ref)
        np.testing.assert_allclose(tpr, t_ref)


def test_confusion_counts_known_answer():
    y = np.array([[1], [1], [0], [0], [np.nan], [1]], dtype=float)
    p = np.array([[0.9], [0.2], [0.6], [0.1], [0.8], [0.5]])
    c = confusion_counts(y, p, ["ACL"], {"ACL": 0.5})["ACL"]
    assert (c["tp"], c["fn"], c["fp"], c["tn"], c["unknown"]) == (2, 1, 1, 1, 1)  # p = 0.5 counts as positive


def test_undefined_metrics_render_na_with_reason():
    metrics = {"labels": [
        {"name": "PD", "n": 30, "n_pos": 0, "threshold": 0.5, "auroc": None, "auprc": float("nan"),
         "sensitivity": "undefined", "specificity": 0.9, "ci": {"specificity": [0.8, 0.97]}},
        {"name": "ACL", "n": 30, "n_pos": 9, "threshold": 0.4, "auroc": {"value": None, "reason": "ties only"},
         "auprc": 0.5, "sensitivity": 0.6, "specificity": 0.7, "ci": {"auprc": None}, "ci_valid": {"auprc": 40}},
    ], "macro": {"auroc": None, "auprc": 0.5, "sensitivity": 0.6, "specificity": 0.8}, "macro_ci": {}, "n_exams": 30,
        "n_boot": 200}
    rows = [[_text(c) for c in r] for r in _cls_table(metrics)]
    assert rows[1][3:] == ["n/a (no positive exam)", "n/a (no positive exam)", "n/a (no positive exam)",
                           "0.900 [0.800, 0.970]"]
    assert rows[2][3] == "n/a (ties only)"
    assert rows[2][4] == "0.500 [n/a, n/a] (CI: only 40 of 200 resamples defined)"  # why the interval is missing
    assert rows[3][3] == "n/a (no label where it is defined)"
    # the statistics' own summary: one structure missed twice, found once, absent from both once
    from orthodiff_nnunet.evaluation.report import summarize_segmentation

    nan = float("nan")
    rows = [{"case": f"c{i}", "patient": f"p{i}", "structure": "ACL", "status": st, "dice": d, "hd95_mm": h,
             "hd95_capped_mm": hc, "cap_mm": 100.0, "surface_dice": sd}
            for i, (st, d, h, hc, sd) in enumerate((("missed", 0.0, nan, 100.0, 0.0), ("missed", 0.0, nan, 100.0, 0.0),
                                                    ("both_present", 0.8, 2.0, 2.0, 0.9),
                                                    ("both_empty", nan, nan, nan, nan)))]
    table = _seg_table(summarize_segmentation(rows, n_boot=0)["overall"])
    assert [_text(c) for c in table[0]] == ["structure", "n", "missed", "false detections", "absent from both",
                                            "Dice [95% CI]", "HD95 mm [95% CI]", "HD95 capped mm [95% CI]",
                                            "surface Dice [95% CI]"]
    assert [_text(c) for c in table[1]] == ["ACL", "4", "2", "0", "1", "0.267 [n/a, n/a]", "2.000 [n/a, n/a]",
                                            "67.333 [n/a, n/a]", "0.300 [n/a, n/a]"]
    seg = {"PCL": {"n_cases": 3, "dice": {"mean": None, "ci": [None, None], "n": 0},
                   "hd95_mm": {"mean": None, "ci": None, "n": 0},
                   "surface_dice": {"mean": nan, "ci": None, "n": 0, "reason": "never predicted"}}}
    assert [_text(c) for c in _seg_table(seg)[1]] == [
        "PCL", "3", "n/a (structure absent from every reference and prediction)",
        "n/a (no case with the structure in both reference and prediction)", "n/a (never predicted)"]


# ----------------------------------------------------------------------------------------------
# the page in a browser


def _write_case(folder: Path, case: str, shift: int, empty_tibia: bool = False) -> dict:
    """A 1.5 mm x 0.8 mm x 0.8 mm axial case with a femur ball and a tibia slab; the prediction shifted."""
    import SimpleITK as sitk

    shape = (10, 32, 32)
    z, y, x = np.indices(shape)
    ref = np.zeros(shape, np.uint8)
    ref[(z - 5) ** 2 / 9 + (y - 14) ** 2 / 36 + (x - 16) ** 2 / 36 < 1] = 1
    if not empty_tibia:
        ref[:, 24:28, 4:28] = 2
    pred = np.roll(ref, shift, axis=2)
    img = (ref * 100.0 + 20 + (x + y) % 7).astype(np.float32)
    files = {}
    for key, arr in (("image_file", img), ("reference_file", ref), ("prediction_file", pred)):
        im = sitk.GetImageFromArray(arr)
        im.SetSpacing((0.8, 0.8, 1.5))
        files[key] = str(folder / f"{case}_{key}.nii.gz")
        sitk.WriteImage(im, files[key])
    return files


def _seg_rows(folder: Path) -> list[dict]:
    """Rows of five cases whose prediction is the reference shifted by 0, 1, 3, 6, 9 voxels along x.

    Dice is counted here (2 TP / (2 TP + FP + FN)); HD95 and surface Dice are stand-ins (the shift in mm,
    and 1 - shift / 10): the report only shows them.
    """
    import SimpleITK as sitk

    labels = {"femur": 1, "tibia": 2}
    rows = []
    for i, shift in enumerate((0, 1, 3, 6, 9)):
        files = _write_case(folder, f"case{i}", shift)
        for structure, value in labels.items():
            ref = sitk.GetArrayFromImage(sitk.ReadImage(files["reference_file"])) == value
            pred = sitk.GetArrayFromImage(sitk.ReadImage(files["prediction_file"])) == value
            tp, fp, fn = int((ref & pred).sum()), int((~ref & pred).sum()), int((ref & ~pred).sum())
            rows.append({"case": f"case{i}", "orientation": "ax", "site": "SiteB", "field_strength_t": 1.5,
                         "vendor": "VendorB", "structure": structure, "label_value": value,
                         "dice": 2 * tp / (2 * tp + fp + fn), "hd95_mm": 0.8 * shift, "surface_dice": 1 - shift / 10,
                         **files})
    # a case without any structure: its mean Dice is undefined and sorts last
    rows += [{"case": "case9", "orientation": "ax", "site": "SiteB", "field_strength_t": 1.5, "vendor": "VendorB",
              "structure": s, "dice": math.nan, "hd95_mm": math.nan, "surface_dice": math.nan} for s in ("femur", "tibia")]
    return rows


def _exams(rng) -> list[dict]:
    exams = []
    for i in range(24):
        t = {"ACL": int(i % 3 == 0), "EFFU": int(i % 2 == 0), "PD": 0}
        exams.append({"exam": f"e{i}", "patient": f"p{i // 2}", "site": "SiteB", "field_strength_t": 1.5,
                      "vendor": "VendorB", "views": ["sag", "cor", "ax"], "targets": t,
                      "probabilities": {k: float(np.clip(0.3 + 0.35 * v + rng.normal(0, 0.2), 0, 1))
                                        for k, v in t.items()}})
    exams[3]["targets"]["EFFU"] = None
    return exams


class _Dom(HTMLParser):
    """Tables by id (rows of (text, attrs) cells), images' attributes, ids, links and the body's attributes."""

    def __init__(self):
        super().__init__()
        self.tables: dict[str, list[list[tuple[str, dict]]]] = {}
        self.confusion: dict[str, list[list[tuple[str, dict]]]] = {}
        self.images: list[dict] = []
        self.ids: set[str] = set()
        self.body: dict = {}
        self.headline: list[str] = []
        self._table = None
        self._cell = None
        self._in_headline = False
        self._li = None

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if "id" in a:
            self.ids.add(a["id"])
        if tag == "body":
            self.body = a
        elif tag == "img":
            self.images.append(a)
        elif tag == "table":
            self._table = []
            if a.get("id"):
                self.tables[a["id"]] = self._table
            elif a.get("data-label"):
                self.confusion[a["data-label"]] = self._table
        elif tag == "tr" and self._table is not None:
            self._table.append([])
        elif tag in ("td", "th") and self._table is not None:
            self._cell = ["", a]
        elif tag == "a" and self._cell is not None:
            self._cell[1] = {**self._cell[1], "href": a.get("href")}
        elif tag == "ul" and a.get("id") == "headline-figures":
            self._in_headline = True
        elif tag == "li" and self._in_headline:
            self._li = ""

    def handle_endtag(self, tag):
        if tag in ("td", "th") and self._cell is not None:
            self._table[-1].append((self._cell[0].strip(), self._cell[1]))
            self._cell = None
        elif tag == "table":
            self._table = None
        elif tag == "li" and self._li is not None:
            self.headline.append(self._li.strip())
            self._li = None
        elif tag == "ul":
            self._in_headline = False

    def handle_data(self, data):
        if self._cell is not None:
            self._cell[0] += data
        if self._li is not None:
            self._li += data


def _render(html_file: Path, profile: Path) -> _Dom:
    """The DOM after Chromium has loaded the page (scripts run, images decoded)."""
    out = subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", f"--user-data-dir={profile}",
                          "--virtual-time-budget=5000", "--dump-dom", html_file.resolve().as_uri()],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    dom = _Dom()
    dom.feed(out.stdout)
    return dom


def _f3(v) -> str:
    return "n/a" if v is None else f"{v:.3f}"


@pytest.fixture(scope="module")
def built_report(tmp_path_factory):
    """One report for the browser tests of this module (built once: drawing it takes a few seconds)."""
    root = tmp_path_factory.mktemp("report_html")
    data = root / "data"
    data.mkdir()
    rows = _seg_rows(data)
    exams = _exams(np.random.default_rng(1))
    html = build_report(root / "report", rows, exams, ["ACL", "EFFU", "PD"], {"ACL": 0.5, "EFFU": 0.45, "PD": 0.5},
                        provenance={"models": ["m"]}, n_boot=100, seed=0)
    return html, json.loads((root / "report" / "report.json").read_text()), rows, exams


@needs_chromium
def test_html_renders_with_images_and_the_numbers_of_report_json(built_report, tmp_path):
    html, rep, rows, exams = built_report
    assert "image_file" not in json.dumps(rep)  # file paths stay out of report.json
    pictures = rep["segmentation"]["pictures"]
    assert [(p["rank"], p["case"]) for p in pictures] == [("best", "case0"), ("median", "case2"), ("worst", "case4")]
    dom = _render(html, tmp_path / "profile")

    # every image decoded in the browser: the boxplot, the ROC panels, the reliability diagram, 3 cases
    assert len(dom.images) == 3 + len(pictures) == 6
    assert all(img.get("data-loaded") == "ok" for img in dom.images), [i.get("alt") for i in dom.images]
    assert dom.body.get("data-images") == "6/6"

    # classification table = report.json
    table = dom.tables["cls-overall"]
    assert [c[0] for c in table[0]][:4] == ["label", "n (pos)", "threshold", "AUROC [95% CI]"]
    for m, row in zip(rep["classification"]["overall"]["labels"], table[1:]):
        assert row[0][0] == m["name"]
        for k, col in (("auroc", 3), ("auprc", 4), ("sensitivity", 5), ("specificity", 6)):
            if m[k] is None:  # undefined: n/a with the statistics' reason
                assert row[col][0] == f"n/a ({m['undefined'][k]})" and "no positive exam" in m["undefined"][k]
            else:
                lo, hi = m["ci"][k]
                assert row[col][0] == f"{m[k]:.3f} [{_f3(lo)}, {_f3(hi)}]"
    pd_row = next(r for r in table if r[0][0] == "PD")
    assert pd_row[3][0].startswith("n/a (no positive exam")

    # confusion matrices: the report's counts, and those counts are right
    for name, t in (("ACL", 0.5), ("EFFU", 0.45)):
        cells = {c[1]["class"]: int(c[0]) for r in dom.confusion[name] for c in r if c[1].get("class")}
        known = [e for e in exams if e["targets"][name] is not None]
        tp = sum(e["targets"][name] == 1 and e["probabilities"][name] >= t for e in known)
        tn = sum(e["targets"][name] == 0 and e["probabilities"][name] < t for e in known)
        assert cells == {k: rep["classification"]["confusion"][name][k] for k in ("tp", "fn", "fp", "tn")}
        assert (cells["tp"], cells["tn"], sum(cells.values())) == (tp, tn, len(known))

    # per-case table: mean Dice = mean over the case's structures in report.json; links reach the pictures
    cases = dom.tables["seg-cases"]
    header = [c[0] for c in cases[0]]
    col, pic_col = header.index("mean Dice"), header.index("picture")
    by_case = {}
    for r in rep["segmentation"]["cases"]:
        if r["dice"] is not None:
            by_case.setdefault(r["case"], []).append(r["dice"])
    shown = {r[0][0]: r[col][0] for r in cases[1:]}
    assert shown == {**{c: f"{np.mean(d):.3f}" for c, d in by_case.items()}, "case9": "n/a"}
    assert [r[0][0] for r in cases[1:]][-1] == "case9"  # worst first, undefined last
    links = {r[0][0]: r[pic_col][1].get("href") for r in cases[1:] if r[pic_col][1].get("href")}
    assert set(links) == {"case0", "case2", "case4"}
    assert all(h[1:] in dom.ids for h in links.values())

    # headline: the figures of report.json, with their intervals
    macro = rep["classification"]["overall"]["macro"]["auroc"]
    lo, hi = rep["classification"]["overall"]["macro_ci"]["auroc"]
    assert any(f"macro AUROC {macro:.3f} [95% CI {lo:.3f}, {hi:.3f}]" in line for line in dom.headline)
    fig = next(f for f in rep["headline"]["figures"] if f["name"] == "mean Dice per case, ax")
    assert fig["value"] == pytest.approx(np.mean([np.mean(d) for d in by_case.values()]))
    assert fig["unit"] == "cases" and fig["ci"][0] <= fig["value"] <= fig["ci"][1]
    assert rep["headline"]["n_patients"] == 12 and rep["classification"]["roc_band"]["resampled"] == "patients"
    assert any(x.startswith("PD: AUROC, AUPRC, sensitivity undefined (no positive exam")
               for x in rep["headline"]["not_evaluated"])


@needs_chromium
def test_tables_sort_in_the_browser(built_report, tmp_path):
    html, rep, _, _ = built_report
    page = tmp_path / "sorted.html"
    # click "mean Dice" twice (ascending, then descending) and "case" once, as a reader would
    click = ("<script>window.addEventListener('load', function () {"
             "var hs = document.querySelectorAll('#seg-cases th');"
             "var by = function (t) { return Array.prototype.find.call(hs, function (h) { return h.textContent === t; }); };"
             "by('mean Dice').click(); by('mean Dice').click();"
             "document.getElementById('cls-overall').querySelectorAll('th')[3].click(); });</script>")
    page.write_text(html.read_text().replace("</body>", click + "</body>"))
    dom = _render(page, tmp_path / "profile")
    cases = dom.tables["seg-cases"]
    col = [c[0] for c in cases[0]].index("mean Dice")
    values = [r[col][0] for r in cases[1:]]
    assert values[-1] == "n/a"  # undefined stays last
    numbers = [float(v) for v in values[:-1]]
    assert numbers == sorted(numbers, reverse=True) and len(numbers) == 5
    assert cases[0][col][1].get("data-dir") == "desc"
    auroc = [r[3][0] for r in dom.tables["cls-overall"][1:] if r[0][0] != "macro"]
    assert dom.tables["cls-overall"][-1][0][0] == "macro"  # the footer stays below the sorted rows
    defined = [float(v.split()[0]) for v in auroc if not v.startswith("n/a")]
    assert defined == sorted(defined) and auroc[-1].startswith("n/a")


def test_headline_lists_what_could_not_be_evaluated():
    from orthodiff_nnunet.evaluation.report import headline

    report = {"classification": {
        "overall": {"labels": [{"name": "MCL", "n": 5, "n_pos": 5, "threshold": 0.5, "auroc": None, "auprc": 1.0,
                                "sensitivity": 0.8, "specificity": None, "ci": {}}],
                    "macro": {"auroc": None, "sensitivity": 0.8, "specificity": None}, "macro_ci": {}, "n_exams": 5},
        "calibration_pooled": {"ece": 0.1, "n": 5}, "missing_views": {"e1": ["ax"]},
        "roc_band": {"resampled": "patients"}, "label_mismatch": {"LCL": "in the targets, not in the model"}}}
    exams = [{"exam": f"e{i}", "patient": f"p{i % 2}", "site": "SiteB", "field_strength_t": 1.5, "vendor": "V"}
             for i in range(5)]
    h = headline(report, [], exams, n_boot=10, seed=0)
    assert (h["sites"], h["field_strengths_t"], h["vendors"], h["n_patients"], h["n_exams"]) == \
        (["SiteB"], ["1.5"], ["V"], 2, 5)
    assert h["not_evaluated"] == ["MCL: AUROC, specificity undefined (no negative exam; n = 5, positives = 5)",
                                  "1 exam(s) predicted without all three views",
                                  "classification: LCL: in the targets, not in the model"]
    macro = next(f for f in h["figures"] if f["name"] == "macro AUROC")
    assert macro["value"] is None and macro["ci"] == [None, None]
