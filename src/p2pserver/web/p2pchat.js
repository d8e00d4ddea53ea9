// p2pchat.js: rooms, signaling and WebRTC for p2pserver, in one module with no DOM access.
// Copy it into any frontend. Protocol: docs/api.md. Everything is reported as events:
//
//   const chat = new P2PChat({ relayOnly: false });
//   chat.addEventListener('message', (e) => console.log(e.detail.peerId, e.detail.text));
//   await chat.join(roomId, pin);            // rejects with a JoinError (wrong-pin, room-full, ...)
//   chat.sendText('hello'); chat.sendFile(file); await chat.startCall();
//
// Events (CustomEvent, data in `detail`):
//   joined {peerId, peers}            peer-joined {peerId}          peer-left {peerId}
//   peer-state {peerId, state, retrying}  connectionState: connecting, connected, failed (retrying:
//                                     an ICE restart follows)...
//   peer-open {peerId}                the chat channel is open: text and files can go
//   peer-closed {peerId}              the chat channel closed (peer gone, connection lost)
//   peer-path {peerId, relayed, local, remote, protocol}   from getStats' selected candidate pair
//   message {peerId, text}
//   file-start {peerId, id, direction: 'in'|'out', name, size}
//   file-progress {peerId, id, direction, bytes, size, buffered (sending: bytes queued)}
//   file-received {peerId, id, name, size, mime, blob, verified: true|false|null}
//   file-sent {peerId, id, verified}  file-failed {peerId, id, direction, reason}
//   remote-stream {peerId, stream}    remote-stream-ended {peerId}
//   disconnected {code, reason, error} the signaling WebSocket closed (server gone, network lost)
//   warning {code, message}           a non-fatal signaling error

const CHUNK = 64 * 1024; // data channel message size every current browser accepts
const HIGH_WATER = 2 * 1024 * 1024; // stop reading the file while this much is queued...
const LOW_WATER = 512 * 1024; // ...and go on when the queue drains below this
const BLOB_BATCH = 16 * 1024 * 1024; // fold received chunks into a Blob this often (less memory)

export class JoinError extends Error {
  constructor(code, message) {
    super(message);
    this.name = 'JoinError';
    this.code = code; // room-not-found, pin-required, wrong-pin, too-many-attempts, room-full, ...
  }
}

/** True where crypto.subtle exists: secure contexts only (HTTPS, or plain HTTP to localhost). */
export const canHash = () => Boolean(globalThis.crypto?.subtle);

async function api(server, path, init) {
  const response = await fetch(new URL(path, server), init);
  const body = await response.json().catch(() => ({}));
  return { status: response.status, body };
}

/** Keep only the TURN URLs of one transport ('udp' or 'tcp'); drop servers left without URLs. */
export function filterIceServers(iceServers, transport) {
  if (!transport) return iceServers;
  return iceServers
    .map((server) => {
      const urls = [].concat(server.urls).filter((url) => {
        if (!/^turns?:/.test(url)) return true; // STUN stays
        // turns: is TLS over TCP: a test forcing "tcp" wants plain TURN over TCP only.
        return url.startsWith('turn:') && url.endsWith(`?transport=${transport}`);
      });
      return { ...server, urls };
    })
    .filter((server) => server.urls.length > 0);
}

function hex(buffer) {
  return Array.from(new Uint8Array(buffer), (b) => b.toString(16).padStart(2, '0')).join('');
}

/**
 * SHA-256 over a file sent in chunks. crypto.subtle.digest() cannot be fed piece by piece, so
 * each chunk is hashed and the file's digest is SHA-256 of the chunk digests in order (a hash
 * list): memory stays bounded for any file size and any change, loss or reordering shows.
 */
class ChunkHasher {
  constructor() {
    this.digests = [];
  }
  add(chunk) {
    this.digests.push(crypto.subtle.digest('SHA-256', chunk));
  }
  async final() {
    const parts = await Promise.all(this.digests);
    const all = new Uint8Array(parts.length * 32);
    parts.forEach((part, i) => all.set(new Uint8Array(part), i * 32));
    return hex(await crypto.subtle.digest('SHA-256', all));
  }
}

let transferCount = 0;

