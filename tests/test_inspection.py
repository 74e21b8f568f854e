"""What a person looks at, in a real headless Chromium: the report and optuna-dashboard.

Needs Debian's chromium and the playwright package (its driver only: the
browser is the system's). Skips where either is missing, but never in CI.
"""

from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from docs.screenshots import CHROMIUM, FLAGS, dashboard
from search import report
from search.data import synthetic
from search.final import summarize, train_final
from search.records import write_json
from search.trainer import TrainConfig

from conftest import SMALL


def need_browser():
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        sync_playwright = None
    if sync_playwright is None or not Path(CHROMIUM).exists():
        if os.environ.get("CI") == "true":
            pytest.fail("CI needs chromium (apt) and playwright (pip)")
        pytest.skip("needs chromium and playwright")
    return sync_playwright


@pytest.fixture(scope="module")
def browser():
    sync_playwright = need_browser()
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=FLAGS)
        yield b
        b.close()


def open_page(browser, url: str):
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    errors: list[str] = []
    page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.goto(url)
    return page, errors


def test_report_renders_its_plots(finished, browser, tmp_path) -> None:
    url, name = finished.url, finished.name
    result = tmp_path / "result.json"
    # A real final training: resnet-tiny at half width, 2 epochs, 2 seeds on the synthetic data.
    data, cfg = synthetic(n_train=512, n_test=128), TrainConfig(batch_size=128)
    runs = [
        train_final(SMALL, replace(cfg, seed=s), 2, data, torch.device("cpu"))[0] for s in (0, 1)
    ]
    write_json(result, summarize(SMALL, cfg, 2, data, torch.device("cpu"), runs))
    out = tmp_path / "report.html"
    assert (
        report.main(
            ["--storage", url, "--study-name", name, "--result", str(result), "-o", str(out)]
        )
        == 0
    )
    page, errors = open_page(browser, out.as_uri())
    page.wait_for_selector(".js-plotly-plot .main-svg", timeout=60_000)
    plots = page.locator(".js-plotly-plot")
    assert plots.count() >= 7  # history, accuracy/params, pruning curves, importances, counts,
    #                            final curves, confusion matrix
    for i in range(plots.count()):
        box = plots.nth(i).bounding_box()
        assert box and box["width"] > 300 and box["height"] > 200
        assert plots.nth(i).locator("path, .point, rect").count() > 5  # not blank
    assert "Top architectures" in page.content() and "Pareto front" in page.content()
    assert errors == []


@pytest.mark.parametrize("launcher", ["optuna-dashboard", "search.dashboard"])
def test_dashboard_lists_the_study_and_its_trials(finished, browser, launcher) -> None:
    """optuna-dashboard itself, and the same server started by `python -m search.dashboard`
    with the URL in the environment only."""
    url = finished.url
    artifacts = finished.cwd / "studies" / finished.name / "artifacts"
    env = {"NAS_STORAGE": url} if launcher == "search.dashboard" else None
    with dashboard(url, artifacts, env) as address:
        page, errors = open_page(browser, address)
        page.get_by_text(finished.name).first.wait_for(timeout=60_000)
        page.get_by_text(finished.name).first.click()
        page.wait_for_url("**/studies/*", timeout=30_000)
        page.goto(page.url.rstrip("/") + "/trials")
        page.get_by_text("Trial 0", exact=False).first.wait_for(timeout=60_000)
        text = page.inner_text("body")
        assert "Trial 1" in text and "COMPLETE" in text.upper()
        assert [e for e in errors if "favicon" not in e] == []
