"""`examples/app.py`: `generate` without Gradio (fast), and the whole app driven in headless Chromium (slow).

The browser test talks the Chrome DevTools protocol over `--remote-debugging-pipe` (NUL-separated JSON on file
descriptors 3 and 4), so it needs no driver package: only Gradio (`pip install -e ".[app]"`) and a Chromium binary
(`apt-get install -y chromium`). `APP_SCREENSHOT=docs/app.png pytest -m slow tests/test_app.py` rewrites the README's
screenshot.
"""

import base64
import fcntl
import importlib.util
import json
import os
import re
import select
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest


ROOT = Path(__file__).resolve().parents[1]
APP = ROOT / "examples" / "app.py"
PROMPT, NEGATIVE_PROMPT = "a handwritten digit", "three"


def _load_app():
    spec = importlib.util.spec_from_file_location("onestep_app", APP)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # a fresh copy each time; dataclasses look their module up here
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def digits_pipe():
    return _load_app().load_pipeline(None, "cpu")


def test_generate_needs_no_gradio(monkeypatch, digits_pipe):
    monkeypatch.setitem(sys.modules, "gradio", None)  # `import gradio` now raises ImportError
    app = _load_app()

    def pixels(**kwargs):
        result = app.generate(digits_pipe, PROMPT, **kwargs)
        assert result.image.size == (256, 256)  # 8x8 digits, upscaled 32x
        assert result.milliseconds > 0 and re.search(r"\d ms\*\*", result.summary)
        return result, result.image.tobytes()

    plain, plain_pixels = pixels(method="none", negative_prompt=NEGATIVE_PROMPT)
    assert plain.nfe == 1 and plain.summary.endswith("1 network evaluation")
    assert pixels(method="none")[1] == plain_pixels  # "none" passes no negative to the pipeline
    assert pixels(method="NASA", negative_prompt="  ")[1] == plain_pixels  # an empty negative: the plain call

    nasa, nasa_pixels = pixels(method="NASA", negative_prompt=NEGATIVE_PROMPT)
    assert nasa_pixels != plain_pixels and "NASA at its default scale" in nasa.summary
    assert pixels(method="NASA", negative_prompt=NEGATIVE_PROMPT)[1] == nasa_pixels  # seeded
    assert pixels(method="NASA", negative_prompt=NEGATIVE_PROMPT, seed=1)[1] != nasa_pixels

    nag, nag_pixels = pixels(method="NAG", negative_prompt=NEGATIVE_PROMPT, scale=2.0, steps=2)
    assert nag.nfe == 2 and nag_pixels != nasa_pixels and "NAG at scale 2" in nag.summary

    with pytest.raises(ValueError, match="method"):
        app.generate(digits_pipe, PROMPT, method="cfg")
    with pytest.raises(ValueError, match="steps"):
        app.generate(digits_pipe, PROMPT, steps=5)


def test_any_pipeline_directory(tmp_path, dummy_components):
    from diffusers_onestep import OneStepPipeline

    OneStepPipeline(**dummy_components).save_pretrained(tmp_path)
    app = _load_app()
    pipe = app.load_pipeline(tmp_path, "cpu")  # through diffusers' DiffusionPipeline loader
    assert isinstance(pipe, OneStepPipeline)
    result = app.generate(pipe, "a cat", negative_prompt="a dog", method="NAG", steps=3)
    assert result.image.size == (256, 256) and result.nfe == 3


# --------------------------------------------------------------------------- the app in headless Chromium


