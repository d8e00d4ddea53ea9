"""The connection check page as files: /check, what it loads, and the link to it from /."""

from __future__ import annotations

import re

from httpkit import Server


async def test_check_page_and_everything_it_loads_are_served(server: Server) -> None:
    async with server.client() as http:
        page = await http.get("/check")
        assert page.status_code == 200
        assert page.headers["content-type"].startswith("text/html")
        csp = page.headers["content-security-policy"]
        host = server.http_url.removeprefix("http://")
        # The page joins a room over the WebSocket, as the chat page does.
        assert f"connect-src 'self' ws://{host} wss://{host};" in csp
        assert "script-src 'self';" in csp and "frame-ancestors 'none'" in csp
        assert page.headers["referrer-policy"] == "no-referrer"

        wanted = set(re.findall(r'(?:src|href)="(/static/[^"]+)"', page.text))
        assert wanted == {"/static/check.js", "/static/check.css", "/static/style.css"}
        for path in sorted(wanted):
            response = await http.get(path)
            assert response.status_code == 200, path
            if path.endswith(".js"):  # module scripts load only with a JavaScript MIME type
                assert response.headers["content-type"].startswith("text/javascript"), path

        assert (await http.head("/check")).status_code == 200
        assert (await http.post("/check")).status_code == 405
        assert 'href="/check"' in (await http.get("/")).text  # the start page links to it
