"""report.html in a real headless browser: every image loads, no console error; the curves show learning."""
import json
import os
import shutil

import pytest

from training.train import TrainConfig, train

from toys import make_task_stores

CHROMIUM, DRIVER = shutil.which("chromium"), shutil.which("chromedriver")
REQUIRED = os.environ.get("PTGRM_REQUIRE_CHROMIUM") == "1"  # .ci/run installs both and sets this


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("report")
    train_store, test_store = make_task_stores(tmp / "stores", n_train=12, n_test=4)
    cfg = TrainConfig(train_store=str(train_store), test_store=str(test_store), runs_dir=str(tmp / "runs"),
                      run="r", steps=20, batch=2, crop=32, workers=0, log_every=2)
    train(cfg, log=lambda *a: None)
    return tmp / "runs" / "r"


def test_default_run_evaluates_several_times_and_logs_the_base_reference(run_dir):
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    evals = [r["step"] for r in rows if "eval_psnr_refined" in r]
    assert evals == [4, 8, 12, 16, 20]  # 5 evaluations over 20 steps by default
    losses = [r for r in rows if "loss_mean" in r]
    assert len(losses) == 10 and all(r["loss_base_mean"] > 0 for r in losses)
    assert (run_dir / "loss.png").stat().st_size > 0 and (run_dir / "psnr.png").stat().st_size > 0


@pytest.mark.skipif(not (CHROMIUM and DRIVER) and not REQUIRED,
                    reason="needs Debian's chromium and chromium-driver (apt-get install chromium chromium-driver)")
def test_report_html_loads_every_image_without_console_errors(run_dir):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                 "--disable-background-networking", "--disable-component-update", "--no-first-run",
                 "--disable-sync", "--allow-file-access-from-files"):
        opts.add_argument(flag)
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(DRIVER), options=opts)  # explicit driver: nothing is downloaded
    try:
        driver.get((run_dir / "report.html").as_uri())
        images = driver.execute_script(
            "return Array.from(document.images).map(i => [i.getAttribute('src'), i.complete, i.naturalWidth])")
        assert {src for src, _, _ in images} >= {"loss.png", "psnr.png"}
        assert len(images) >= 4 and all(done and width > 0 for _, done, width in images), images
        errors = [e for e in driver.get_log("browser") if e["level"] in ("SEVERE", "ERROR")]
        assert not errors, errors
        assert "PTG-RM run r" in driver.title
    finally:
        driver.quit()
