"""`uniformer-fast demo`: the page's logic on every kind of upload, then the page itself in a real
headless Chromium (Debian's chromium + chromium-driver, driven by selenium)."""
import os
import shutil
import time

import pytest
import torch

import uniformer_fast as uf
from uniformer_fast.apps import demo as demo_module
from uniformer_fast.apps.demo import DemoApp, DemoSettings, write_sample_video

from helpers import free_port, run_cli

SETTINGS = DemoSettings(num_frames=4, sample_rate=2, size=64, max_seconds=60, max_mb=5)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    m = uf.create_model("uniformer_small", depth=(1, 1, 1, 1), num_classes=400).eval()
    m.class_names = uf.class_names("k400")
    return m


@pytest.fixture
def app(model, tmp_path):
    uploads = tmp_path / "uploads"
    uploads.mkdir()
    return DemoApp(model, SETTINGS, upload_dirs=[str(uploads)]), uploads


def test_a_video_gets_the_top5_time_and_heatmap(app, model):
    app, uploads = app
    path = write_sample_video(str(uploads / "clip.mp4"), frames=20, height=72, width=96)
    result = app.analyse(path)
    assert result.ok, result.message
    assert [r[0] for r in result.rows] == [1, 2, 3, 4, 5]
    expected = uf.explain(model, path, num_frames=4, sample_rate=2, size=64)
    assert [r[1] for r in result.rows] == [name for _, name, _ in expected.top]
    assert [r[2] for r in result.rows] == [f"{p * 100:.2f}%" for _, _, p in expected.top]
    assert result.heatmap.shape == (2 * 64 + 2, 4 * 64 + 3 * 2, 3)  # both methods x 4 frames
    assert "Top-1:" in result.message and " ms** on cpu" in result.message
    assert "reference attention" in result.message
    # The generated sample: written once, under the demo's own folder, and it classifies.
    sample_path, sample = app.analyse_sample()
    assert sample.ok and app.sample() == sample_path and os.path.dirname(sample_path) == app.sample_dir


def test_random_weights_are_said_so(model):
    random = DemoApp(model, SETTINGS)
    assert "Random weights" in random.banner() and "mean nothing" in random.banner()
    named = DemoApp(model, DemoSettings(weights="/ckpt/uniformer_small_k400_16x4.pth"))
    assert "Random weights" not in named.banner() and "uniformer_small_k400_16x4.pth" in named.banner()
    _, result = random.analyse_sample()
    assert "Random weights" in result.message


def test_bad_uploads_get_a_message_and_the_next_request_works(app, tmp_path, monkeypatch):
    app, uploads = app
    good = write_sample_video(str(uploads / "good.mp4"), frames=12, height=64, width=64)
    text = uploads / "notes.mp4"
    text.write_text("not a video at all")
    empty = uploads / "empty.mp4"
    empty.write_bytes(b"")
    large = uploads / "large.mp4"
    with open(large, "wb") as f:
        f.truncate(6 * 10**6)  # sparse: 6 MB against the 5 MB limit
    long_video = write_sample_video(str(uploads / "long.mp4"), frames=40, height=32, width=32, fps=10)
    outside = tmp_path / "secret.mp4"
    shutil.copy(good, outside)
    link = uploads / "link.mp4"
    os.symlink(outside, link)
    too_long = DemoApp(app.model, DemoSettings(num_frames=4, size=64, max_seconds=2.0),
                       upload_dirs=[str(uploads)])
    cases = [
        (app, None, "no video: upload one"),
        (app, "", "no video"),
        (app, str(text), "'notes.mp4' is not a video this demo can decode"),
        (app, str(empty), "is not a video this demo can decode"),
        (app, str(large), "'large.mp4' is too large: 6.0 MB (the limit is 5 MB)"),
        (too_long, long_video, "'long.mp4' is too long: 4 s (the limit is 2 s)"),
        (app, str(outside), "'secret.mp4' is not an uploaded file"),
        (app, str(link), "'link.mp4' is not an uploaded file"),  # a link out of the upload folder
        (app, str(uploads / ".." / "secret.mp4"), "is not an uploaded file"),
        (app, "/etc/passwd", "'passwd' is not an uploaded file"),
        (app, str(uploads / "missing.mp4"), "the upload is gone"),
        (app, str(uploads), "is not a file"),
        (app, 42, "expected an uploaded file; got int"),
    ]
    for which, upload, match in cases:
        result = which.analyse(upload)
        assert not result.ok and result.rows == [] and result.heatmap is None, upload
        assert result.message.startswith("**Cannot use this upload:**") and match in result.message, \
            (upload, result.message)
        assert app.analyse(good).ok  # and the next request is served
    # An error nobody foresaw: reported in the page, and the demo goes on.
    calls = []

    def broken(*args, **kwargs):
        calls.append(1)
        raise RuntimeError("boom")

    monkeypatch.setattr(demo_module, "explain", broken)
    result = app.analyse(good)
    assert not result.ok and "**Internal error:** RuntimeError: boom" in result.message and calls
    monkeypatch.undo()
    assert app.analyse(good).ok


