"""A real browser rates ten pairs on the rating page: headless Chromium (Debian's ``chromium``, which ``make install``
installs where it can) driven by Playwright pointed at that executable (no browser is downloaded). Five votes by
clicking, five by keys; the votes are then read back from the database. A screenshot of the page is kept; with
``WURST_SCREENSHOT_DIR`` set it is also copied there (the committed one is ``reports/figures/11_preference/``)."""
from __future__ import annotations

import os
import random
import shutil
from pathlib import Path

import pytest

from wurst_core.data import procedural
from wurst_core.human.build import Prompt, SystemImages, build_study
from wurst_core.human.design import DesignSpec
from wurst_core.human.server import running
from wurst_core.human.store import Store

CHROMIUM = next((p for p in (os.environ.get("WURST_CHROMIUM"), "/usr/bin/chromium", shutil.which("chromium"),
                             shutil.which("chromium-browser")) if p and Path(p).is_file()), None)
playwright = pytest.importorskip("playwright.sync_api", reason="the playwright package is not installed "
                                                               "(pip install -e '.[dev]')")
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="no Chromium executable (Debian package `chromium`; "
                                                         "`make install` installs it where root and apt-get exist)")
SYSTEMS = ("ground truth", "one attribute changed", "other prompt's render")


def rendered_study(path: Path, n: int = 12) -> Store:
    ds = procedural.ProceduralDataset(size=n, resolution=96, seed=0, split="test")
    items = [ds[i] for i in range(n)]
    rng = random.Random(0)
    kinds = procedural.COUNTERFACTUALS
    changed = [procedural.render(procedural.counterfactual(it["attributes"], kinds[i % 4], rng), 96)
               for i, it in enumerate(items)]
    truth = [it["image"] for it in items]
    prompts = [Prompt(it["caption"], "novel" if i % 2 == 0 else "seen", it["attributes"]) for i, it in enumerate(items)]
    systems = [SystemImages(SYSTEMS[0], truth), SystemImages(SYSTEMS[1], changed),
               SystemImages(SYSTEMS[2], truth[1:] + truth[:1])]
    return build_study(path, prompts, systems, DesignSpec(3, 0.0, 0.0, 0))


def test_chromium_rates_ten_pairs_with_clicks_and_keys(tmp_path):
    store = rendered_study(tmp_path / "study.sqlite")
    actions = [("click", "left"), ("click", "right"), ("click", "neither"), ("click", "left"), ("click", "right"),
               ("key", "ArrowLeft"), ("key", "ArrowRight"), ("key", "ArrowDown"), ("key", "n"), ("key", "ArrowLeft")]
    expected = ["left", "right", "neither", "left", "right", "left", "right", "neither", "neither", "left"]
    shot = tmp_path / "rating_page.png"
    with running(store.path) as url, playwright.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox", "--disable-gpu"])
        try:
            context = browser.new_context(viewport={"width": 1000, "height": 620})
            page = context.new_page()
            page.goto(url + "/")
            page.fill("#name", "browser rater")
            page.click("#begin")
            page.wait_for_selector("body[data-showing]")
            text = page.content()
            assert not any(s in text for s in SYSTEMS)  # nothing on the page names a system
            for k, (how, what) in enumerate(actions):
                showing = page.get_attribute("body", "data-showing")
                if how == "click":
                    page.click(f"#choose-{what}")
                else:
                    page.keyboard.press(what)
                page.wait_for_function("s => document.body.dataset.showing !== s", arg=showing)
                assert page.text_content("#progress") == f"{k + 1} of {store.counts()['items']} rated"
                if k == 2:
                    page.screenshot(path=str(shot))
            # the rater closes the tab and comes back: the cookie brings them back to where they stopped
            page.close()
            again = context.new_page()
            again.goto(url + "/")
            again.wait_for_selector("body[data-showing]")
            assert again.text_content("#progress").startswith("10 of ")
        finally:
            browser.close()
    j = store.table("judgments").merge(store.table("raters")[["rater_id", "name"]], on="rater_id")
    j = j[j["name"] == "browser rater"].sort_values("answered_at")
    assert list(j["choice"]) == expected
    assert shot.stat().st_size > 10_000
    if os.environ.get("WURST_SCREENSHOT_DIR"):
        target = Path(os.environ["WURST_SCREENSHOT_DIR"])
        target.mkdir(parents=True, exist_ok=True)
        shutil.copy2(shot, target / "rating_page.png")
