"""Take docs/report.png and docs/dashboard.png again, of the product as it is.

    .venv/bin/python docs/screenshots.py [--trials 20] [--epochs 2]

A real quick Fashion-MNIST search (`search.run --quick`) in a temporary
folder, a final training of its best network, the HTML report of both, and
optuna-dashboard on the study, each shown in a headless Chromium (Debian's
`chromium` and the `playwright` package of `.[dev]`). Takes a few minutes on a
2-core CPU; run it alone there.
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

DOCS = Path(__file__).resolve().parent
ROOT = DOCS.parent
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
# As root on a closed network: no sandbox, and nothing that phones home at start.
FLAGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
STUDY = "fashion-mnist-5M-quick"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def dashboard(url: str, artifacts: Path, env: dict[str, str] | None = None) -> Iterator[str]:
    """optuna-dashboard on `url` (by the `search.dashboard` module when `env` holds the
    URL in NAS_STORAGE, else the optuna-dashboard command); its address once it listens."""
    port = free_port()
    where = ["--host", "127.0.0.1", "--port", str(port), "--artifact-dir", str(artifacts)]
    if env:
        argv = [sys.executable, "-m", "search.dashboard"]
    else:
        argv = [str(Path(sys.executable).parent / "optuna-dashboard"), url]
    proc = subprocess.Popen(
        [*argv, *where],
        env=dict(os.environ, PYTHONPATH=str(ROOT), **(env or {})),
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
        yield f"http://127.0.0.1:{port}/dashboard"
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def run(*argv: str, cwd: Path) -> None:
    print("$", " ".join(argv), flush=True)
    subprocess.run([sys.executable, *argv], cwd=cwd, check=True, env=dict(os.environ))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--trials", type=int, default=20)
    ap.add_argument("--epochs", type=int, default=2, help="of the final training")
    ap.add_argument("--out", type=Path, default=DOCS)
    args = ap.parse_args()
    from playwright.sync_api import sync_playwright

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        url = f"sqlite:///studies/{STUDY}.db"  # the default storage, as a user has it
        run("-m", "search.run", "--dataset", "fashion-mnist", "--quick", "--no-progress",
            "--trials", str(args.trials), cwd=work)  # fmt: skip
        best = work / "studies" / STUDY / "best.json"
        run("-m", "search.train", str(best), "--epochs", str(args.epochs), "--seeds", "2",
            "--no-progress", "-o", "runs/final", cwd=work)  # fmt: skip
        html = work / "report.html"
        run("-m", "search.report", "--storage", url, "--study-name", STUDY,
            "--result", "runs/final/result.json", "-o", str(html), cwd=work)  # fmt: skip
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=FLAGS)
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            page.goto(html.as_uri())
            page.wait_for_selector(".js-plotly-plot .main-svg", timeout=60_000)
            page.screenshot(path=str(args.out / "report.png"))
            with dashboard(
                f"sqlite:///{work}/studies/{STUDY}.db", work / "studies" / STUDY / "artifacts"
            ) as address:
                page.goto(address)
                page.get_by_text(STUDY).first.click(timeout=60_000)
                page.wait_for_url("**/studies/*", timeout=30_000)
                page.wait_for_load_state("networkidle", timeout=60_000)
                time.sleep(3)  # the plots draw after the data arrives
                page.screenshot(path=str(args.out / "dashboard.png"))
            browser.close()
    print(f"wrote {args.out / 'report.png'} and {args.out / 'dashboard.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