/** One remote peer: its RTCPeerConnection, "perfect negotiation" state, and data channels. */
class PeerLink {
  constructor(chat, peerId, { polite, initiator }) {
    this.chat = chat;
    this.id = peerId;
    this.polite = polite; // on an offer collision the polite side yields
    this.makingOffer = false;
    this.ignoreOffer = false;
    this.answerPending = false;
    this.restarted = false;
    this.channel = null;
    this.senders = [];
    this.remoteStream = null;
    this.pc = new RTCPeerConnection(chat.rtcConfig);
    const pc = this.pc;

    // Perfect negotiation (w3c webrtc-pc §10.7): either side may add tracks at any time.
    pc.onnegotiationneeded = async () => {
      try {
        this.makingOffer = true;
        await pc.setLocalDescription();
        this.signal({ description: pc.localDescription });
      } catch (err) {
        console.warn('negotiation failed', err);
      } finally {
        this.makingOffer = false;
      }
    };
    pc.onicecandidate = ({ candidate }) => {
      if (candidate) this.signal({ candidate });
    };
    pc.onconnectionstatechange = () => this.onState(pc.connectionState);
    pc.ondatachannel = ({ channel }) => {
      if (channel.label === 'chat') this.useChannel(channel);
      else if (channel.label === 'file') this.receiveFile(channel);
    };
    pc.ontrack = ({ track, streams }) => this.onTrack(track, streams);

    for (const track of chat.localStream?.getTracks() ?? []) {
      this.senders.push(pc.addTrack(track, chat.localStream));
    }
    // The newcomer opens the chat channel; that makes it the one to send the first offer.
    if (initiator) this.useChannel(pc.createDataChannel('chat'));
  }

  emit(type, detail) {
    this.chat.emit(type, { peerId: this.id, ...detail });
  }

  signal(data) {
    this.chat.send({ type: 'signal', to: this.id, data: JSON.parse(JSON.stringify(data)) });
  }

  async onSignal({ description, candidate }) {
    const pc = this.pc;
    try {
      if (description) {
        const readyForOffer =
          !this.makingOffer && (pc.signalingState === 'stable' || this.answerPending);
        const collision = description.type === 'offer' && !readyForOffer;
        this.ignoreOffer = !this.polite && collision;
        if (this.ignoreOffer) return;
        this.answerPending = description.type === 'answer';
        await pc.setRemoteDescription(description);
        this.answerPending = false;
        if (description.type === 'offer') {
          await pc.setLocalDescription();
          this.signal({ description: pc.localDescription });
        }
      } else if (candidate) {
        try {
          await pc.addIceCandidate(candidate);
        } catch (err) {
          if (!this.ignoreOffer) throw err; // candidates of an offer we ignored may fail
        }
      }
    } catch (err) {
      console.warn('signal from', this.id, 'failed', err);
    }
  }

  onState(state) {
    // On failure, one ICE restart: new candidates (or a network that came back) may find a path.
    const retrying = state === 'failed' && !this.restarted && this.chat.signalingOpen;
    this.emit('peer-state', { state, retrying });
    if (retrying) {
      this.restarted = true;
      this.pc.restartIce();
    } else if (state === 'connected') {
      this.restarted = false; // a later failure deserves its own restart
      this.reportPath();
      // The selected pair can change later (say, from a relay to a direct path).
      const ice = this.pc.sctp?.transport?.iceTransport;
      if (ice && !ice.onselectedcandidatepairchange) {
        ice.onselectedcandidatepairchange = () => this.reportPath();
      }
    }
  }

  /** Direct or relayed, from the selected candidate pair in getStats(). */
  async reportPath(retries = 3) {
    const stats = await this.pc.getStats().catch(() => null);
    if (!stats) return;
    let pair = null;
    stats.forEach((report) => {
      if (report.type === 'transport' && report.selectedCandidatePairId) {
        pair = stats.get(report.selectedCandidatePairId);
      }
    });
    if (!pair) {
      stats.forEach((report) => {
        if (report.type === 'candidate-pair' && report.nominated && report.state === 'succeeded') {
          pair ??= report;
        }
      });
    }
    if (!pair) {
      // Stats can lag the 'connected' event by a moment.
      if (retries > 0) setTimeout(() => this.reportPath(retries - 1), 500);
      return;
    }
    const local = stats.get(pair.localCandidateId) ?? {};
    const remote = stats.get(pair.remoteCandidateId) ?? {};
    this.emit('peer-path', {
      // Our end is a TURN relay (or theirs is): the data goes through a relay server.
      relayed: local.candidateType === 'relay' || remote.candidateType === 'relay',
      local: local.candidateType,
      remote: remote.candidateType,
      // For a relay candidate: how we reach the TURN server (udp, tcp, tls).
      protocol: local.candidateType === 'relay' ? local.relayProtocol : local.protocol,
    });
  }

