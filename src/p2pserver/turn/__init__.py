"""The STUN/TURN server: sans-I/O protocol core (stun, auth, policy, allocation, handlers,
datapath, framing) and the asyncio layer around it (server, relay)."""
