# p2pserver in one container: HTTP (web client, rooms API, WebSocket signaling) on 3000/tcp,
# STUN/TURN on 3478/udp and 3478/tcp, TURN relays on UDP ports from --relay-ports (P2P_RELAY_PORTS).
# Configure it with P2P_* variables (every flag has one) or flags after the image name; see
# docs/deploy.md for publishing ports versus host networking, and docker-compose.yml.
#
# The install step is CI's own (`make install`: upgrade pip, then install the project), less the
# editable mode and the test extras, so what CI tests is what runs here.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_ROOT_USER_ACTION=ignore

WORKDIR /build
COPY pyproject.toml README.md LICENSE ./
COPY src ./src
RUN python -m pip install --quiet --upgrade pip \
 && python -m pip install --quiet '.[uvloop]' \
 && rm -rf /build

# An unprivileged user; its only writable places are the database volume and /tmp.
RUN useradd --system --user-group --uid 10001 --home-dir /data --no-create-home p2p \
 && mkdir /data \
 && chown p2p:p2p /data

# No P2P_RELAY_PORTS: the relay range stays the default (49152-65535), which host networking
# wants. With published ports, set it to the published range (docs/deploy.md). The server writes
# its real /healthz URL to P2P_HEALTH_FILE, so the HEALTHCHECK follows --http-port and the like.
ENV P2P_DB=/data/p2pserver.db \
    P2P_HTTP_PORT=3000 \
    P2P_TURN_PORT=3478 \
    P2P_HEALTH_FILE=/tmp/p2pserver.health

VOLUME /data
WORKDIR /data
USER p2p

# The relay range is not listed: EXPOSE cannot follow P2P_RELAY_PORTS, and `-P` on 16384 ports
# would be no help. Publish the range you configure (docs/deploy.md).
EXPOSE 3000/tcp 3478/udp 3478/tcp

# /healthz answers 200 while the database and the TURN server work.
HEALTHCHECK --interval=30s --timeout=5s --start-period=15s --retries=3 \
  CMD ["python", "-m", "p2pserver.healthcheck"]

ENTRYPOINT ["p2pserver"]