  useChannel(channel) {
    this.channel = channel;
    channel.onopen = () => this.emit('peer-open', {});
    channel.onclose = () => this.emit('peer-closed', {});
    channel.onmessage = ({ data }) => {
      let message;
      try {
        message = JSON.parse(data);
      } catch {
        return;
      }
      if (message.type === 'text' && typeof message.text === 'string') {
        this.emit('message', { text: message.text });
      }
    };
    if (channel.readyState === 'open') this.emit('peer-open', {});
  }

  get open() {
    return this.channel?.readyState === 'open';
  }

  sendText(text) {
    this.channel.send(JSON.stringify({ type: 'text', text }));
  }

  /** Send one file on its own data channel: header, chunks with backpressure, trailer, ack. */
  async sendFile(file, id) {
    const channel = this.pc.createDataChannel('file');
    channel.binaryType = 'arraybuffer';
    channel.bufferedAmountLowThreshold = LOW_WATER;
    const hasher = canHash() ? new ChunkHasher() : null;
    // Every wait below also ends when the channel closes (peer gone, connection lost).
    const closed = new Promise((_, reject) => {
      channel.onclose = () => reject(new Error('the transfer was interrupted'));
    });
    closed.catch(() => {});
    const until = (promise) => Promise.race([promise, closed]);
    const next = (event) => until(new Promise((resolve) => (channel[`on${event}`] = resolve)));
    this.emit('file-start', { id, direction: 'out', name: file.name, size: file.size });
    try {
      const acked = next('message'); // the receiver's one message: {type: 'ack', verified}
      if (channel.readyState !== 'open') await next('open');
      const chunkSize = Math.min(CHUNK, this.pc.sctp?.maxMessageSize || CHUNK);
      const header = { type: 'file', name: file.name, size: file.size, mime: file.type };
      channel.send(JSON.stringify({ ...header, hash: hasher ? 'sha256-chunks' : null }));
      let sent = 0;
      let lastReport = 0;
      while (sent < file.size) {
        if (channel.bufferedAmount > HIGH_WATER) await next('bufferedamountlow');
        const chunk = await until(file.slice(sent, sent + chunkSize).arrayBuffer());
        hasher?.add(chunk);
        channel.send(chunk);
        sent += chunk.byteLength;
        if (sent - lastReport >= 256 * 1024) {
          lastReport = sent;
          const buffered = channel.bufferedAmount; // bounded by HIGH_WATER + one chunk
          const bytes = Math.max(0, sent - buffered);
          this.emit('file-progress', { id, direction: 'out', bytes, size: file.size, buffered });
        }
      }
      const sha256 = hasher ? await until(hasher.final()) : null;
      channel.send(JSON.stringify({ type: 'end', sha256 }));
      const ack = JSON.parse((await acked).data);
      this.emit('file-progress', { id, direction: 'out', bytes: file.size, size: file.size });
      this.emit('file-sent', { id, verified: ack.verified ?? null });
    } catch (err) {
      this.emit('file-failed', { id, direction: 'out', reason: err.message ?? String(err) });
    } finally {
      channel.onclose = null;
      channel.close();
    }
  }

