"""The HTML evaluation report: built from a real result store, checked in headless Chromium against the store."""

import json
import os
import re
import shutil
import sys
from html import unescape

import h5py
import numpy as np
import pytest

from captum_vit.cli import main
from captum_vit.data import ShapesDataset
from captum_vit.evaluation import StoreCorruptError, StoreVersionError, evaluate, load_store
from captum_vit.report import ReportError, build_report, select_pictures
from helpers import make_timm

N_IMAGES = 40
METHODS = ("agcam", "rollout")


def _evaluate(path, on_batch=None, size=N_IMAGES):
    model = make_timm("plain")  # random init: few correct predictions, so both filters have rows
    data = ShapesDataset("single", seed=0, size=size, image_size=64)
    return model, evaluate(model, data, ",".join(METHODS), store=path, progress=False, batch_size=8,
                           on_batch=on_batch)


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    folder = tmp_path_factory.mktemp("store")
    model, _ = _evaluate(str(folder / "results.h5"))
    with load_store(str(folder)) as rs:
        rows = {m: rs.read(m, maps=False) for m in METHODS}
    labels = rows[METHODS[0]]["label"]
    correct = labels == rows[METHODS[0]]["pred"]
    assert 2 <= correct.sum() <= len(labels) - 2, "the test needs right and wrong predictions"
    return {"dir": str(folder), "rows": rows, "model": model}


@pytest.fixture(scope="module")
def report(store, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("report") / "report.html")
    info = build_report(store["dir"], out, per_score=3, sample=24, pairs=2, model=store["model"])
    return {"path": out, "info": info, **store}


def _chromium():
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        path = shutil.which(name)
        if path:
            return path
    return None


