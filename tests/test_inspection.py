"""What a person looks at, in a real headless Chromium: the report and optuna-dashboard.

Needs Debian's chromium and the playwright package (its driver only: the
browser is the system's). Skips where either is missing, but never in CI.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from models.presets import preset
from search import report, run
from search.data import synthetic
from search.final import run_once, summarize
from search.records import write_json
from search.trainer import TrainConfig

from conftest import FAST_SEARCH, ROOT

TINY = preset("resnet-tiny")

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
FLAGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
DOCS = ROOT / "docs"


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
def small_study(tmp_path_factory):
    """A finished synthetic study in SQLite, as `search.run` leaves it."""
    tmp = tmp_path_factory.mktemp("study")
    cwd = os.getcwd()
    os.chdir(tmp)
    try:
        url = f"sqlite:///{tmp}/s.db"
        assert (
            run.main(
                [
                    *FAST_SEARCH,
                    "--trials",
                    "8",
                    "--study-name",
                    "demo",
                    "--storage",
                    url,
                    "--enqueue",
                    "resnet-tiny",
                    "--enqueue",
                    "resnet18",
                ]
            )
            == 0
        )
    finally:
        os.chdir(cwd)
    return tmp, url


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


def test_report_renders_its_plots(small_study, browser, tmp_path) -> None:
    _tmp, url = small_study
    result = tmp_path / "result.json"
    # A real final training: resnet-tiny, 2 epochs, 2 seeds on the synthetic data.
    data, cfg = synthetic(n_train=512, n_test=128), TrainConfig(batch_size=128)
    runs = [run_once(TINY, replace(cfg, seed=s), 2, data, torch.device("cpu"))[0] for s in (0, 1)]
    write_json(result, summarize(TINY, cfg, 2, data, torch.device("cpu"), runs))
    out = tmp_path / "report.html"
    assert (
        report.main(
            ["--storage", url, "--study-name", "demo", "--result", str(result), "-o", str(out)]
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
    if os.environ.get("NAS_UPDATE_SCREENSHOTS"):
        page.screenshot(path=str(DOCS / "report.png"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("launcher", ["optuna-dashboard", "search.dashboard"])
def test_dashboard_lists_the_study_and_its_trials(small_study, browser, launcher) -> None:
    """optuna-dashboard itself, and the same server started by `python -m search.dashboard`
    with the URL in the environment only."""
    tmp, url = small_study
    port = free_port()
    where = ["--host", "127.0.0.1", "--port", str(port)]
    where += ["--artifact-dir", str(tmp / "studies" / "demo" / "artifacts")]
    if launcher == "optuna-dashboard":
        argv, env = [str(Path(sys.executable).parent / "optuna-dashboard"), url], {}
    else:
        argv, env = [sys.executable, "-m", "search.dashboard"], {"NAS_STORAGE": url}
    dash = subprocess.Popen(
        [*argv, *where],
        env=dict(os.environ, PYTHONPATH=str(ROOT), **env),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.time() + 60
        while time.time() < deadline:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                time.sleep(0.3)
        page, errors = open_page(browser, f"http://127.0.0.1:{port}/dashboard")
        page.get_by_text("demo").first.wait_for(timeout=60_000)
        page.get_by_text("demo").first.click()
        page.wait_for_url("**/studies/*", timeout=30_000)
        page.goto(page.url.rstrip("/") + "/trials")
        page.get_by_text("Trial 0", exact=False).first.wait_for(timeout=60_000)
        text = page.inner_text("body")
        assert "Trial 1" in text and "PRUNED" in text.upper()
        if os.environ.get("NAS_UPDATE_SCREENSHOTS") and launcher == "optuna-dashboard":
            page.screenshot(path=str(DOCS / "dashboard.png"))
        assert [e for e in errors if "favicon" not in e] == []
    finally:
        dash.terminate()
        dash.wait(timeout=10)