  receiveFile(channel) {
    channel.binaryType = 'arraybuffer';
    const id = `in-${++transferCount}`;
    let header = null;
    let hasher = null;
    let parts = [];
    let batch = 0;
    let received = 0;
    let lastReport = 0;
    let done = false;
    channel.onmessage = async ({ data }) => {
      if (typeof data === 'string') {
        let message;
        try {
          message = JSON.parse(data);
        } catch {
          return; // not our protocol: ignore
        }
        if (message.type === 'file' && !header) {
          header = message;
          hasher = message.hash === 'sha256-chunks' && canHash() ? new ChunkHasher() : null;
          this.emit('file-start', { id, direction: 'in', name: header.name, size: header.size });
        } else if (message.type === 'end' && header) {
          done = true;
          // verified: true or false when both sides could hash, null when one could not.
          let verified = null;
          if (received !== header.size) verified = false;
          else if (hasher && message.sha256) verified = (await hasher.final()) === message.sha256;
          channel.send(JSON.stringify({ type: 'ack', verified }));
          const blob = new Blob(parts, { type: header.mime || 'application/octet-stream' });
          parts = [];
          this.emit('file-received', {
            id,
            name: header.name,
            size: received,
            mime: header.mime,
            blob,
            verified,
          });
        }
        return;
      }
      if (!header) return;
      hasher?.add(data);
      parts.push(data);
      received += data.byteLength;
      batch += data.byteLength;
      if (batch >= BLOB_BATCH) {
        parts = [new Blob(parts)]; // lets the browser move the bytes out of the JS heap
        batch = 0;
      }
      if (received - lastReport >= 256 * 1024 || received === header.size) {
        lastReport = received;
        this.emit('file-progress', { id, direction: 'in', bytes: received, size: header.size });
      }
    };
    channel.onclose = () => {
      if (header && !done) {
        this.emit('file-failed', { id, direction: 'in', reason: 'transfer interrupted' });
      }
    };
  }

  onTrack(track, streams) {
    const stream = streams[0] ?? (this.remoteStream ??= new MediaStream());
    if (!stream.getTracks().includes(track)) stream.addTrack(track);
    if (this.remoteStream !== stream) {
      this.remoteStream = stream;
      // When the other side hangs up, renegotiation removes its tracks from the stream.
      stream.onremovetrack = () => {
        if (stream.getTracks().length === 0) this.emit('remote-stream-ended', {});
      };
    }
    this.emit('remote-stream', { stream });
  }

  addStream(stream) {
    for (const track of stream.getTracks()) this.senders.push(this.pc.addTrack(track, stream));
  }

  removeStream() {
    for (const sender of this.senders) {
      if (this.pc.signalingState !== 'closed') this.pc.removeTrack(sender);
    }
    this.senders = [];
  }

  close() {
    this.pc.close();
  }
}

export class P2PChat extends EventTarget {
  /**
   * @param {object} options
   * @param {string} [options.server] base URL of p2pserver (default: this page's origin)
   * @param {boolean} [options.relayOnly] iceTransportPolicy "relay": never show our IP to peers
   * @param {'udp'|'tcp'|null} [options.turnTransport] keep only the TURN URLs of this transport
   */
  constructor({ server = location.origin, relayOnly = false, turnTransport = null } = {}) {
    super();
    this.server = server;
    this.relayOnly = relayOnly;
    this.turnTransport = turnTransport;
    this.peerId = null;
    this.links = new Map(); // peerId -> PeerLink
    this.localStream = null;
    this.ws = null;
    this.rtcConfig = null;
    this.leaving = false;
    this.lastError = null;
  }

  /** Create a room; maxPeers (2 to the server's --max-room-peers) defaults to the server's. */
  static async createRoom({ server = location.origin, withPin = false, maxPeers } = {}) {
    const { status, body } = await api(server, '/create-chat', {
      method: 'POST',
      headers: { 'Content-Type': 'application/json' },
      body: JSON.stringify({ withPin, maxPeers }), // undefined is left out
    });
    if (status !== 200) throw new JoinError(body.error ?? 'error', body.message ?? `HTTP ${status}`);
    return { roomId: body.roomId, pin: body.pin };
  }

  /** {exists, pin}: whether the room is there and asks for a PIN. */
  static async checkRoom({ server = location.origin, roomId }) {
    const { status, body } = await api(server, `/check-chat/${encodeURIComponent(roomId)}`);
    if (status === 404) return { exists: false, pin: false };
    if (status !== 200) throw new JoinError(body.error ?? 'error', body.message ?? `HTTP ${status}`);
    return { exists: true, pin: Boolean(body.pin) };
  }

