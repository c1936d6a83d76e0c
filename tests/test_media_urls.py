"""Media URLs stay outside: the server does not fetch an image URL that reaches a loopback,
private or otherwise non-public address (checked after name resolution, on every redirect,
connecting only to the address checked) unless its operator allows it; file:// URLs only from
an allowed directory.  A probe HTTP server on 127.0.0.1 records every request it gets: where a
URL is refused, it must not have been contacted at all."""

from __future__ import annotations

import asyncio
import io
import json
import socket
import threading
import urllib.error
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest

from omlx.media_fetch import MediaFetchError, fetch_url
from omlx.media_policy import MediaPolicy, MediaURLRefused, is_public_address
from omlx_process import omlx_server
from omlx.testing.tiny_vlm import TinyVLMSpec, build_vlm

VLM = "tiny-qwen2-vl"


def png_bytes(seed: int = 0) -> bytes:
    from PIL import Image

    pixels = (np.random.RandomState(seed).rand(40, 50, 3) * 255).astype(np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, "PNG")
    return out.getvalue()


# ---------------------------------------------------------------------------- probe server


class Probe:
    """An HTTP server on 127.0.0.1 that serves a PNG at /image.png, redirects /redirect?to=URL,
    and records every path it was asked for."""

    def __init__(self):
        self.hits: list[str] = []
        probe = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802 (http.server's name)
                probe.hits.append(self.path)
                if self.path.startswith("/image.png"):
                    body = png_bytes()
                    self.send_response(200)
                    self.send_header("Content-Type", "image/png")
                    self.send_header("Content-Length", str(len(body)))
                    self.end_headers()
                    self.wfile.write(body)
                elif self.path.startswith("/redirect?to="):
                    self.send_response(302)
                    self.send_header("Location", self.path.split("=", 1)[1])
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                else:
                    self.send_response(404)
                    self.send_header("Content-Length", "0")
                    self.end_headers()

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.port = self.httpd.server_address[1]
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def url(self, path: str = "/image.png", host: str = "127.0.0.1") -> str:
        return f"http://{host}:{self.port}{path}"

    def close(self):
        self.httpd.shutdown()


@pytest.fixture
def probe():
    running = Probe()
    yield running
    running.close()


@pytest.fixture(scope="module")
def module_probe():
    running = Probe()
    yield running
    running.close()


def fetch(url: str, policy: MediaPolicy, resolve=None) -> bytes:
    return asyncio.run(fetch_url(url, max_bytes=1 << 20, timeout_s=5, what="image", policy=policy,
                                 resolve=resolve))


def fake_dns(table: dict[str, list[str]], calls: list[str] | None = None):
    """A name lookup answering from `table` (as aiohttp's resolvers answer), recording calls."""

    async def resolve(host: str, port: int):
        if calls is not None:
            calls.append(host)
        if host not in table:
            raise OSError(f"{host}: name not known")
        return [{"hostname": host, "host": a, "port": port, "proto": 0, "flags": 0,
                 "family": socket.AF_INET6 if ":" in a else socket.AF_INET} for a in table[host]]

    return resolve


# ---------------------------------------------------------------------------- the policy


@pytest.mark.parametrize("address,public", [
    ("8.8.8.8", True), ("2001:4860:4860::8888", True), ("93.184.215.14", True),
    ("127.0.0.1", False), ("127.8.9.10", False), ("::1", False), ("0.0.0.0", False), ("::", False),
    ("10.1.2.3", False), ("172.16.0.1", False), ("192.168.1.1", False), ("100.64.0.1", False),
    ("169.254.169.254", False), ("fe80::1", False), ("fe80::1%eth0", False), ("fc00::1", False),
    ("224.0.0.1", False), ("239.255.255.250", False), ("ff02::1", False), ("240.0.0.1", False),
    ("255.255.255.255", False), ("192.0.2.1", False), ("198.18.0.1", False),
    ("::ffff:127.0.0.1", False), ("::ffff:10.0.0.1", False), ("::ffff:8.8.8.8", True),
    ("64:ff9b::7f00:1", False), ("2002:7f00:1::", False), ("2001:0:4136:e378:8000:63bf:80ff:fffe", False),
    ("not an address", False),
])
def test_which_addresses_are_public(address, public):
    assert is_public_address(address) is public


def test_policy_from_options():
    policy = MediaPolicy.from_options("Images.Example.com, cdn.example.org.", False, None)
    assert policy.allowed_domains == frozenset({"images.example.com", "cdn.example.org"})
    policy.check_host("IMAGES.example.com", "u")
    with pytest.raises(MediaURLRefused):
        policy.check_host("example.com", "u")
    assert MediaPolicy.from_options(None).allowed_domains is None
    assert MediaPolicy.from_options([]).allowed_domains is None


def test_local_files_only_from_the_allowed_directory(tmp_path):
    allowed = tmp_path / "media"
    allowed.mkdir()
    (allowed / "cat.png").write_bytes(png_bytes())
    (tmp_path / "secret.txt").write_text("secret")
    (allowed / "escape.png").symlink_to(tmp_path / "secret.txt")
    with pytest.raises(MediaFetchError) as refused:
        fetch(f"file://{allowed}/cat.png", MediaPolicy())
    assert refused.value.code == "media_url_not_allowed"
    policy = MediaPolicy.from_options(local_dir=str(allowed))
    assert fetch(f"file://{allowed}/cat.png", policy) == png_bytes()
    for outside in (f"file://{tmp_path}/secret.txt", f"file://{allowed}/../secret.txt",
                    f"file://{allowed}/escape.png", "file://otherhost/etc/passwd"):
        with pytest.raises(MediaFetchError) as refused:
            fetch(outside, policy)
        assert refused.value.code == "media_url_not_allowed", outside


# ---------------------------------------------------------------------------- the fetch


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost", "[::ffff:127.0.0.1]", "0.0.0.0", "127.1"])
@pytest.mark.slow
def test_loopback_urls_are_refused_before_any_byte_is_sent(probe, host):
    with pytest.raises(MediaFetchError) as refused:
        fetch(probe.url(host=host), MediaPolicy())
    assert refused.value.code in ("media_url_not_allowed", "invalid_image"), refused.value.message
    assert probe.hits == []


def test_a_name_that_resolves_to_a_private_address_is_refused(probe):
    calls = []
    dns = fake_dns({"images.example.com": ["93.184.215.14", "127.0.0.1"]}, calls)
    with pytest.raises(MediaFetchError) as refused:
        fetch(probe.url(host="images.example.com"), MediaPolicy(), dns)
    assert refused.value.code == "media_url_not_allowed"
    assert "127.0.0.1" in refused.value.message
    assert probe.hits == [] and calls == ["images.example.com"]


def test_a_name_that_does_not_resolve_fails_as_a_fetch(probe):
    with pytest.raises(MediaFetchError) as failed:
        fetch(probe.url(host="nowhere.example.com"), MediaPolicy(), fake_dns({}))
    assert failed.value.code == "image_fetch_failed" and "cannot resolve" in failed.value.message


def test_allowed_local_fetch_connects_to_the_address_it_checked(probe):
    # The name is looked up once, and the connection goes to that answer (the probe), not to
    # a second lookup's: a DNS answer cannot change between the check and the connection.
    calls = []
    dns = fake_dns({"images.example.com": ["127.0.0.1"]}, calls)
    assert fetch(probe.url(host="images.example.com"), MediaPolicy(allow_local=True), dns) == png_bytes()
    assert calls == ["images.example.com"]
    assert probe.hits == ["/image.png"]


def test_a_rebinding_name_cannot_reach_the_probe(probe):
    # The first answer is public and passes the check; any later lookup would say loopback.
    # The connection goes to the checked (unreachable) address, never to the probe.
    answers = iter([["93.184.215.14"]])
    calls = []

    async def rebinding(host: str, port: int):
        calls.append(host)
        address = next(answers, ["127.0.0.1"])[0]
        return [{"hostname": host, "host": address, "port": port, "proto": 0, "flags": 0, "family": socket.AF_INET}]

    with pytest.raises(MediaFetchError) as failed:
        asyncio.run(fetch_url(probe.url(host="rebind.example.com"), max_bytes=1 << 20, timeout_s=1.5, what="image",
                              policy=MediaPolicy(), resolve=rebinding))
    assert failed.value.code in ("image_fetch_failed", "image_fetch_timeout")
    assert calls == ["rebind.example.com"] and probe.hits == []


class _TrustsOneHost(MediaPolicy):
    """The policy, except that one test host counts as public: the probe plays a public
    server whose redirect must still be checked like any URL."""

    def check_addresses(self, host, addresses, url):
        if host != "public.example.com":
            super().check_addresses(host, addresses, url)


def test_every_redirect_is_checked(probe):
    target = Probe()  # where the redirect points: must never be contacted
    try:
        dns = fake_dns({"public.example.com": ["127.0.0.1"], "internal.example.com": ["10.0.0.7"],
                        "localhost": ["127.0.0.1", "::1"]})
        policy = _TrustsOneHost()
        for location in (target.url(), target.url(host="localhost"), "http://internal.example.com/x.png",
                         "http://169.254.169.254/latest/meta-data/", "file:///etc/passwd"):
            first = probe.url("/redirect?to=" + location, host="public.example.com")
            with pytest.raises(MediaFetchError) as refused:
                fetch(first, policy, dns)
            assert refused.value.code == "media_url_not_allowed", (location, refused.value.message)
        assert len(probe.hits) == 5 and target.hits == []
        # The same redirect is followed where the policy allows its target.
        first = probe.url("/redirect?to=" + target.url(), host="public.example.com")
        assert fetch(first, MediaPolicy(allow_local=True), dns) == png_bytes()
        assert target.hits == ["/image.png"]
    finally:
        target.close()


def test_redirect_loops_end(probe):
    looping = probe.url("/redirect?to=/redirect?to=/redirect?to=/redirect?to=/redirect?to=/redirect?to=/image.png")
    with pytest.raises(MediaFetchError) as failed:
        fetch(looping, MediaPolicy(allow_local=True))
    assert failed.value.code == "image_fetch_failed" and "redirects" in failed.value.message
    assert len(probe.hits) == 6


def test_allowed_domains_limit_every_hop(probe):
    policy = MediaPolicy.from_options(["localhost"], allow_local=True)
    assert fetch(probe.url(host="localhost"), policy) == png_bytes()
    with pytest.raises(MediaFetchError) as refused:
        fetch(probe.url(host="127.0.0.1"), policy)
    assert refused.value.code == "media_url_not_allowed"
    with pytest.raises(MediaFetchError):
        fetch(probe.url("/redirect?to=" + probe.url(), host="localhost"), policy)
    assert probe.hits == ["/image.png", "/redirect?to=" + probe.url()]


# ---------------------------------------------------------------------------- through the server


@pytest.fixture(scope="module")
def vlm_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("media-models")
    build_vlm(root / VLM, TinyVLMSpec(family="qwen2_vl"))
    return root


@pytest.fixture(scope="module")
def media_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("local-media")
    (folder / "cat.png").write_bytes(png_bytes())
    return folder


@pytest.fixture(scope="module")
def strict_server(vlm_dir, media_dir, tmp_path_factory):
    """The default policy, plus one directory local files may come from."""
    with omlx_server(vlm_dir, tmp_path_factory.mktemp("strict"), "--kv-cache-gb", "0.05",
                     "--allowed-local-media-path", str(media_dir), failure=pytest.fail) as running:
        yield running


@pytest.fixture(scope="module")
def open_server(vlm_dir, tmp_path_factory):
    """Local addresses allowed, but only the host named localhost (env, as a deployment sets it)."""
    with omlx_server(vlm_dir, tmp_path_factory.mktemp("open"), "--kv-cache-gb", "0.05",
                     "--allow-local-media-urls", env={"OMLX_ALLOWED_MEDIA_DOMAINS": "localhost"},
                     failure=pytest.fail) as running:
        yield running


def post(server, path: str, body: dict) -> tuple[int, dict]:
    request = urllib.request.Request(server.root + path, data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def chat(url: str) -> tuple[str, dict]:
    return "/v1/chat/completions", {"model": VLM, "max_tokens": 3, "messages": [{"role": "user", "content": [
        {"type": "text", "text": "what is this"}, {"type": "image_url", "image_url": {"url": url}}]}]}


def anthropic(url: str) -> tuple[str, dict]:
    return "/v1/messages", {"model": VLM, "max_tokens": 3, "messages": [{"role": "user", "content": [
        {"type": "image", "source": {"type": "url", "url": url}}, {"type": "text", "text": "what is this"}]}]}


def responses(url: str) -> tuple[str, dict]:
    return "/v1/responses", {"model": VLM, "max_output_tokens": 3, "input": [{"role": "user", "content": [
        {"type": "input_text", "text": "what is this"}, {"type": "input_image", "image_url": url}]}]}


def assert_refused(status: int, body: dict, family) -> None:
    assert status == 400, body
    if family is anthropic:
        assert body["type"] == "error" and body["error"]["type"] == "invalid_request_error", body
        assert "not allowed" in body["error"]["message"]
    else:
        assert body["error"]["code"] == "media_url_not_allowed", body
        assert body["error"]["type"] == "invalid_request_error"


@pytest.mark.parametrize("family", [chat, anthropic, responses])
def test_server_refuses_local_urls_by_default(strict_server, module_probe, family):
    before = len(module_probe.hits)
    for url in (module_probe.url(), module_probe.url(host="localhost"), module_probe.url(host="[::1]"),
                "http://169.254.169.254/latest/meta-data/", "http://10.0.0.1/x.png",
                "file:///etc/passwd"):
        assert_refused(*post(strict_server, *family(url)), family)
    assert len(module_probe.hits) == before  # never contacted


def test_server_reads_files_from_the_allowed_directory_only(strict_server, media_dir):
    status, body = post(strict_server, *chat(f"file://{media_dir}/cat.png"))
    assert status == 200, body
    assert body["usage"]["prompt_tokens"] > 10
    assert_refused(*post(strict_server, *chat(f"file://{media_dir}/../etc/passwd")), chat)


@pytest.mark.parametrize("family", [chat, anthropic, responses])
def test_server_fetches_what_its_operator_allows(open_server, module_probe, family):
    status, body = post(open_server, *family(module_probe.url(host="localhost")))
    assert status == 200, body
    assert module_probe.hits[-1] == "/image.png"


def test_server_checks_the_domain_on_every_redirect(open_server, module_probe):
    before = len(module_probe.hits)
    # 127.0.0.1 is not among the allowed domains, whether asked for or redirected to.
    assert_refused(*post(open_server, *chat(module_probe.url())), chat)
    assert len(module_probe.hits) == before
    redirect = module_probe.url("/redirect?to=" + module_probe.url(), host="localhost")
    assert_refused(*post(open_server, *chat(redirect)), chat)
    assert module_probe.hits[before:] == ["/redirect?to=" + module_probe.url()]  # the image never asked for
