"""The reference web client as files: served at / and /static/, self-contained, packaged."""

from __future__ import annotations

import fnmatch
import re
import tomllib
from pathlib import Path

from httpkit import Server

import p2pserver

WEB = Path(p2pserver.__file__).parent / "web"
ROOT = Path(__file__).parents[2]


def web_files() -> list[Path]:
    return sorted(path for path in WEB.iterdir() if path.is_file())


async def test_page_and_everything_it_loads_are_served(server: Server) -> None:
    async with server.client() as http:
        page = await http.get("/")
        assert page.status_code == 200
        assert page.headers["content-type"].startswith("text/html")
        csp = page.headers["content-security-policy"]
        assert "default-src 'self'" in csp and "connect-src 'self'" in csp
        assert "frame-ancestors 'none'" in csp
        host = server.http_url.removeprefix("http://")
        assert f"connect-src 'self' ws://{host} wss://{host};" in csp
        assert page.headers["referrer-policy"] == "no-referrer"

        # Everything index.html links, and every module the scripts import, is there.
        wanted = set(re.findall(r'(?:src|href)="(/static/[^"]+)"', page.text))
        assert wanted == {"/static/app.js", "/static/style.css"}
        for script in [p for p in web_files() if p.suffix == ".js"]:
            for name in re.findall(r"^import .* from '\./([\w.-]+)';$", script.read_text(), re.M):
                wanted.add(f"/static/{name}")
        assert "/static/p2pchat.js" in wanted
        for path in sorted(wanted):
            response = await http.get(path)
            assert response.status_code == 200, path
            assert "content-security-policy" in response.headers, path
            if path.endswith(".js"):  # module scripts load only with a JavaScript MIME type
                assert response.headers["content-type"].startswith("text/javascript"), path

        # The API keeps its answers: unknown paths are JSON 404s, wrong methods 405.
        for path in ("/nope", "/static/nope.js", "/static/../app.py", "/static/"):
            response = await http.get(path)
            assert response.status_code == 404, path
            assert response.json()["error"] == "not-found"
        assert (await http.post("/")).status_code == 405


def test_web_client_loads_nothing_from_elsewhere() -> None:
    for path in web_files():
        text = path.read_text()
        assert not re.search(r"\bhttps?://", text), path  # no CDN, font or analytics URL
        assert not re.search(r"""(?:src|href)=["']?//|@import|url\(\s*["']?(?!data:)""", text)


def test_web_client_is_package_data() -> None:
    """A non-editable install (the Docker image) carries every file of the client."""
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    patterns = config["tool"]["setuptools"]["package-data"]["p2pserver"]
    files = [f"web/{path.name}" for path in web_files()]
    assert {"web/index.html", "web/app.js", "web/p2pchat.js", "web/style.css"} <= set(files)
    for name in files:
        assert any(fnmatch.fnmatch(name, pattern) for pattern in patterns), name


async def test_a_forged_host_header_cannot_change_the_page_policy(server: Server) -> None:
    async with server.client() as http:
        for host in ("evil.example; script-src *", "a b", "example.org:80/x", ""):
            csp = (await http.get("/", headers={"Host": host})).headers["content-security-policy"]
            assert "connect-src 'self';" in csp, host
            assert "script-src 'self';" in csp and "evil" not in csp, host
        ipv6 = (await http.get("/", headers={"Host": "[::1]:3000"})).headers
        assert "ws://[::1]:3000 wss://[::1]:3000;" in ipv6["content-security-policy"]
