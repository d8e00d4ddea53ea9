"""p2pserver: rooms, WebSocket signaling and a STUN/TURN server for peer-to-peer web chat."""

__version__ = "0.1.0"
