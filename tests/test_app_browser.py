"""The web app as a person uses it: `python -m fff_vdi.app` on the tiny pipeline and a tiny random
SAM2, driven in Debian's headless Chromium by Playwright. Upload the bundled example, click (on the
object on frame 0, not on it on frame 3), make the mask, inpaint while a second tab's SAM2 job waits
in the queue, download the mp4, the frames and the masks, and check them against the input; a broken
upload gets a message in the page.

Screenshots of each state go to $FFF_VDI_SCREENSHOTS (default test-artifacts/app/; the committed
ones in docs/screenshots/ are made with FFF_VDI_SCREENSHOTS=docs/screenshots).
"""

from __future__ import annotations

import io
import os
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import REPO
from fff_vdi.app.__main__ import EXAMPLE
from fff_vdi.inference.video_io import open_video

pytestmark = pytest.mark.slow

SCREENSHOTS = Path(os.environ.get("FFF_VDI_SCREENSHOTS", REPO / "test-artifacts" / "app"))
VIEWPORT = {"width": 1280, "height": 1000}
# Where a click at image pixel (x, y) lands on the page, for Gradio's image (object-fit: scale-down).
IMAGE_RECT = """img => { const r = img.getBoundingClientRect(); const fit = getComputedStyle(img).objectFit;
  let k = Math.min(r.width / img.naturalWidth, r.height / img.naturalHeight);
  if (fit === 'scale-down') k = Math.min(k, 1); if (fit === 'none') k = 1;
  return {x: r.x + (r.width - img.naturalWidth * k) / 2, y: r.y + (r.height - img.naturalHeight * k) / 2, k: k}; }"""
JOB_TIMEOUT_MS = 240_000


@pytest.fixture(scope="module")
def chromium() -> str:
    path = shutil.which("chromium")
    if path is None:
        pytest.skip("Debian's chromium is not installed: scripts/setup_env.sh installs it (apt-get, as root); "
                    "elsewhere `apt-get install chromium` or put a chromium on PATH")
    return path