  emit(type, detail = {}) {
    this.dispatchEvent(new CustomEvent(type, { detail }));
  }

  get signalingOpen() {
    return this.ws?.readyState === WebSocket.OPEN;
  }

  send(message) {
    if (this.signalingOpen) this.ws.send(JSON.stringify(message));
  }

  /** Open the signaling socket and join; resolves with the welcome, rejects with a JoinError. */
  join(roomId, pin = null) {
    const url = new URL(`/ws/${encodeURIComponent(roomId)}`, this.server);
    url.protocol = url.protocol === 'https:' ? 'wss:' : 'ws:';
    const ws = new WebSocket(url);
    this.ws = ws;
    return new Promise((resolve, reject) => {
      let joined = false;
      ws.onopen = () => ws.send(JSON.stringify(pin ? { type: 'join', pin } : { type: 'join' }));
      ws.onmessage = ({ data }) => {
        const message = JSON.parse(data);
        if (message.type === 'welcome') {
          joined = true;
          this.onWelcome(message);
          resolve(message);
        } else if (message.type === 'error' && !joined) {
          this.lastError = message;
        } else {
          this.onMessage(message);
        }
      };
      ws.onclose = (event) => {
        if (!joined) {
          const error = this.lastError;
          this.lastError = null;
          reject(
            error
              ? new JoinError(error.code, error.message)
              : new JoinError('unreachable', 'could not reach the server'),
          );
          return;
        }
        if (this.leaving) return;
        this.emit('disconnected', { code: event.code, reason: event.reason, error: this.lastError });
      };
    });
  }

  onWelcome({ peerId, peers, iceServers }) {
    this.peerId = peerId;
    this.rtcConfig = {
      iceServers: filterIceServers(iceServers, this.turnTransport),
      iceTransportPolicy: this.relayOnly ? 'relay' : 'all',
    };
    this.emit('joined', { peerId, peers });
    // The newcomer calls everyone already there; they wait for its offers.
    for (const other of peers) this.link(other, { polite: false, initiator: true });
  }

  link(peerId, roles) {
    let link = this.links.get(peerId);
    if (!link) {
      link = new PeerLink(this, peerId, roles);
      this.links.set(peerId, link);
    }
    return link;
  }

  onMessage(message) {
    switch (message.type) {
      case 'peer-joined':
        this.link(message.peerId, { polite: true, initiator: false });
        this.emit('peer-joined', { peerId: message.peerId });
        break;
      case 'peer-left': {
        const link = this.links.get(message.peerId);
        link?.close();
        this.links.delete(message.peerId);
        this.emit('peer-left', { peerId: message.peerId });
        break;
      }
      case 'signal':
        this.link(message.from, { polite: true, initiator: false }).onSignal(message.data ?? {});
        break;
      case 'error':
        this.lastError = message; // a fatal one is followed by the close
        this.emit('warning', { code: message.code, message: message.message });
        break;
      default:
        break;
    }
  }

  get connectedPeers() {
    return [...this.links.values()].filter((link) => link.open).map((link) => link.id);
  }

  /** Send a text message to every connected peer; returns how many it went to. */
  sendText(text) {
    const open = [...this.links.values()].filter((link) => link.open);
    for (const link of open) link.sendText(text);
    return open.length;
  }

  /** Send a File (or Blob with a name) to every connected peer; returns the transfer id. */
  sendFile(file) {
    const id = `out-${++transferCount}`;
    for (const link of this.links.values()) if (link.open) link.sendFile(file, id);
    return id;
  }

  /** Share camera and microphone with everyone in the room (and whoever joins later). */
  async startCall(constraints = { audio: true, video: true }) {
    if (!this.localStream) {
      this.localStream = await navigator.mediaDevices.getUserMedia(constraints);
      for (const link of this.links.values()) link.addStream(this.localStream);
    }
    return this.localStream;
  }

  stopCall() {
    for (const link of this.links.values()) link.removeStream();
    for (const track of this.localStream?.getTracks() ?? []) track.stop();
    this.localStream = null;
  }

  leave() {
    this.leaving = true;
    this.stopCall();
    for (const link of this.links.values()) link.close();
    this.links.clear();
    this.ws?.close(1000);
  }
}