@pytest.fixture(scope="module")
def browser():
    exe = _chromium()
    if exe is None:
        pytest.skip("no Chromium executable on PATH (install Debian's `chromium` package to run the browser tests)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=exe, args=["--no-sandbox"])
        yield b
        b.close()


class _Page:
    """A page opened from the file system, recording console errors and every request it makes."""

    def __init__(self, browser, path):
        self.url = "file://" + os.path.abspath(path)
        self.page = browser.new_page(viewport={"width": 1280, "height": 900})
        self.errors, self.requests, self.dialogs = [], [], []
        self.page.on("console", lambda m: self.errors.append(m.text) if m.type == "error" else None)
        self.page.on("dialog", lambda d: (self.dialogs.append(d.message), d.dismiss()))
        self.page.on("pageerror", lambda e: self.errors.append(str(e)))
        self.page.on("request", lambda r: self.requests.append(r.url))
        self.page.goto(self.url)

    def rows(self):
        js = "rs => rs.map(r => r.dataset.index)"
        return [int(v) for v in self.page.eval_on_selector_all("#grid tbody tr.row", js)]

    def count(self):
        return int(self.page.inner_text("#count"))

    def check_clean(self):
        assert self.errors == [] and self.dialogs == []
        assert all(u == self.url or u.startswith("data:") for u in self.requests), self.requests


@pytest.mark.slow
def test_page_in_chromium_matches_the_store(report, browser):
    rows = report["rows"]
    first = rows[METHODS[0]]
    view = _Page(browser, report["path"])
    page = view.page
    assert view.rows() == first["index"].tolist()  # every image, in index order
    assert view.count() == N_IMAGES
    assert page.evaluate("document.documentElement.scrollWidth") <= 1280  # no sideways scrolling at 1280 px

    for m in METHODS:  # sorting per method, ascending: the worst IoU first; descending: the best
        page.select_option("#sort-key", "iou")
        page.select_option("#sort-method", m)
        page.select_option("#sort-dir", "asc")
        assert view.rows()[0] == rows[m]["index"][np.nanargmin(rows[m]["iou"])]
        assert len(view.rows()) == N_IMAGES  # images without an IoU (misclassified) come last, not dropped
        page.select_option("#sort-dir", "desc")
        assert view.rows()[0] == rows[m]["index"][np.nanargmax(rows[m]["iou"])]
    page.select_option("#sort-key", "mass_outside")
    page.select_option("#sort-dir", "asc")
    assert view.rows()[0] == rows[METHODS[-1]]["index"][np.argmin(rows[METHODS[-1]]["mass_outside"])]

    labels, preds = first["label"], first["pred"]
    for c in np.unique(labels):
        page.select_option("#filter-class", str(c))
        assert view.count() == (labels == c).sum() == len(view.rows())
        assert set(view.rows()) == set(first["index"][labels == c].tolist())
    page.select_option("#filter-class", "all")
    page.select_option("#filter-pred", "wrong")
    assert view.count() == (labels != preds).sum() == len(view.rows())
    page.select_option("#filter-pred", "correct")
    assert view.count() == (labels == preds).sum() == len(view.rows())
    page.select_option("#filter-pred", "all")

    page.uncheck(f".filter-method[value={METHODS[1]}]")  # the method filter hides its column
    assert page.locator("#grid thead th").all_inner_texts() == ["image", METHODS[0]]
    page.check(f".filter-method[value={METHODS[1]}]")

    page.select_option("#sort-key", "index")
    page.select_option("#sort-dir", "asc")
    order = view.rows()
    assert page.is_hidden("#viewer")
    page.locator("#grid tbody tr.row").nth(1).locator(".tile").first.click()
    assert page.is_visible("#viewer")
    assert page.get_attribute("#viewer-index", "data-index") == str(order[1])
    assert page.locator("#viewer .panel").count() >= len(METHODS)
    page.keyboard.press("ArrowRight")
    assert page.get_attribute("#viewer-index", "data-index") == str(order[2])
    page.keyboard.press("ArrowLeft")
    page.keyboard.press("ArrowLeft")
    assert page.get_attribute("#viewer-index", "data-index") == str(order[0])
    page.keyboard.press("Escape")
    assert page.is_hidden("#viewer")

    assert page.locator("#pairs-grid tbody tr").count() == 2  # the two-class section: a map per class and method
    page.locator("#pairs-grid tbody tr").first.locator(".tile").first.click()
    assert page.locator("#viewer .panel").count() == 2 * len(METHODS)
    page.keyboard.press("ArrowRight")
    assert page.get_attribute("#viewer-index", "data-pair") == "1"
    page.keyboard.press("Escape")
    assert page.is_hidden("#incomplete")
    view.check_clean()


def _data(html):
    return json.loads(re.search(r"const D = (\{.*?\});\n", html, re.S).group(1))


def test_page_is_self_contained(report):
    html = open(report["path"], encoding="utf-8").read()
    refs = re.findall(r"""(?:src|href)\s*=\s*["']([^"']*)["']""", html)
    assert refs and all(r.startswith("data:") for r in refs), [r for r in refs if not r.startswith("data:")]
    assert set(re.findall(r"https?://[^\s\"'<>)]*", html)) <= {"http://www.w3.org/2000/svg"}  # a namespace only
    assert "@import" not in html and "url(" not in html and "<script src" not in html
    data = _data(html)
    assert data["idx"] == report["rows"][METHODS[0]]["index"].tolist()
    for m in METHODS:
        iou = np.array([np.nan if v is None else v for v in data["scores"][m]["iou"]])
        np.testing.assert_allclose(iou, report["rows"][m]["iou"], atol=1e-4, equal_nan=True)


def test_pictures_are_bounded_and_include_the_extremes(report, tmp_path):
    rng = np.random.default_rng(0)
    scores = {m: {c: rng.random(5000) for c in ("iou", "abpc", "entropy")} for m in METHODS}
    scores[METHODS[0]]["iou"][rng.random(5000) < 0.3] = np.nan
    picks = select_pictures(scores, 5000, per_score=2, sample=5, seed=0)
    assert len(picks) <= len(METHODS) * 3 * 2 * 2 + 5
    for cols in scores.values():
        for v in cols.values():
            assert np.nanargmin(v) in picks and np.nanargmax(v) in picks

    out = str(tmp_path / "small.html")
    info = build_report(report["dir"], out, per_score=1, sample=2)
    assert 0 < info["n_pictures"] < N_IMAGES
    assert info["n_images"] == N_IMAGES  # every image's scores, pictures for a few
    first = report["rows"][METHODS[0]]
    for m in METHODS:
        assert report["rows"][m]["index"][np.nanargmin(report["rows"][m]["iou"])] in info["pictures"]
    assert set(info["pictures"]) <= set(first["index"].tolist())


@pytest.mark.slow
def test_page_states_the_selection(report, browser, tmp_path):
    out = str(tmp_path / "small.html")
    info = build_report(report["dir"], out, per_score=1, sample=2)
    view = _Page(browser, out)
    assert f"Pictures for {info['n_pictures']} of {N_IMAGES} images" in view.page.inner_text("#selection")
    assert len(view.rows()) == N_IMAGES
    assert view.page.locator("#grid tbody tr.row .tile.none").count() == (N_IMAGES - info["n_pictures"]) * len(METHODS)
    view.page.check("#filter-pics")
    assert sorted(view.rows()) == info["pictures"]
    view.check_clean()


class _Stop(Exception):
    pass


@pytest.mark.slow
def test_interrupted_run_reports_what_it_holds(tmp_path, capsys, request):
    def stop(b, _):
        if b == 2:
            raise _Stop

    with pytest.raises(_Stop):
        _evaluate(str(tmp_path / "results.h5"), on_batch=stop)
    out = str(tmp_path / "partial.html")
    assert main(["report", str(tmp_path), "--out", out]) == 0
    err = capsys.readouterr().err
    assert "incomplete: 16 of 40 images" in err
    html = open(out, encoding="utf-8").read()
    assert _data(html)["meta"]["complete"] is False and len(_data(html)["idx"]) == 16
    view = _Page(request.getfixturevalue("browser"), out)  # the checks above run without a browser too
    assert view.page.is_visible("#incomplete")
    assert "incomplete: 16 of 40 images" in view.page.inner_text("#incomplete")
    assert view.count() == 16
    view.check_clean()


def test_bad_inputs_give_clear_errors(store, tmp_path, capsys):
    src = os.path.join(store["dir"], "results.h5")
    assert main(["report", str(tmp_path / "missing"), "--out", str(tmp_path / "r.html")]) == 2
    assert "no result store" in capsys.readouterr().err
    assert main(["report", store["dir"], "--out", str(tmp_path)]) == 2
    assert "is a folder; give the .html file" in capsys.readouterr().err
    assert main(["report", store["dir"], "--out", str(tmp_path / "nope" / "r.html")]) == 2
    assert "does not exist" in capsys.readouterr().err

    old = tmp_path / "old"
    old.mkdir()
    shutil.copy(src, old / "results.h5")
    with h5py.File(old / "results.h5", "a") as f:
        f.attrs["format_version"] = 1
    with pytest.raises(StoreVersionError, match="another version of captum-vit"):
        build_report(str(old), str(tmp_path / "r.html"))

    cut = tmp_path / "cut"
    cut.mkdir()
    blob = open(src, "rb").read()
    (cut / "results.h5").write_bytes(blob[: len(blob) // 2])
    with pytest.raises(StoreCorruptError, match="truncated|damaged|corrupt"):
        build_report(str(cut), str(tmp_path / "r.html"))
    assert main(["report", str(cut), "--out", str(tmp_path / "r.html")]) == 2
    assert "error:" in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "r.html")

    with pytest.raises(ReportError, match="--pairs needs the model"):
        build_report(store["dir"], str(tmp_path / "r.html"), pairs=1)  # written through the API: no model name


def test_evaluate_report_flag(tmp_path, capsys):
    out = str(tmp_path / "ev")
    assert main(["evaluate", "--limit", "4", "--methods", "raw", "--metrics", "localization", "--out", out,
                 "--no-progress", "--report"]) == 0
    assert "report.html" in capsys.readouterr().out
    html = open(os.path.join(out, "report.html"), encoding="utf-8").read()
    meta = _data(html)["meta"]
    assert meta["classes"][:2] == ["disk", "square"] and meta["n_images"] == 4 and meta["complete"]
    assert meta["run"]["model"] == "shapes_vit" and meta["n_pictures"] == 4


# -- hostile stores ----------------------------------------------------------------------------
def _edited_store(src_dir, dst_dir, fingerprint=None, run=None):
    """A copy of a store with its fingerprint and/or run information changed (``fn(dict) -> None``).

    The one place that edits a store's attributes directly, as someone with the file could.
    """
    os.makedirs(dst_dir, exist_ok=True)
    dst = os.path.join(str(dst_dir), "results.h5")
    shutil.copy(os.path.join(str(src_dir), "results.h5"), dst)
    with h5py.File(dst, "a") as f:
        for key, edit in (("fingerprint", fingerprint), ("run", run)):
            if edit is not None:
                value = json.loads(f.attrs[key]) if key in f.attrs else {}
                edit(value)
                f.attrs[key] = json.dumps(value, sort_keys=True)
    return str(dst_dir)


@pytest.mark.parametrize("path", ["os.system", "hostile_marker_module.Explainer",
                                  "captum_vit.attr.rollout.AttentionRollout"])
def test_pairs_instantiate_only_the_registered_methods(store, tmp_path, monkeypatch, path):
    marker = tmp_path / "ran.txt"
    (tmp_path / "hostile_marker_module.py").write_text(
        f"open({str(marker)!r}, 'w').write('imported')\n"
        "class Explainer:\n"
        f"    def __init__(self, model):\n        open({str(marker)!r}, 'w').write('constructed')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    called = []
    monkeypatch.setattr(os, "system", lambda *a: called.append(a) or 0)

    def edit(fp):
        fp["methods"]["agcam"] = path  # rollout's class under agcam's name is refused too

    edited = _edited_store(store["dir"], tmp_path / "edited", fingerprint=edit)
    with pytest.raises(ReportError, match=r"'agcam'.*" + re.escape(repr(path))):
        build_report(edited, str(tmp_path / "r.html"), pairs=1, model=store["model"])
    assert not marker.exists() and called == []
    assert "hostile_marker_module" not in sys.modules
    assert not os.path.exists(tmp_path / "r.html")


# Strings that would end the inline script, open an HTML comment, break out of an attribute, colour a
# terminal or end a JavaScript line, placed where a store's strings come from: class names (the dataset),
# the dataset's folder (the fingerprint) and the run information.
HOSTILE = ["<!--", "</script><script>alert(1)</script>", "\"'&amp;&", "\x1b[31mred", "a\u2028b\u2029c",
           "x/*__DATA__*/null __TITLE__"]
HOSTILE_MODEL = " ".join(HOSTILE)


@pytest.fixture(scope="module")
def hostile_report(tmp_path_factory):
    from captum_vit.data import CUBTest
    from helpers import _write_image

    tmp = tmp_path_factory.mktemp("hostile")
    root = os.path.join(str(tmp), *HOSTILE)  # "</script>..." makes nested folders: still one path
    base = os.path.join(root, "CUB_200_2011")
    items = [(f"c{k}/{k}.jpg", k + 1) for k in range(len(HOSTILE))]  # one test image per class
    for k, (rel, _) in enumerate(items):
        _write_image(os.path.join(base, "images", *rel.split("/")), (40 + 4 * k, 36), seed=k)

    def table(name, rows):
        with open(os.path.join(base, name), "w", encoding="utf-8") as f:
            f.write("".join(" ".join(str(v) for v in r) + "\n" for r in rows))

    table("images.txt", [(k + 1, rel) for k, (rel, _) in enumerate(items)])
    table("image_class_labels.txt", [(k + 1, c) for k, (_, c) in enumerate(items)])
    table("train_test_split.txt", [(k + 1, 0) for k in range(len(items))])
    table("bounding_boxes.txt", [(k + 1, 2.0, 3.0, 20.0, 20.0) for k in range(len(items))])
    table("classes.txt", [(k + 1, name) for k, name in enumerate(HOSTILE)])
    ds = CUBTest(root, input_size=64)
    assert ds.classes == HOSTILE  # the fixture really puts the strings in the class names
    model = make_timm("plain")
    folder = str(tmp / "store")
    os.mkdir(folder)
    evaluate(model, ds, ",".join(METHODS), store=os.path.join(folder, "results.h5"), progress=False, batch_size=8,
             run_info={"dataset": "cub", "root": root, "model": HOSTILE_MODEL, "checkpoint": HOSTILE_MODEL})
    out = str(tmp / "report.html")
    info = build_report(folder, out, per_score=1, sample=len(HOSTILE))
    assert info["notes"] == [] and info["n_pictures"] == len(HOSTILE)  # the images were rebuilt: names in use
    return {"path": out, "root": root}


def test_hostile_strings_stay_data_in_the_html(hostile_report):
    html = open(hostile_report["path"], encoding="utf-8").read()
    assert html.count("</script") == 1 and "<!--" not in html  # the template's own closing tag only
    script = html[html.index("const D = "):html.index("</script>")]
    assert not set(script) & {"\u2028", "\u2029"}
    data = re.search(r"const D = (\{.*?\});\n", html, re.S).group(1)
    assert not set(data) & set("<>&")
    parsed = json.loads(data)
    assert parsed["meta"]["classes"] == HOSTILE
    assert parsed["meta"]["run"]["model"] == HOSTILE_MODEL == parsed["meta"]["run"]["checkpoint"]
    assert parsed["meta"]["dataset"]["root"] == hostile_report["root"]
    assert HOSTILE_MODEL in parsed["meta"]["title"]
    title = re.search(r"<title>(.*?)</title>", html, re.S).group(1)
    assert "<" not in title and unescape(title) == parsed["meta"]["title"]


@pytest.mark.slow
def test_hostile_strings_show_as_text_in_chromium(hostile_report, browser):
    view = _Page(browser, hostile_report["path"])
    page = view.page
    assert len(view.rows()) == view.count() == len(HOSTILE)  # the table is there
    assert page.evaluate("document.scripts.length") == 1
    text = "el => el.textContent"
    assert HOSTILE_MODEL in page.eval_on_selector("#title", text)
    assert HOSTILE_MODEL in page.eval_on_selector("#subtitle", text)
    assert HOSTILE_MODEL in page.eval_on_selector("title", text)
    shown = page.eval_on_selector_all("#grid tbody tr.row .info b", "bs => bs.map(b => b.textContent)")
    assert set(HOSTILE) <= set(shown)  # every class name, literally, as the true or predicted class
    options = page.eval_on_selector_all("#filter-class option", "os => os.map(o => o.textContent)")
    assert sorted(options[1:]) == sorted(f"{name} (1)" for name in HOSTILE)
    view.check_clean()
