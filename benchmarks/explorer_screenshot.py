"""A screenshot of the explorer (notebooks/14_explorer.ipynb) running in JupyterLab, taken with headless Chromium.

JupyterLab starts headless on a free port (no token, the app exposed to the page) in a temporary folder holding a
copy of the notebook; Playwright drives Debian's Chromium (``/usr/bin/chromium``: browsers are not downloaded)
to open it, run every cell, wait for the Generate button's work to finish and photograph the widget::

    .venv/bin/python benchmarks/explorer_screenshot.py --profile smoke --out reports/figures/14_explorer/explorer.png

The notebook samples the latest runs of ``--profile`` (``WURST_RUNS_DIR`` and friends, as for ``wurst run``): run
``05_stage_c`` (and ``12_finetune``, ``13_previewer`` for the adapter and the previews) on that profile first.
"""
from __future__ import annotations

import argparse
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = "/usr/bin/chromium"
# the flags the machine notes ask for: a closed network refuses Chromium's background connections
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start_lab(folder: Path, port: int, env: dict[str, str], log: Path) -> subprocess.Popen:
    jupyter = Path(sys.executable).with_name("jupyter")
    args = [str(jupyter), "lab", "--no-browser", f"--port={port}", "--ServerApp.ip=127.0.0.1",
            "--IdentityProvider.token=", "--ServerApp.password=", "--ServerApp.disable_check_xsrf=True",
            f"--ServerApp.root_dir={folder}", "--expose-app-in-browser", "--LabApp.news_url=",
            "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate"]
    if os.getuid() == 0:
        args.append("--allow-root")
    proc = subprocess.Popen(args, cwd=folder, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT,
                            start_new_session=True)
    deadline = time.time() + 120
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"jupyter lab exited: {log.read_text()[-2000:]}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return proc
        except OSError:
            time.sleep(0.5)
    raise TimeoutError(f"jupyter lab did not listen on port {port}: {log.read_text()[-2000:]}")


def screenshot(out: Path, profile: str = "smoke", timeout_s: float = 600, width: int = 1500,
               height: int = 950) -> Path:
    """Run the explorer notebook in a headless JupyterLab and write a PNG of the page with the widget in view."""
    from playwright.sync_api import sync_playwright

    if not Path(CHROMIUM).exists():
        raise FileNotFoundError(f"{CHROMIUM} is missing: apt-get install chromium")
    out = Path(out).resolve()
    folder = Path(tempfile.mkdtemp(prefix="wurst-lab-"))
    shutil.copy(ROOT / "notebooks" / "14_explorer.ipynb", folder / "14_explorer.ipynb")
    news = folder / ".settings" / "@jupyterlab" / "apputils-extension" / "notification.jupyterlab-settings"
    news.parent.mkdir(parents=True)
    news.write_text('{"fetchNews": "false"}\n')  # no "get notified about Jupyter news?" toast over the widget
    env = {**os.environ, "WURST_PROFILE": profile, "JUPYTER_RUNTIME_DIR": str(folder / ".runtime"),
           "JUPYTER_CONFIG_DIR": str(folder / ".config"), "JUPYTERLAB_SETTINGS_DIR": str(folder / ".settings"),
           "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    env.setdefault("WURST_RUNS_DIR", str(ROOT / "reports" / "runs"))
    port = _free_port()
    lab = _start_lab(folder, port, env, folder / ".lab.log")
    try:
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
            page = browser.new_page(viewport={"width": width, "height": height})
            page.goto(f"http://127.0.0.1:{port}/lab/tree/14_explorer.ipynb", timeout=120_000)
            page.wait_for_selector(".jp-Notebook", timeout=120_000)
            page.wait_for_function("() => window.jupyterapp && document.querySelector('.jp-Notebook .jp-Cell')",
                                   timeout=120_000)
            page.wait_for_function(  # the notebook's kernel is up before the cells are sent
                "() => { const w = window.jupyterapp.shell.currentWidget;"
                " const k = w && w.sessionContext && w.sessionContext.session && w.sessionContext.session.kernel;"
                " return k && k.status === 'idle'; }", timeout=120_000)
            page.evaluate("() => window.jupyterapp.commands.execute('notebook:run-all-cells')")
            page.wait_for_selector(".widget-button", timeout=timeout_s * 1000)
            page.wait_for_function("() => /image\\(s\\), seeds/.test(document.body.innerText)",
                                   timeout=timeout_s * 1000)
            news_toast = page.get_by_role("button", name="No", exact=True)
            if news_toast.count():
                news_toast.first.click()
            page.evaluate("() => window.jupyterapp.commands.execute('application:toggle-left-area')")
            page.evaluate("() => document.querySelector('.widget-hbox').scrollIntoView({block: 'center'})")
            time.sleep(1.0)  # let the images paint
            out.parent.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=str(out))
            browser.close()
    finally:
        os.killpg(lab.pid, signal.SIGTERM)
        try:
            lab.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(lab.pid, signal.SIGKILL)
        shutil.rmtree(folder, ignore_errors=True)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--profile", default="smoke", help="the runs the explorer samples (default: smoke)")
    parser.add_argument("--out", default=str(ROOT / "reports" / "figures" / "14_explorer" / "explorer.png"))
    parser.add_argument("--timeout", type=float, default=600, help="seconds to wait for the generation")
    args = parser.parse_args()
    print(screenshot(Path(args.out), args.profile, args.timeout))


if __name__ == "__main__":
    main()
