"""p2pchat.js used as a library, as another frontend would: two P2PChat instances in one page.

The page is the server's own (for its origin); the module is imported and driven from the test.
Both instances are relay-only over TURN/UDP, so all traffic stays on loopback.
"""

from __future__ import annotations

import json
import time
import urllib.request
from typing import Any

import pytest

from realtools import need_module

need_module("playwright", "pip install -e '.[test]'")  # skip, or with CI set fail

from playwright.sync_api import Page  # noqa: E402  (after the check above)

from .browserkit import OpenPerson, ServerFactory, ServerProcess  # noqa: E402

pytestmark = pytest.mark.slow

TIMEOUT = 60.0  # s: WebRTC on a small, busy machine

SETUP = """
async () => {
  const { P2PChat } = await import('/static/p2pchat.js');
  const options = { relayOnly: true, turnTransport: 'udp' };
  window.a = new P2PChat(options);
  window.b = new P2PChat(options);
  window.log = [];
  const types = ['joined', 'peer-open', 'peer-left', 'message', 'file-start', 'file-received',
    'file-sent', 'file-failed', 'disconnected', 'error'];
  for (const [who, chat] of [['a', a], ['b', b]]) {
    for (const type of types) {
      chat.on(type, (d) => log.push({ who, type, code: d.code ?? null,
        direction: d.direction ?? null, name: d.name ?? null, text: d.text ?? null }));
    }
  }
}
"""


def get_json(url: str, data: dict[str, Any] | None = None) -> dict[str, Any]:
    request = urllib.request.Request(
        url,
        data=None if data is None else json.dumps(data).encode(),
        headers={"Content-Type": "application/json"},
    )
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with opener.open(request, timeout=30) as response:
        return dict(json.load(response))


def events(page: Page, **match: Any) -> list[dict[str, Any]]:
    log: list[dict[str, Any]] = page.evaluate("() => window.log")
    return [e for e in log if all(e.get(k) == v for k, v in match.items())]


def wait_for(page: Page, what: str, count: int = 1, **match: Any) -> list[dict[str, Any]]:
    deadline = time.monotonic() + TIMEOUT
    while len(found := events(page, **match)) < count:
        assert time.monotonic() < deadline, f"no {what} within {TIMEOUT} s: {events(page)}"
        page.wait_for_timeout(100)
    return found


def connections(server: ServerProcess) -> int:
    return int(get_json(f"{server.url}/healthz")["signaling"]["connections"])


def test_p2pchat_library(make_server: ServerFactory, people: OpenPerson) -> None:
    server = make_server()
    page = people("app").page
    page.goto(server.url)
    page.evaluate(SETUP)
    room = get_json(f"{server.url}/create-chat", {})["roomId"]

    # join() twice: the first attempt gives way (rejected as "left"), its socket is closed.
    first = page.evaluate(
        """async (room) => {
            const first = a.join(room).then(() => 'joined', (err) => err.code);
            await a.join(room);
            return await first;
        }""",
        room,
    )
    assert first == "left"
    deadline = time.monotonic() + TIMEOUT
    while connections(server) != 1:  # the server sees one socket of `a`, not two
        assert time.monotonic() < deadline, connections(server)
        page.wait_for_timeout(100)
    page.evaluate("(room) => b.join(room)", room)
    wait_for(page, "open chat channel", who="a", type="peer-open")
    wait_for(page, "open chat channel", who="b", type="peer-open")

    # A file cancelled by its sender: the promise rejects, the receiver drops it, no file.
    outcome = page.evaluate(
        """async () => {
            const file = new File([new Uint8Array(24 * 1024 * 1024)], 'big.bin');
            const transfer = a.sendFile(file);
            // Cancel once the receiver has some of it: mid-transfer, whatever the speed.
            b.on('file-progress', (d) => d.direction === 'in' && transfer.cancel(), { once: true });
            return await transfer.then(() => 'resolved', (err) => err.name);
        }"""
    )
    assert outcome == "AbortError"
    wait_for(page, "receiver's cancel", who="b", type="file-failed", code="cancelled")
    assert events(page, who="a", type="file-failed", code="cancelled")
    assert not events(page, type="file-received")

    # Files that lie: more bytes than announced, or bytes that do not match the hash.
    replies = page.evaluate(
        """async () => {
            const pc = a.links.get(b.peerId).pc;
            async function offer(header, chunks, end) {
                const channel = pc.createDataChannel('file');
                await new Promise((resolve) => (channel.onopen = resolve));
                const reply = new Promise((resolve) => {
                    channel.onmessage = (e) => resolve(e.data);
                });
                channel.send(JSON.stringify({ type: 'file', mime: 'text/plain', ...header }));
                for (const chunk of chunks) channel.send(chunk);
                if (end) channel.send(JSON.stringify(end));
                return JSON.parse(await reply);
            }
            const bytes = (n) => new Uint8Array(n).fill(7).buffer;
            return [
                await offer({ name: 'small.txt', size: 1000, hash: null },
                            [bytes(800), bytes(800)]),
                await offer({ name: 'bent.txt', size: 4, hash: 'sha256-chunks' }, [bytes(4)],
                            { type: 'end', sha256: '0'.repeat(64) }),
            ];
        }"""
    )
    assert replies == [
        {"type": "abort", "code": "too-large"},
        {"type": "abort", "code": "hash-mismatch"},
    ]
    assert events(page, who="b", type="file-failed", code="too-large")
    assert events(page, who="b", type="file-failed", code="hash-mismatch")
    assert not events(page, type="file-received")

    # A file that tells the truth still arrives, checked.
    page.evaluate("() => a.sendFile(new File(['hello file'], 'ok.txt'))")
    wait_for(page, "received file", who="b", type="file-received")
    wait_for(page, "sent file", who="a", type="file-sent")

    # sendText while the channel is closing: no exception, nobody counted.
    sent = page.evaluate(
        """() => { a.links.get(b.peerId).channel.close(); return a.sendText('into the void'); }"""
    )
    assert sent == 0

    # leave(), then join again on the same instance: it works, and it reports a lost server.
    page.evaluate("async (room) => { a.leave(); await a.join(room); }", room)
    wait_for(page, "second join", count=2, who="a", type="joined")
    wait_for(page, "b seeing a leave", who="b", type="peer-left")
    wait_for(page, "reopened chat channel", count=2, who="b", type="peer-open")
    page.evaluate("() => b.sendText('welcome back')")
    wait_for(page, "text after rejoining", who="a", type="message", text="welcome back")
    assert not events(page, type="disconnected")  # leave() is not a lost connection
    assert server.terminate() == 0
    wait_for(page, "disconnected on the reused instance", who="a", type="disconnected")
    wait_for(page, "disconnected", who="b", type="disconnected")
