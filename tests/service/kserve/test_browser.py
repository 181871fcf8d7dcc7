"""CORS for real: a headless Chromium (``make sysdeps`` installs it) opens a web page on another origin that
calls the REST port with ``fetch``, as an autocompletion widget would: with an API key (so every call is
preflighted), a JSON tensor request, a refusal it must be able to read, a completion streamed as Server-Sent Events
read as it arrives, and OpenAI's completions API with the headers OpenAI's JavaScript SDK adds. A page of an origin
that ``SEQSERVE_CORS_ORIGINS`` does not list gets nothing: the browser refuses it."""

from __future__ import annotations

import json
import os
import queue
import shutil
import subprocess
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import unquote

import pytest

from tests.conftest import ServerHandle, server_settings
from tests.service.kserve.test_rest import KEY

STRICT = os.environ.get("SEQSERVE_STRICT_DEPLOY") == "1"  # make test: a missing browser fails, as a missing tool does

PAGE = """<!doctype html><html><body><script>
const base = "%(base)s", out = {};
const keyed = {"Content-Type": "application/json", "Authorization": "Bearer %(key)s"};
async function main() {
  let r = await fetch(base + "/v2/models/sentiment/infer", {method: "POST", headers: keyed,
    body: JSON.stringify({inputs: [{name: "TEXT", shape: [1], datatype: "BYTES", data: ["a fine film"]}]})});
  out.infer = {status: r.status, request_id: r.headers.get("X-Request-Id"), body: await r.json()};
  r = await fetch(base + "/v2/models/sentiment/infer", {method: "POST", body: "{}",
    headers: {"Content-Type": "application/json", "Authorization": "Bearer not-the-key-0123456789"}});
  out.refused = {status: r.status, www: r.headers.get("WWW-Authenticate"), body: await r.json()};
  r = await fetch(base + "/v2/models/charlm/generate_stream", {method: "POST", headers: keyed,
    body: JSON.stringify({text_input: "ab", max_tokens: 4, seed: 1})});
  const reader = r.body.getReader(), decoder = new TextDecoder();
  out.stream = {status: r.status, reads: 0, text: ""};
  for (;;) {
    const {done, value} = await reader.read();
    if (done) break;
    out.stream.reads += 1;
    out.stream.text += decoder.decode(value);
  }
  r = await fetch(base + "/v1/completions", {method: "POST",
    headers: {...keyed, "X-Stainless-OS": "Linux", "X-Stainless-Lang": "js", "X-Stainless-Retry-Count": "0"},
    body: JSON.stringify({model: "charlm", prompt: "ab", max_tokens: 3})});
  out.openai = {status: r.status, body: await r.json()};
}
main().then(() => report("done"), e => report("failed: " + e));
function report(how) { fetch("/report?" + encodeURIComponent(JSON.stringify({how, out}))); }
</script></body></html>
"""


def chromium() -> str:
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found is None:
        reason = "chromium is not installed (make sysdeps installs it)"
        if STRICT:
            pytest.fail(reason, pytrace=False)
        pytest.skip(reason)
    return found


class PageServer:
    """A web page's own origin: serves ``body`` at / and takes the page's report at /report."""

    def __init__(self) -> None:
        self.reports: queue.Queue[dict[str, Any]] = queue.Queue()
        self.body = b""
        page = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                if self.path.startswith("/report?"):
                    page.reports.put(json.loads(unquote(self.path.split("?", 1)[1])))
                    payload, kind = b"", "text/plain"
                else:
                    payload, kind = page.body, "text/html"
                self.send_response(200)
                self.send_header("Content-Type", kind)
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.origin = f"http://127.0.0.1:{self.httpd.server_port}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def open_page(page: PageServer, profile: Path) -> dict[str, Any]:
    """What the page reported after a headless Chromium ran it (the browser is stopped afterwards)."""
    browser = subprocess.Popen(
        [chromium(), "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
         "--no-first-run", f"--user-data-dir={profile}", "--remote-debugging-port=0", page.origin + "/"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        return page.reports.get(timeout=90)
    finally:
        browser.kill()
        browser.wait(timeout=30)


@pytest.fixture(scope="module")
def pages(tiny_models: Path) -> Iterator[tuple[PageServer, PageServer]]:
    """A page of a listed origin and one of an unlisted origin, both calling one server (API key on, CORS for the
    listed page's origin)."""
    listed, unlisted = PageServer(), PageServer()
    handle = ServerHandle(server_settings(tiny_models, http_port=0, api_key=KEY, cors_origins=listed.origin))
    for page in (listed, unlisted):  # (another origin than the pages': another port)
        page.body = (PAGE % {"base": f"http://127.0.0.1:{handle.server.http_port}", "key": KEY}).encode()
    yield listed, unlisted
    handle.close()
    listed.close()
    unlisted.close()


def test_a_listed_page_calls_the_rest_port_from_a_browser(pages: tuple[PageServer, PageServer], tmp_path: Path) -> None:
    listed, _ = pages
    report = open_page(listed, tmp_path)
    assert report["how"] == "done", report
    out = report["out"]
    infer = out["infer"]
    assert infer["status"] == 200 and infer["request_id"], infer  # the page reads X-Request-Id (exposed)
    assert [o["name"] for o in infer["body"]["outputs"]] == ["LABEL", "PROBABILITIES"]
    refused = out["refused"]  # the page reads a refusal's status, header and message, not an opaque failure
    assert (refused["status"], refused["www"].startswith("Bearer")) == (401, True), refused
    assert "authorization" in refused["body"]["error"].lower()
    stream = out["stream"]
    events = [json.loads(line[6:]) for line in stream["text"].split("\n") if line.startswith("data: ")]
    assert stream["status"] == 200 and len(events) == 4 and events[-1]["finish_reason"] == "length", stream
    openai = out["openai"]
    assert openai["status"] == 200 and len(openai["body"]["choices"][0]["text"]) == 3, openai


def test_an_unlisted_page_is_refused_by_the_browser(pages: tuple[PageServer, PageServer], tmp_path: Path) -> None:
    _, unlisted = pages
    report = open_page(unlisted, tmp_path)
    assert report["how"].startswith("failed: TypeError") and report["out"] == {}, report
