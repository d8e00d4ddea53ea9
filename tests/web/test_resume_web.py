"""The web client resumes a dropped signaling connection by itself (p2pchat.js, docs/web.md):
Bob's page reaches the server through a TCP proxy of the test's own, which cuts every
connection at once (no close frame: the browser sees 1006, as when a phone changes networks);
the page reconnects, resumes its place, and the chat goes on without anyone seeing it leave."""

from __future__ import annotations

import asyncio
import threading

import pytest

from realtools import need_module

need_module("playwright", "pip install -e '.[test]'")  # skip, or with CI set fail

from playwright.sync_api import expect  # noqa: E402  (after the check above)

from .browserkit import OpenPerson, ServerProcess  # noqa: E402
from .test_web_client import SLOW, create_chat, expect_connected, open_link, send_text  # noqa: E402

pytestmark = pytest.mark.slow


class CuttingProxy:
    """127.0.0.1:port -> the server's HTTP port; cut() drops every open connection (RST)."""

    def __init__(self, target: int) -> None:
        self.target = target
        self.port = 0
        self.websockets = 0  # WebSocket handshakes seen, in all
        self._loop = asyncio.new_event_loop()
        self._transports: set[asyncio.BaseTransport] = set()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)

    def start(self) -> None:
        self._thread.start()
        server = asyncio.run_coroutine_threadsafe(self._listen(), self._loop).result(10)
        self.port = server.sockets[0].getsockname()[1]
        self._server = server

    async def _listen(self) -> asyncio.Server:
        return await asyncio.start_server(self._handle, "127.0.0.1", 0)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            upstream_reader, upstream = await asyncio.open_connection("127.0.0.1", self.target)
        except OSError:
            writer.transport.abort()
            return
        self._transports.update((writer.transport, upstream.transport))

        async def pump(source: asyncio.StreamReader, sink: asyncio.StreamWriter, up: bool) -> None:
            first = up
            try:
                while data := await source.read(65536):
                    if first and data.startswith(b"GET /ws/"):
                        self.websockets += 1
                    first = False
                    sink.write(data)
                    await sink.drain()
            except (OSError, asyncio.IncompleteReadError):
                pass
            finally:
                sink.transport.abort()

        await asyncio.gather(pump(reader, upstream, True), pump(upstream_reader, writer, False))

    def cut(self) -> None:
        def abort_all() -> None:
            for transport in list(self._transports):
                transport.abort()
            self._transports.clear()

        self._loop.call_soon_threadsafe(abort_all)

    def stop(self) -> None:
        async def shutdown() -> None:  # no task left pending when the loop stops
            self._server.close()
            for transport in list(self._transports):
                transport.abort()
            tasks = [task for task in asyncio.all_tasks() if task is not asyncio.current_task()]
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

        asyncio.run_coroutine_threadsafe(shutdown(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop.close()


def test_dropped_signaling_is_resumed_and_the_chat_goes_on(
    server: ServerProcess, people: OpenPerson
) -> None:
    proxy = CuttingProxy(server.http_port)
    proxy.start()
    try:
        alice, bob = people("alice"), people("bob")
        link, _ = create_chat(alice, server, pin=True, query="?relay=1")
        pin = alice.page.locator("#pin-value").inner_text()
        via_proxy = link.replace(f":{server.http_port}/", f":{proxy.port}/")
        page = open_link(bob, via_proxy, "?relay=1")
        page.get_by_label("PIN", exact=True).fill(pin)
        page.get_by_role("button", name="Join").click()
        expect_connected(alice.page, "relayed")
        expect_connected(bob.page, "relayed")
        assert proxy.websockets == 1

        proxy.cut()  # Bob's signaling socket dies without a close frame
        bob_page = bob.page
        for _ in range(600):  # the page reconnects by itself, through the proxy (bounded wait)
            if proxy.websockets >= 2:
                break
            bob_page.wait_for_timeout(100)
        assert proxy.websockets >= 2
        expect(bob_page.locator("#status")).to_have_text("Connected to 1 person.", timeout=SLOW)
        send_text(bob_page, "still here")
        expect(alice.page.locator("#messages")).to_contain_text("still here", timeout=SLOW)
        send_text(alice.page, "welcome back")
        expect(bob_page.locator("#messages")).to_contain_text("welcome back", timeout=SLOW)
        # Nobody saw anyone leave or come: one peer each, no notices, no "reload".
        for person in (alice, bob):
            expect(person.page.locator("#peers li")).to_have_count(1)
            expect(person.page.locator("#messages")).not_to_contain_text("left the chat")
        expect(bob_page.locator("#messages")).not_to_contain_text("joined")
        assert "Lost the connection" not in (bob_page.locator("body").inner_text())
    finally:
        proxy.stop()