def test_gradio_file_objects_are_read_by_their_path(app):
    app, uploads = app
    path = write_sample_video(str(uploads / "clip.mp4"), frames=12, height=64, width=64)

    class FileData:  # what older Gradio versions hand over
        def __init__(self, name):
            self.name = name

    assert app.analyse(FileData(path)).ok


def test_cli_demo_arguments(capsys):
    for args, match in [
        (["demo", "--port", "0"], "--port: expected an integer in [1, 65535]"),
        (["demo", "--port", "70000"], "--port: expected an integer in [1, 65535]"),
        (["demo", "--max-seconds", "0"], "--max-seconds: expected a number > 0"),
        (["demo", "--max-mb", "-1"], "--max-mb: expected a number > 0"),
        (["demo", "--weights", "a.pth", "--pretrained", "uniformer_small_k400_16x4"], "not allowed with argument"),
        (["demo", "--weights", "missing.pth"], "checkpoint file not found"),
    ]:
        code, _, err = run_cli(args, capsys)
        assert code in (1, 2) and match in err and len(err.strip().splitlines()) == 1, (args, err)


# ---------------------------------------------------------------------------------------------
# In a browser.

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")


def _browser_missing():
    for module, install in (("gradio", "pip install -e '.[demo]'"), ("selenium", "pip install -e '.[test]'")):
        try:
            __import__(module)
        except ImportError:
            return f"{module} is not installed ({install})"
    if CHROMIUM is None or CHROMEDRIVER is None:
        return "no Chromium here (Debian: apt-get install chromium chromium-driver; .ci/run installs them)"
    return None


@pytest.fixture
def browser(monkeypatch):
    why = _browser_missing()
    if why and os.environ.get("UNIFORMER_FAST_REQUIRE_BROWSER"):  # CI: the test must run
        pytest.fail(f"UNIFORMER_FAST_REQUIRE_BROWSER is set but {why}")
    if why:
        pytest.skip(why)
    monkeypatch.setenv("SE_OFFLINE", "true")  # Selenium Manager never downloads a driver or browser
    from selenium import webdriver
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service
    options = Options()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                "--window-size=1280,1000"):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(60)
    yield driver
    driver.quit()


def test_the_page_in_chromium(browser, tmp_path):
    """Upload a generated clip, see the top-5 table and the heatmap; upload a text file, see the
    message; press *Generated sample*, see a result again. The screenshot goes to
    $UNIFORMER_FAST_DEMO_SCREENSHOT when set (the README's)."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    torch.manual_seed(0)
    model = uf.create_model("uniformer_small").eval()  # random weights: the page must say so
    settings = DemoSettings(num_frames=8, sample_rate=4, size=128)
    page, url = demo_module.launch(model, settings, port=free_port(), block=False)
    try:
        browser.get(url)
        wait = WebDriverWait(browser, 90)
        wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#upload input[type=file]"))
        assert "Random weights" in browser.find_element(By.ID, "banner").text

        def status():
            return browser.find_element(By.ID, "status").text

        def top5_rows():
            # Gradio's table is virtual (rows drawn as they scroll into view): read the DOM's text.
            rows = browser.execute_script(
                "return Array.from(document.querySelectorAll('#top5 [role=row]')).map(r => r.textContent)")
            return [r.split() for r in rows[1:] if r.strip()]  # rows[0]: the header

        def heatmap_width():
            imgs = browser.find_elements(By.CSS_SELECTOR, "#heatmap img")
            return browser.execute_script("return arguments[0].naturalWidth", imgs[0]) if imgs else 0

        clip = write_sample_video(str(tmp_path / "clip.mp4"), frames=40, height=120, width=160)
        browser.find_element(By.CSS_SELECTOR, "#upload input[type=file]").send_keys(clip)
        wait.until(lambda d: "Top-1" in status() and len(top5_rows()) == 5 and heatmap_width() > 0)
        rows = top5_rows()
        assert [r[0] for r in rows] == ["1", "2", "3", "4", "5"]
        assert all(r[1] == "class" and r[2].isdigit() and r[3].endswith("%") for r in rows), rows
        assert heatmap_width() == 8 * 128 + 7 * 2
        assert " ms on cpu" in status()
        screenshot = tmp_path / "demo.png"
        browser.save_screenshot(str(screenshot))
        assert screenshot.stat().st_size > 10_000
        if os.environ.get("UNIFORMER_FAST_DEMO_SCREENSHOT"):
            shutil.copy(screenshot, os.environ["UNIFORMER_FAST_DEMO_SCREENSHOT"])

        # A text file with a video's name: our message, in the page.
        browser.find_element(By.CSS_SELECTOR, "#upload button[aria-label='Clear']").click()
        bad = tmp_path / "notes.mp4"
        bad.write_text("not a video")
        wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#upload input[type=file]"))
        browser.find_element(By.CSS_SELECTOR, "#upload input[type=file]").send_keys(str(bad))
        wait.until(lambda d: "Cannot use this upload" in status())
        assert "'notes.mp4' is not a video this demo can decode" in status()

        # The server goes on serving: the generated sample.
        browser.find_element(By.ID, "sample").click()
        start = time.time()
        wait.until(lambda d: "Top-1" in status() and len(top5_rows()) == 5)
        assert time.time() - start < 90
    finally:
        page.close()
