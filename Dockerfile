# p2pserver in one container: HTTP (web client, rooms API, WebSocket signaling) on 3000/tcp,
# STUN/TURN on 3478/udp and 3478/tcp, TURN relays on 49160-49200/udp. Configure it with P2P_*
# variables (every flag has one); see docs/deploy.md, and docker-compose.yml for an example.
#
# The install step is CI's own (`make install`: upgrade pip, then install the project), less the
# editable mode and the test extras, so what CI tests is what runs here.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /build
COPY pyproject.toml README.md LICENSE ./
COPY src ./src
RUN python -m pip install --quiet --upgrade pip \
 && python -m pip install --quiet '.[uvloop]' \
 && rm -rf /build

# An unprivileged user; its only writable place is the database volume.
RUN useradd --system --user-group --uid 10001 --home-dir /data --no-create-home p2p \
 && mkdir /data \
 && chown p2p:p2p /data

ENV P2P_DB=/data/p2pserver.db \
    P2P_HTTP_PORT=3000 \
    P2P_TURN_PORT=3478 \
    P2P_RELAY_PORTS=49160-49200

VOLUME /data
WORKDIR /data
USER p2p

EXPOSE 3000/tcp 3478/udp 3478/tcp 49160-49200/udp

# /healthz answers 200 while the database and the TURN server work; urlopen raises otherwise.
HEALTHCHECK --interval=30s --timeout=5s --start-period=15s --retries=3 \
  CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:' + os.environ.get('P2P_HTTP_PORT', '3000') + '/healthz', timeout=4)"]

ENTRYPOINT ["p2pserver"]
