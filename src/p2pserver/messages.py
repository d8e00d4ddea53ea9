"""The signaling wire format: JSON text frames, error codes and WebSocket close codes."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class ErrorCode:
    code: str
    message: str
    close: int | None = None  # WebSocket close code for fatal errors; None keeps the socket open


# Fatal: answered, then the socket is closed with `close`.
ROOM_NOT_FOUND = ErrorCode("room-not-found", "no such room (or it expired)", 4404)
PIN_REQUIRED = ErrorCode("pin-required", "this room needs a PIN", 4401)
WRONG_PIN = ErrorCode("wrong-pin", "wrong PIN", 4403)
TOO_MANY_ATTEMPTS = ErrorCode("too-many-attempts", "too many wrong PINs, try again later", 4429)
ROOM_FULL = ErrorCode("room-full", "the room is full", 4409)
JOIN_TIMEOUT = ErrorCode("join-timeout", "no join message in time", 4408)
TOO_MANY_CONNECTIONS = ErrorCode(
    "too-many-connections", "too many connections from your address", 4430
)
TOO_MANY_ERRORS = ErrorCode("too-many-errors", "too many invalid or excess messages", 4400)
TOO_SLOW = ErrorCode("too-slow", "messages for you piled up unread", 4420)
RESUME_REFUSED = ErrorCode(
    "resume-refused", "this resume token is not valid (used, expired, or for another room)", 4410
)
UNAVAILABLE = ErrorCode(
    "unavailable", "the server cannot reach its room store; try again shortly", 4503
)

# Non-fatal: answered, the message is dropped, the socket stays open.
BAD_MESSAGE = ErrorCode("bad-message", "malformed message")
UNKNOWN_PEER = ErrorCode("unknown-peer", "no such peer in this room")
TOO_LARGE = ErrorCode("too-large", "message too large")
RATE_LIMITED = ErrorCode("rate-limited", "too many messages, slow down")

FATAL_ERRORS: tuple[ErrorCode, ...] = (
    ROOM_NOT_FOUND,
    PIN_REQUIRED,
    WRONG_PIN,
    TOO_MANY_ATTEMPTS,
    ROOM_FULL,
    JOIN_TIMEOUT,
    TOO_MANY_CONNECTIONS,
    TOO_MANY_ERRORS,
    TOO_SLOW,
    RESUME_REFUSED,
    UNAVAILABLE,
)
NON_FATAL_ERRORS: tuple[ErrorCode, ...] = (BAD_MESSAGE, UNKNOWN_PEER, TOO_LARGE, RATE_LIMITED)

CLOSE_GOING_AWAY = 1001  # server shutting down
CLOSE_RESUMED = 4000  # the peer resumed on another connection; this one is closed (no leave)
CLOSE_INTERNAL_ERROR = 1011  # a fault on the server's side


class BadMessage(ValueError):
    """A frame that is not a JSON object with a string "type"."""


def parse(text: str) -> dict[str, Any]:
    try:
        message = json.loads(text)
    except ValueError:
        raise BadMessage("not JSON") from None
    except RecursionError:  # json.loads recurses once per nesting level
        raise BadMessage("nested too deeply") from None
    if not isinstance(message, dict):
        raise BadMessage("not a JSON object")
    if not isinstance(message.get("type"), str):
        raise BadMessage('missing string "type"')
    return message


# One encoder: json.dumps with any argument builds a new one per call, which costs more than
# the encoding of a small message itself. ASCII output: a lone surrogate ("\\ud800" in the
# input) would not encode as UTF-8 otherwise.
_encode = json.JSONEncoder(separators=(",", ":")).encode


def encode(message: dict[str, Any]) -> str:
    return _encode(message)


def signal_data_text(text: str, message: dict[str, Any]) -> str | None:
    """The "data" of a parsed signal exactly as its frame spelled it, when that is cheap to know.

    A client that writes `{"type":"signal","to":"ID","data":...}` (compact, these keys in this
    order, nothing else) has the data as the rest of the frame, so relaying it needs no
    re-encoding. None for any other spelling: then encode_signal re-encodes it. The text was
    parsed already, so a matching prefix can only be these three members: a "to" with quotes or
    backslashes in it is escaped in the text and does not match.
    """
    to = message.get("to")
    if len(message) != 3 or not isinstance(to, str) or not text.endswith("}"):
        return None
    prefix = f'{{"type":"signal","to":"{to}","data":'
    if not text.startswith(prefix):
        return None
    return text[len(prefix) : -1]


def encode_signal(sender: str, data: Any, data_text: str | None = None) -> str:
    """A relayed signal, as encode() would write it, without building the outer object.

    `sender` is a peer id the server made (URL-safe base64): it needs no escaping.
    `data_text`, if given, is the data already encoded (see signal_data_text).
    """
    if data_text is None:
        data_text = _encode(data)
    return f'{{"type":"signal","from":"{sender}","data":{data_text}}}'


def error(code: ErrorCode, detail: str | None = None) -> dict[str, Any]:
    return {"type": "error", "code": code.code, "message": detail or code.message}
