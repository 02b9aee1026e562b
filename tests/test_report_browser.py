"""report.html in a real headless browser: every image loads, no console error; the curves show learning."""

import base64
import io
import json
import os
import re
import shutil

import numpy as np
import pytest
from PIL import Image
from toys import make_task_stores

from stores import Store
from stores.__main__ import main as stores_main
from training.train import TrainConfig, train

CHROMIUM, DRIVER = shutil.which("chromium"), shutil.which("chromedriver")
REQUIRED = os.environ.get("PTGRM_REQUIRE_CHROMIUM") == "1"  # .ci/run installs both and sets this


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("report")
    train_store, test_store = make_task_stores(tmp / "stores", n_train=12, n_test=4)
    cfg = TrainConfig(
        train_store=str(train_store),
        test_store=str(test_store),
        runs_dir=str(tmp / "runs"),
        run="r",
        steps=20,
        batch=2,
        crop=32,
        workers=0,
        log_every=2,
    )
    train(cfg)
    return tmp / "runs" / "r"


def test_default_run_evaluates_several_times_and_logs_the_base_reference(run_dir):
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    evals = [r["step"] for r in rows if "eval_psnr_refined" in r]
    assert evals == [4, 8, 12, 16, 20]  # 5 evaluations over 20 steps by default
    losses = [r for r in rows if "loss_mean" in r]
    assert len(losses) == 10 and all(r["loss_base_mean"] > 0 for r in losses)
    assert (run_dir / "loss.png").stat().st_size > 0 and (run_dir / "psnr.png").stat().st_size > 0


def chromium():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for flag in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--disable-background-networking",
        "--disable-component-update",
        "--no-first-run",
        "--disable-sync",
        "--allow-file-access-from-files",
    ):
        opts.add_argument(flag)
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    return webdriver.Chrome(
        service=Service(DRIVER), options=opts
    )  # explicit driver: nothing is downloaded


def loaded(driver, page):
    """(src, loaded, natural width) of every image of `page`, and the console's errors."""
    driver.get(page.as_uri())
    images = driver.execute_script(
        "return Array.from(document.images).map(i => [i.getAttribute('src'), i.complete, i.naturalWidth])"
    )
    return images, [e for e in driver.get_log("browser") if e["level"] in ("SEVERE", "ERROR")]


needs_chromium = pytest.mark.skipif(
    not (CHROMIUM and DRIVER) and not REQUIRED,
    reason="needs Debian's chromium and chromium-driver (apt-get install chromium chromium-driver)",
)


@needs_chromium
def test_report_html_loads_every_image_without_console_errors(run_dir):
    driver = chromium()
    try:
        images, errors = loaded(driver, run_dir / "report.html")
        assert {src for src, _, _ in images} >= {"loss.png", "psnr.png"}
        assert len(images) >= 4 and all(done and width > 0 for _, done, width in images), images
        assert not errors, errors
        assert "PTG-RM run r" in driver.title
    finally:
        driver.quit()


@pytest.fixture(scope="module")
def catalog(run_dir):
    """`python -m stores catalog` of the run's store root, with its runs."""
    out = run_dir.parent.parent / "catalog.html"
    assert (
        stores_main(
            [
                "catalog",
                str(run_dir.parent.parent / "stores"),
                "--html",
                str(out),
                "--runs",
                str(run_dir.parent),
            ]
        )
        == 0
    )
    return out


def test_catalog_lists_every_store_member_and_run_gain_with_thumbnails(run_dir, catalog):
    page = catalog.read_text()
    result = json.loads((run_dir / "eval.json").read_text())
    stores = {p.parent for p in (run_dir.parent.parent / "stores").glob("*/manifest.json")}
    assert len(stores) == 2
    for path in stores:
        m = Store(path).manifest()
        assert f"<h2>{path.name}</h2>" in page
        for member, info in m["members"].items():
            assert (
                f"<td>{member}</td><td>complete</td><td>{info['tasks']}/{info['tasks']}</td>"
                f"<td>{info['key'][:12]}</td>"
            ) in page
    assert f"r {result['gain_psnr']:+.2f} dB" in page  # the run's gain beside the members it read
    thumbs = re.findall(r"src='data:image/png;base64,([^']+)'", page)
    assert len(thumbs) == 4  # lq and base of each store's first sample
    lq = Store(sorted(stores)[0]).array("pairs", "lq")[
        0
    ]  # the first sample of the first store listed
    first = np.asarray(Image.open(io.BytesIO(base64.b64decode(thumbs[0]))))
    h, w = Store(sorted(stores)[0]).array("pairs", "hw")[0]
    assert first.shape == (h, w, 3) and (first == lq[:h, :w]).all()


@needs_chromium
def test_catalog_html_opens_without_a_server_and_every_image_loads(catalog):
    driver = chromium()
    try:
        images, errors = loaded(driver, catalog)
        assert len(images) == 4 and all(done and width > 0 for _, done, width in images), images
        assert not errors, errors
        assert "Feature stores under" in driver.title
    finally:
        driver.quit()