@pytest.fixture(scope="module")
def app_url(tiny_pipeline, tiny_sam2, tmp_path_factory):
    """The app on a free port, one window of 8 frames at 224x128, 1 step: about 20 s per job on a CPU."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    work = tmp_path_factory.mktemp("app")
    log = open(work / "app.log", "w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "fff_vdi.app", "--model", str(tiny_pipeline), "--sam", str(tiny_sam2), "--port", str(port),
         "--steps", "1", "--raft-iters", "1", "--height", "128", "--width", "224", "--window", "8", "--device", "cpu",
         "--workdir", str(work / "jobs")],
        cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/"
    try:
        deadline = time.monotonic() + 180
        while True:
            if proc.poll() is not None:
                pytest.fail(f"the app exited with {proc.returncode}:\n{(work / 'app.log').read_text()}")
            try:
                urllib.request.urlopen(url, timeout=2)
                break
            except OSError:
                if time.monotonic() > deadline:
                    pytest.fail(f"the app did not answer within 180 s:\n{(work / 'app.log').read_text()}")
                time.sleep(1)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


@pytest.fixture(scope="module")
def browser(chromium):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        # --no-sandbox: Chromium's sandbox does not run as root (CI containers).
        browser = playwright.chromium.launch(executable_path=chromium, args=["--no-sandbox", "--disable-dev-shm-usage"])
        yield browser
        browser.close()


def screenshot(page, name: str) -> None:
    """A full-page PNG in 256 colours (a fifth of the size, still readable)."""
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    image = Image.open(io.BytesIO(page.screenshot(full_page=True))).convert("RGB")
    image.quantize(256).save(SCREENSHOTS / f"{name}.png", optimize=True)


def open_app(browser, url: str):
    page = browser.new_context(viewport=VIEWPORT, accept_downloads=True).new_page()
    page.goto(url)
    page.locator("#segment-btn").wait_for(timeout=60_000)
    return page


def upload(page, path: Path) -> None:
    page.locator("#video-in input[type=file]").set_input_files(str(path))


# Gradio's image turns a click into a "select" only while its picture is loaded: in the tens of
# milliseconds after an update (a click's markers, another frame) it has no size and the click is not
# sent. A person sees the click go unlisted and clicks again; the test waits for the picture instead.
IMAGE_LOADED = """() => { const img = document.querySelector('#frame-view img');
  return img !== null && img.complete && img.naturalWidth > 0; }"""
IMAGE_SRC = "() => document.querySelector('#frame-view img').src"


def click_pixel(page, x: int, y: int) -> None:
    page.wait_for_function(IMAGE_LOADED, timeout=30_000)
    rect = page.locator("#frame-view img").evaluate(IMAGE_RECT)
    page.mouse.click(rect["x"] + (x + 0.5) * rect["k"], rect["y"] + (y + 0.5) * rect["k"])


def click_while_pending(page, first: tuple[int, int], second: tuple[int, int]) -> None:
    """The second click made while the first is still pending: the first's request to the queue is
    held back until the second has been made."""
    held = []
    page.route("**/queue/join*", lambda route: held.append(route))
    try:
        click_pixel(page, *first)
        deadline = time.monotonic() + 30
        while not held and time.monotonic() < deadline:
            page.wait_for_timeout(50)  # lets the route handler run
        assert held, "the first click sent no request"
        click_pixel(page, *second)
        page.wait_for_timeout(500)  # its request, if the page sends one, is held too
        for route in held:
            route.continue_()
            page.wait_for_timeout(200)  # in order
    finally:
        page.unroute("**/queue/join*")


def show_frame(page, index: int) -> None:
    before = page.evaluate(IMAGE_SRC)
    number = page.locator("#frame-slider input[type=number]")
    number.fill(str(index))
    number.press("Enter")
    page.wait_for_function(f"() => ({IMAGE_SRC})() !== {before!r}", timeout=30_000)  # the view follows the slider
    page.wait_for_function(IMAGE_LOADED, timeout=30_000)


def clicks_text(page) -> str:
    return page.locator("#clicks-text").inner_text()


def wait_for_text(page, selector: str, text: str | re.Pattern, timeout_ms: int = 30_000) -> None:
    page.locator(selector, has_text=text).wait_for(timeout=timeout_ms)


def make_mask(page) -> None:
    page.locator("#segment-btn").click()
    page.locator('#mask-video video[src*="masks.webm"]').wait_for(timeout=JOB_TIMEOUT_MS)


def hold_first_frame(page, selector: str) -> None:
    """The looping player paused on its first frame, once that frame is on screen: the screenshots show
    the same picture every run (the random SAM2's masks differ from frame to frame)."""
    player = f"document.querySelector('{selector} video')"
    page.wait_for_function(f"() => {{ const v = {player}; return v && v.readyState >= 2; }}", timeout=30_000)
    page.evaluate(f"""() => new Promise(resolve => {{
        const v = {player};
        v.pause();
        v.requestVideoFrameCallback(() => resolve());
        v.currentTime = 0.001;
        setTimeout(resolve, 5000);
    }})""")


def download_all(page, folder: Path) -> dict[str, Path]:
    folder.mkdir()
    links = page.locator("#downloads a")
    files = {}
    for i in range(links.count()):
        with page.expect_download() as download:
            links.nth(i).click()
        name = download.value.suggested_filename
        download.value.save_as(folder / name)
        files[name] = folder / name
    return files


def read_zip_pngs(path: Path) -> list[np.ndarray]:
    with zipfile.ZipFile(path) as archive:
        return [np.asarray(Image.open(io.BytesIO(archive.read(name)))) for name in sorted(archive.namelist())]


def test_click_mask_inpaint_download_while_a_second_job_queues(browser, app_url, tmp_path):
    page = open_app(browser, app_url)
    screenshot(page, "1-start")
    upload(page, EXAMPLE)
    page.locator("#frame-view img").wait_for(timeout=60_000)
    wait_for_text(page, "#frame-slider", "frame (of 8)")
    page.wait_for_timeout(500)
    screenshot(page, "2-uploaded")

    click_pixel(page, 120, 72)  # the large ellipse of the example, frame 0
    wait_for_text(page, "#clicks-text", "1 click(s)")
    show_frame(page, 3)
    # A click made while the one before is still being handled counts too (Gradio's default dropped it).
    click_while_pending(page, (30, 30), (40, 30))  # background, frame 3
    wait_for_text(page, "#clicks-text", "3 click(s)")
    page.locator("#click-kind").get_by_text("not on the object").click()
    click_pixel(page, 300, 20)
    wait_for_text(page, "#clicks-text", "4 click(s)")
    text = clicks_text(page)
    assert "object 1: + (120, 72) on frame 0" in text and "object 1: + (30, 30) on frame 3" in text
    assert "object 1: + (40, 30) on frame 3" in text and "object 1: - (300, 20) on frame 3" in text, text
    screenshot(page, "3-clicked")

    make_mask(page)
    wait_for_text(page, "#clicks-text", "Masks made")
    show_frame(page, 0)  # the random SAM2 leaves frame 3, with its "not on the object" click, empty
    hold_first_frame(page, "#mask-video")
    screenshot(page, "4-mask")

    # A second user: their SAM2 job must wait for the first user's inpainting (one GPU queue).
    other = open_app(browser, app_url)
    upload(other, EXAMPLE)
    other.locator("#frame-view img").wait_for(timeout=60_000)
    click_pixel(other, 60, 120)
    wait_for_text(other, "#clicks-text", "1 click(s)")

    page.locator("#inpaint-btn").click()
    wait_for_text(page, "#comparison", re.compile("processing|inpainting"), 60_000)  # the job runs: its status, or its progress
    other.locator("#segment-btn").click()
    wait_for_text(other, "#mask-video", "queue: 1/1", 30_000)
    screenshot(page, "5-inpainting")
    screenshot(other, "6-queued")
    page.locator("#downloads a").first.wait_for(timeout=JOB_TIMEOUT_MS)
    page.locator('#comparison video[src*="input_mask_result.webm"]').wait_for(timeout=30_000)
    hold_first_frame(page, "#comparison")
    hold_first_frame(page, "#mask-video")
    screenshot(page, "7-result")

    files = download_all(page, tmp_path / "downloads")
    assert sorted(files) == ["frames.zip", "inpainted.mp4", "masks.zip"]
    inputs = np.stack(list(open_video(EXAMPLE).frames()))  # as the app decoded the upload
    num_frames, height, width = inputs.shape[:3]
    result = open_video(files["inpainted.mp4"])
    assert (len(result), result.height, result.width) == (num_frames, height, width)
    assert result.fps == open_video(EXAMPLE).fps

    masks = np.stack(read_zip_pngs(files["masks.zip"]))
    frames = np.stack(read_zip_pngs(files["frames.zip"]))
    assert masks.shape == (num_frames, height, width) and set(np.unique(masks)) == {0, 1}
    assert frames.shape == inputs.shape
    outside = masks == 0
    assert np.array_equal(frames[outside], inputs[outside])  # untouched, bit for bit
    assert not np.array_equal(frames[~outside], inputs[~outside])  # inpainted
    mp4_frames = np.stack(list(result.frames())).astype(np.float32)
    mse = ((mp4_frames - frames) ** 2).mean()
    assert 10 * np.log10(255**2 / mse) > 25  # the mp4 is the same video, through a lossy codec (MPEG-4 part 2)

    other.locator('#mask-video video[src*="masks.webm"]').wait_for(timeout=JOB_TIMEOUT_MS)  # the queued job ran too


def test_a_broken_upload_gets_a_message_in_the_page(browser, app_url, tmp_path):
    broken = tmp_path / "holiday.mp4"
    broken.write_bytes(b"this is not a video")
    page = open_app(browser, app_url)
    upload(page, broken)
    toast = page.locator(".toast-body", has_text="holiday.mp4")
    toast.wait_for(timeout=60_000)
    assert "OpenCV cannot open this video: convert it to mp4" in toast.inner_text()
    assert "Traceback" not in page.content()
    screenshot(page, "8-broken-upload")

    page.locator("#inpaint-btn").click()  # nothing loaded: a message, not a crash
    page.locator(".toast-body", has_text="upload a video first").wait_for(timeout=30_000)
