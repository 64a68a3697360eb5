"""Screenshots of the MLflow UI after the quickstart, from a real browser: `docs/mlflow_*.png`.

    python scripts/ui_screenshots.py                 # runs the quickstart in a temp dir first (a few minutes)
    python scripts/ui_screenshots.py --workdir DIR   # reuse DIR/mlflow.db from an earlier `raylora run`

Runs `raylora run sweeps/quickstart.py` in a scratch directory, starts `mlflow ui` on 127.0.0.1, and drives
Debian's Chromium (`apt-get install chromium`) through playwright (`pip install playwright`; playwright's own
browser download is not needed) to save what README's "Comparing trials in MLflow" shows:

- `docs/mlflow_trials_table.png`: the link `raylora run` prints, the runs table of every trial grouped under
  its sweep run, with rank, lr, target modules, best eval loss, trainable params and memory;
- `docs/mlflow_compare_charts.png`: the sweep run's compare link, its trials as charts;
- `docs/mlflow_registered_adapter.png`: the registered best adapter, its description, tags and alias;
- `docs/quickstart_loss_curves.png`: `raylora report`'s loss curves of the same four trials.

`tests/test_tracking.py` uses `chromium_page` and `open_and_settle` from here to check the trials view in CI.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CHROMIUM = "/usr/bin/chromium"
# Headless in a sandbox-less container with no network: no GPU, no QUIC, none of the browser's own
# background traffic (component updates, sync, first-run pages).
CHROMIUM_ARGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
)
VIEWPORT = {"width": 1600, "height": 1000}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def mlflow_ui(backend_store_uri: str, *, timeout_s: float = 180) -> Iterator[str]:
    """`mlflow ui` on a free loopback port (one worker: a small machine starts it faster); yields its URL."""
    port = free_port()
    log = Path(tempfile.mkdtemp(prefix="mlflow-ui-")) / "server.log"
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "mlflow",
            "ui",
            "--backend-store-uri",
            backend_store_uri,
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--workers",
            "1",
        ],
        stdout=log.open("w"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until_up(url, timeout_s, str(log))
        yield url
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:  # a loaded machine: its job workers may not stop in time
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=30)


def wait_until_up(url: str, timeout_s: float, log: str = "") -> None:
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    tail = Path(log).read_text()[-2000:] if log else ""
    raise RuntimeError(f"MLflow at {url} did not answer within {timeout_s:.0f} s\n{tail}")


@contextlib.contextmanager
def chromium_page(*, viewport: dict[str, int] = VIEWPORT):
    """A playwright page in Debian's headless Chromium with a fresh profile (no saved MLflow UI state)."""
    from playwright.sync_api import sync_playwright

    if not Path(CHROMIUM).exists():
        raise RuntimeError(f"{CHROMIUM} not found: install Debian's Chromium (`apt-get install -y chromium`)")
    with tempfile.TemporaryDirectory(prefix="chromium-profile-") as profile, sync_playwright() as playwright:
        context = playwright.chromium.launch_persistent_context(
            profile, executable_path=CHROMIUM, args=list(CHROMIUM_ARGS), headless=True, viewport=viewport
        )
        try:
            yield context.pages[0] if context.pages else context.new_page()
        finally:
            context.close()


def close_assistant(page) -> None:
    """MLflow 3.17 opens its assistant panel beside every page on a first visit; close it to see the table."""
    panel_close = page.locator("button[aria-label='Close']").first
    with contextlib.suppress(Exception):
        panel_close.click(timeout=3000)


def open_and_settle(page, url: str, ready_text: str, *, timeout_ms: int = 60000) -> None:
    """Load `url` and wait until `ready_text` is on screen and the UI has stopped fetching."""
    page.goto(url)
    page.get_by_text(ready_text).first.wait_for(timeout=timeout_ms)
    with contextlib.suppress(Exception):
        page.wait_for_load_state("networkidle", timeout=10000)


def run_quickstart(workdir: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    command = [
        sys.executable,
        "-m",
        "raylora",
        "run",
        str(ROOT / "sweeps" / "quickstart.py"),
        "--verbose",
        "0",
    ]
    print("running:", " ".join(command), f"(in {workdir})", flush=True)
    subprocess.run(command, cwd=workdir, env=env, check=True)


def take_screenshots(workdir: Path, out: Path) -> list[Path]:
    from mlflow.tracking import MlflowClient

    from raylora.tracking import TRIALS_VIEW

    store = f"sqlite:///{(workdir / 'mlflow.db').resolve()}"
    client = MlflowClient(tracking_uri=store)
    experiment = client.get_experiment_by_name("quickstart")
    parent = client.search_runs(
        [experiment.experiment_id],
        filter_string="tags.`raylora.sweep` = 'quickstart' and attributes.run_name LIKE 'quickstart-%'",
        order_by=["attributes.start_time DESC"],
        max_results=1,
    )[0]
    children = client.search_runs(
        [experiment.experiment_id], filter_string=f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'"
    )
    best = client.get_model_version_by_alias("quickstart-adapter", "best")
    eid = experiment.experiment_id
    shots = {
        "mlflow_trials_table.png": (
            f"#/experiments/{eid}/runs?workflowType=machine_learning&viewStateShareKey={TRIALS_VIEW}",
            children[0].info.run_name,
        ),
        "mlflow_compare_charts.png": (
            f"#/experiments/{eid}/runs?workflowType=machine_learning&viewStateShareKey=raylora-"
            f"{parent.info.run_id}&compareRunsMode=CHART",
            "Parallel Coordinates",
        ),
        "mlflow_registered_adapter.png": (
            f"#/models/quickstart-adapter/versions/{best.version}",
            "Description",
        ),
    }
    out.mkdir(parents=True, exist_ok=True)
    written = []
    with mlflow_ui(store) as url, chromium_page() as page:
        for name, (fragment, ready) in shots.items():
            open_and_settle(page, f"{url}/{fragment}", ready)
            close_assistant(page)
            page.wait_for_timeout(1500)
            page.screenshot(path=str(out / name))
            written.append(out / name)
            print(f"wrote {out / name}: {url}/{fragment}", flush=True)
    written.append(write_loss_curves(parent.info.run_id, store, workdir, out))
    return written


def write_loss_curves(parent_run_id: str, store: str, workdir: Path, out: Path) -> Path:
    import shutil

    from raylora.report import write_report

    write_report(parent_run_id, workdir / "report", tracking_uri=store)
    target = out / "quickstart_loss_curves.png"
    shutil.copy(workdir / "report" / "loss_curves.png", target)
    print(f"wrote {target}", flush=True)
    return target


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, help="a directory holding mlflow.db from the quickstart")
    parser.add_argument("--out", type=Path, default=ROOT / "docs", help="where the PNG files go")
    args = parser.parse_args()
    if args.workdir is not None:
        take_screenshots(args.workdir, args.out)
        return 0
    with tempfile.TemporaryDirectory(prefix="raylora-ui-") as tmp:
        run_quickstart(Path(tmp))
        take_screenshots(Path(tmp), args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
