"""The real `p2pserver` command: rooms survive SIGKILL, SIGTERM shuts down cleanly."""

from __future__ import annotations

import signal
import sqlite3
from pathlib import Path

from httpkit import StartProcess, wait_on_disk

from p2pserver import credentials


async def test_room_survives_sigkill_and_restart(
    start_process: StartProcess, tmp_path: Path
) -> None:
    db = tmp_path / "persist.db"
    process, server = await start_process("--no-turn", db=db)
    room_id, pin = await server.create_room(withPin=True, private=True)
    assert pin is not None
    first = await server.join(room_id, pin)
    await wait_on_disk(db, room_id)  # committed: milliseconds after create-chat answered
    process.kill()  # SIGKILL: no shutdown code runs

    process, server = await start_process("--no-turn", db=db)
    async with server.client() as http:
        checked = await http.get(f"/check-chat/{room_id}")
    assert checked.status_code == 200
    assert checked.json() == {"pin": True, "private": True}
    second = await server.join(room_id, pin)
    assert second.welcome["peers"] == []
    assert (
        second.welcome["iceTransportPolicy"] == "relay"
    )  # the room stayed private  # first's connection died with the old process

    wrong = await server.connect(room_id)
    await wrong.send({"type": "join", "pin": f"{(int(pin) + 1) % 10**6:06d}"})
    await wrong.expect_error("wrong-pin")

    # Without --secret the TURN secret lives in the database: the same across the restart.
    old, new = first.welcome["iceServers"][1], second.welcome["iceServers"][1]
    secret = _secret(db)
    assert old["credential"] == credentials.rest_password(secret, old["username"])
    assert new["credential"] == credentials.rest_password(secret, new["username"])


def _secret(db: Path) -> str:
    with sqlite3.connect(db) as conn:
        (value,) = conn.execute("SELECT value FROM meta WHERE key = 'turn_secret'").fetchone()
    return str(value)


async def test_sigterm_closes_websockets_with_1001_and_exits_0(
    start_process: StartProcess,
) -> None:
    process, server = await start_process(  # TURN included: the whole process shuts down
        "--turn-host",
        "127.0.0.1",
        "--turn-port",
        "0",  # free ports, bound by the server itself
    )
    room_id, _ = await server.create_room()
    a = await server.join(room_id)
    b = await server.join(room_id)
    waiting = await server.connect(room_id)  # connected, not joined
    process.signal(signal.SIGTERM)
    assert await a.closed() == 1001
    assert await b.closed() == 1001
    assert await waiting.closed() == 1001
    assert await process.wait() == 0, process.log()


async def test_secret_flag_signs_credentials(start_process: StartProcess) -> None:
    _, server = await start_process("--no-turn", "--secret", "shared-with-turn", "--ice-ttl", "60")
    room_id, _ = await server.create_room()
    peer = await server.join(room_id)
    turn = peer.welcome["iceServers"][1]
    assert turn["credential"] == credentials.rest_password("shared-with-turn", turn["username"])


async def test_room_ids_stay_out_of_the_log(start_process: StartProcess) -> None:
    process, server = await start_process("--no-turn", "--log-level", "info")
    room_id, _ = await server.create_room()
    await server.join(room_id)
    async with server.client() as http:
        assert (await http.get(f"/check-chat/{room_id}")).status_code == 200
    process.signal(signal.SIGTERM)
    assert await process.wait() == 0
    log = process.log()
    assert "/ws/<room>" in log  # uvicorn did log the connection, without the id
    assert room_id not in log