class _Chromium:
    r"""Headless Chromium on one page, driven through the DevTools protocol over a pipe (no driver package)."""

    def __init__(self, executable: str, profile: Path, width: int = 1100, height: int = 700, timeout: float = 60):
        to_browser_r, self._to_browser = os.pipe()
        self._from_browser, from_browser_w = os.pipe()

        def at_fds_3_and_4():  # in the child: dup past 4 first, so that dup2 never hits its own number (keeps CLOEXEC)
            read, write = (fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 10) for fd in (to_browser_r, from_browser_w))
            os.dup2(read, 3)
            os.dup2(write, 4)

        flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
                 "--no-default-browser-check", "--hide-scrollbars", "--remote-debugging-pipe",
                 f"--user-data-dir={profile}", f"--window-size={width},{height}", "about:blank"]  # fmt: skip
        self.log = profile.with_suffix(".log")
        with open(self.log, "w") as log:
            self.process = subprocess.Popen(
                [executable, *flags], preexec_fn=at_fds_3_and_4, close_fds=False, stdout=log, stderr=log
            )
        os.close(to_browser_r)
        os.close(from_browser_w)
        self.timeout, self._id, self._buffer = timeout, 0, b""
        targets = self.send("Target.getTargets")["targetInfos"]
        page = next(target for target in targets if target["type"] == "page")
        self.session = self.send("Target.attachToTarget", targetId=page["targetId"], flatten=True)["sessionId"]
        # the window size includes the browser's own frame: fix the page's viewport itself (layout and screenshot)
        self.page("Emulation.setDeviceMetricsOverride", width=width, height=height, deviceScaleFactor=1, mobile=False)

    def send(self, method: str, session: str | None = None, **params) -> dict:
        self._id += 1
        message = {"id": self._id, "method": method, "params": params, **({"sessionId": session} if session else {})}
        os.write(self._to_browser, json.dumps(message).encode() + b"\0")
        deadline = time.monotonic() + self.timeout
        while True:
            while b"\0" not in self._buffer:
                if not select.select([self._from_browser], [], [], max(0.0, deadline - time.monotonic()))[0]:
                    raise TimeoutError(f"Chromium did not answer {method} in {self.timeout} s")
                chunk = os.read(self._from_browser, 1 << 20)
                if not chunk:
                    raise RuntimeError(f"Chromium closed the pipe during {method}: {self.log.read_text()[-2000:]}")
                self._buffer += chunk
            raw, self._buffer = self._buffer.split(b"\0", 1)
            reply = json.loads(raw)
            if reply.get("id") == self._id:  # anything else is an event
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply["result"]

    def page(self, method: str, **params) -> dict:
        return self.send(method, session=self.session, **params)

    def js(self, expression: str):
        result = self.page("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        if "exceptionDetails" in result:
            raise RuntimeError(f"{expression}: {result['exceptionDetails']}")
        return result["result"].get("value")

    def wait_for(self, expression: str, timeout: float, what: str):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if value := self.js(expression):
                return value
            time.sleep(0.2)
        text = self.js("document.body ? document.body.innerText : ''")
        raise AssertionError(f"no {what} after {timeout} s; the page reads:\n{text}")

    def type_into(self, selector: str, text: str) -> None:
        self.js(f"(() => {{ const el = document.querySelector({json.dumps(selector)}); el.focus(); el.select(); }})()")
        self.page("Input.insertText", text=text)  # replaces the selection, with the input events of real typing

    def click(self, selector: str) -> None:
        x, y = self.js(  # a mouse event outside the viewport reaches no element: scroll to it first
            f"(() => {{ const el = document.querySelector({json.dumps(selector)}); el.scrollIntoView({{block: 'center'}}); "
            "const r = el.getBoundingClientRect(); return [r.x + r.width / 2, r.y + r.height / 2]; })()"
        )
        for kind in ("mousePressed", "mouseReleased"):
            self.page("Input.dispatchMouseEvent", type=kind, x=x, y=y, button="left", clickCount=1)

    def close(self) -> None:
        try:
            self.send("Browser.close")
        except (OSError, RuntimeError, TimeoutError):
            pass
        os.close(self._to_browser)
        os.close(self._from_browser)
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_for_server(url: str, server: subprocess.Popen, log: Path, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise AssertionError(f"the app exited with {server.returncode}:\n{log.read_text()[-4000:]}")
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(0.3)
    raise AssertionError(f"the app did not answer {url} in {timeout} s:\n{log.read_text()[-4000:]}")


@pytest.mark.slow
def test_app_in_headless_chromium(tmp_path):
    pytest.importorskip("gradio", reason='gradio is not installed (pip install -e ".[app]")')
    chromium = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    if chromium is None:
        pytest.skip("Chromium is not installed (apt-get install -y chromium)")

    port, log = _free_port(), tmp_path / "app.log"
    url = f"http://127.0.0.1:{port}/"
    env = dict(os.environ, GRADIO_ANALYTICS_ENABLED="False", GRADIO_TEMP_DIR=str(tmp_path / "gradio"),
               OMP_NUM_THREADS="1")  # fmt: skip
    with open(log, "w") as out:
        server = subprocess.Popen(
            [sys.executable, str(APP), "--port", str(port), "--share", "false", "--device", "cpu"],
            cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT,
        )  # fmt: skip
    try:
        _wait_for_server(url, server, log, timeout=180)
        browser = _Chromium(chromium, tmp_path / "chromium-profile")
        try:
            navigation = browser.page("Page.navigate", url=url)
            assert "errorText" not in navigation, navigation
            browser.wait_for("!!document.querySelector('#generate')", 60, "generate button")
            browser.type_into("#prompt textarea", PROMPT)
            browser.type_into("#negative_prompt textarea", NEGATIVE_PROMPT)
            browser.click("#generate")
            src, width = browser.wait_for(
                "(() => { const img = document.querySelector('#image img'); "
                "return img && img.getAttribute('src') && img.complete && img.naturalWidth > 0 "
                "? [img.src, img.naturalWidth] : null; })()",
                120,
                "generated image",
            )
            info = browser.wait_for(
                "(() => { const text = document.querySelector('#info').innerText; return /\\d ms/.test(text) && text; })()",
                30,
                "milliseconds text",
            )
            browser.wait_for(  # gradio fades its loading overlay out over the new image: screenshot after it
                "(() => { const tracker = document.querySelector('#image [data-testid=status-tracker]'); "
                "return !tracker || getComputedStyle(tracker).opacity === '0'; })()",
                10,
                "faded loading overlay",
            )
            screenshot = base64.b64decode(browser.page("Page.captureScreenshot", format="png")["data"])
        finally:
            browser.close()
    finally:
        server.terminate()
        server.wait(timeout=30)

    assert src.startswith(url) and width == 256, (src, width)
    assert re.fullmatch(r"\d+\.\d ms · 1 network evaluation · NASA at its default scale", info.strip()), info
    assert screenshot.startswith(b"\x89PNG") and len(screenshot) < 200_000
    Path(os.environ.get("APP_SCREENSHOT") or tmp_path / "app.png").write_bytes(screenshot)
