"""Fixtures for the browser tests: a `p2pserver` process, Chromium, and people with pages."""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from .browserkit import (
    ARTIFACTS,
    CHROMIUM_ARGS,
    OpenPerson,
    Person,
    ServerFactory,
    ServerProcess,
    need_browser,
)

if TYPE_CHECKING:
    from playwright.sync_api import Browser, ConsoleMessage


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """One server for a module's tests: every test makes its own rooms."""
    need_browser()
    process = ServerProcess(tmp_path_factory.mktemp("server"))
    process.start()
    yield process
    process.kill()


@pytest.fixture
def make_server(tmp_path: Path) -> Iterator[ServerFactory]:
    """Servers for one test (which may stop them, or want other settings)."""
    need_browser()
    factory = ServerFactory(tmp_path)
    yield factory
    factory.kill_all()


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    # Module scope: Playwright's sync API runs its own event loop, kept apart from the
    # asyncio tests of other modules.
    chromium = need_browser()
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium, args=CHROMIUM_ARGS)
        yield browser
        browser.close()


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[Any]) -> Any:
    """Keep each phase's report on the test item, so fixtures can tell that a test failed."""
    report = yield
    setattr(item, f"report_{report.when}", report)
    return report


@pytest.fixture
def people(browser: Browser, request: pytest.FixtureRequest) -> Iterator[OpenPerson]:
    """`people("alice")` opens a new browser context; on failure, screenshots go to
    test-artifacts/ along with each page's console and the server log."""
    opened: list[Person] = []
    contexts = []

    def open_person(name: str) -> Person:
        context = browser.new_context(viewport={"width": 900, "height": 900})
        context.set_default_timeout(30_000)
        contexts.append(context)
        page = context.new_page()
        console: list[str] = []

        def keep(message: ConsoleMessage) -> None:
            console.append(f"{message.type}: {message.text}")

        page.on("console", keep)
        page.on("pageerror", lambda error: console.append(f"pageerror: {error}"))
        person = Person(name, page, console)
        opened.append(person)
        return person

    yield open_person
    report = getattr(request.node, "report_call", None)
    if report is not None and report.failed:
        ARTIFACTS.mkdir(exist_ok=True)
        stem = re.sub(r"[^\w.-]+", "_", request.node.name)
        for person in opened:
            with contextlib.suppress(Exception):
                if not person.page.is_closed():
                    person.page.screenshot(path=ARTIFACTS / f"{stem}-{person.name}.png")
            (ARTIFACTS / f"{stem}-{person.name}.console.txt").write_text("\n".join(person.console))
        servers = []
        if "server" in request.fixturenames:
            servers.append(request.getfixturevalue("server"))
        if "make_server" in request.fixturenames:
            servers += request.getfixturevalue("make_server").started
        for number, server in enumerate(servers):
            (ARTIFACTS / f"{stem}-server{number}.log").write_text(server.log())
    for context in contexts:
        with contextlib.suppress(Exception):
            context.close()
