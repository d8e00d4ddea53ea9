// p2pchat.js: rooms, signaling and WebRTC for p2pserver, in one module with no DOM access and no
// dependencies. Copy it into any frontend; no build step. Protocol: docs/api.md; guide: docs/web.md.
//
//   const chat = new P2PChat();
//   chat.on('message', ({ peerId, text }) => console.log(peerId, text));
//   await chat.join(roomId, pin);            // rejects with a JoinError (wrong-pin, room-full, ...)
//   chat.sendText('hello');
//   const transfer = chat.sendFile(file);    // a promise, with .id and .cancel()
//   await chat.startCall();                  // invites the others; they accept or decline
//   chat.leave();                            // the instance can join again afterwards
//
// Every event is a CustomEvent with its data in `detail`; P2PChatEvents below lists them all.

const CHUNK = 64 * 1024; // data channel message size every current browser accepts
const HIGH_WATER = 2 * 1024 * 1024; // stop reading the file while this much is queued...
const LOW_WATER = 512 * 1024; // ...and go on when the queue drains below this
const BLOB_BATCH = 16 * 1024 * 1024; // fold received chunks into a Blob this often (less memory)

/**
 * @typedef {object} PeerPath
 * @property {string} peerId
 * @property {boolean} relayed  our end or theirs is a TURN relay
 * @property {string} [local]   our candidate type: host, srflx, prflx, relay
 * @property {string} [remote]  their candidate type
 * @property {string} [protocol] for a relay candidate: how we reach TURN (udp, tcp, tls)
 */

/**
 * @typedef {object} FileResult  one peer's outcome of sendFile
 * @property {string} peerId
 * @property {boolean} ok          the receiver took the file
 * @property {boolean|null} verified  SHA-256 checked (null: a side had no crypto.subtle)
 * @property {string} [code]       why not: cancelled, interrupted, too-large, hash-mismatch, ...
 */

/**
 * A sendFile() result: a promise of one FileResult per peer (rejected with an AbortError when
 * cancelled), with the transfer's id and a cancel() that stops it for everyone.
 * @typedef {Promise<FileResult[]> & {id: string, cancel: () => void}} FileTransfer
 */

/**
 * Events, by name: what `detail` holds. Every peer event also carries `peerId`.
 * @typedef {{
 *   'joined': {peerId: string, peers: string[], private: boolean, iceTransportPolicy: RTCIceTransportPolicy},
 *   'peer-joined': {peerId: string},
 *   'peer-left': {peerId: string},
 *   'peer-state': {peerId: string, state: RTCPeerConnectionState, retrying: boolean},
 *   'peer-open': {peerId: string},
 *   'peer-closed': {peerId: string},
 *   'peer-path': PeerPath,
 *   'message': {peerId: string, text: string},
 *   'file-start': {peerId: string, id: string, direction: 'in'|'out', name: string, size: number},
 *   'file-progress': {peerId: string, id: string, direction: 'in'|'out', bytes: number, size: number, buffered?: number},
 *   'file-received': {peerId: string, id: string, name: string, size: number, mime: string, blob: Blob, verified: boolean|null},
 *   'file-sent': {peerId: string, id: string, verified: boolean|null},
 *   'file-failed': {peerId: string, id: string, direction: 'in'|'out', code: string, reason: string},
 *   'call-incoming': {peerId: string, video: boolean},
 *   'call-accepted': {peerId: string},
 *   'call-declined': {peerId: string},
 *   'call-ended': {peerId: string},
 *   'call-idle': {},
 *   'remote-stream': {peerId: string, stream: MediaStream},
 *   'remote-stream-ended': {peerId: string},
 *   'disconnected': {code: number, reason: string, error: object|null},
 *   'reconnecting': {attempt: number},
 *   'resumed': {peerId: string},
 *   'warning': {code: string, message: string},
 *   'error': {code: string, peerId: string|null, message: string, error?: unknown},
 * }} P2PChatEvents
 *
 * peer-state: retrying means an ICE restart follows a failure. peer-open: the chat channel is
 * open, text and files can go; peer-closed: it closed. peer-path: from getStats' selected
 * candidate pair. file-failed codes: cancelled, interrupted, too-large, size-mismatch,
 * hash-mismatch, bad-header. call-incoming: answer with acceptCall() or declineCall();
 * call-accepted: our media goes to them now; call-ended: they hung up; call-idle: no call any
 * more, our camera and microphone were released. disconnected: the signaling WebSocket closed
 * (server gone, or a lost connection that could not be resumed), never after leave().
 * reconnecting: the signaling connection dropped without a close (a network change, say): the
 * peer connections carry on, and the client reconnects with backoff and resumes its place
 * (docs/api.md, resume) within RESUME_WINDOW_MS; resumed: it did, with the same peerId.
 * warning: a non-fatal signaling error.
 * error codes: negotiation-failed, signal-failed, send-failed, bad-frame, call-failed.
 */

// The server keeps a dropped peer's place this long by default (--resume-window).
const RESUME_WINDOW_MS = 30_000;
const RECONNECT_FIRST_MS = 250;
const RECONNECT_MAX_MS = 5_000;
const CLOSE_LOST = 1006; // RFC 6455 §7.1.5: no close frame, the connection was lost

export class JoinError extends Error {
  /** @param {string} code room-not-found, pin-required, wrong-pin, room-full, left, ... */
  constructor(code, message) {
    super(message);
    this.name = 'JoinError';
    this.code = code;
  }
}

/** True where crypto.subtle exists: secure contexts only (HTTPS, or plain HTTP to localhost). */
export const canHash = () => Boolean(globalThis.crypto?.subtle);

async function api(server, path, init) {
  const response = await fetch(new URL(path, server), init);
  const body = await response.json().catch(() => ({}));
  return { status: response.status, body };
}

function parseJSON(text) {
  try {
    return JSON.parse(text);
  } catch {
    return undefined;
  }
}

const isObject = (value) => typeof value === 'object' && value !== null && !Array.isArray(value);

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

/** A transfer that ended early: `code` says why (sent to the other side in an abort). */
class TransferError extends Error {
  constructor(code, message) {
    super(message);
    this.code = code;
  }
}

const FILE_FAILURES = {
  cancelled: 'cancelled',
  interrupted: 'the transfer was interrupted',
  'too-large': 'the file is larger than announced',
  'size-mismatch': 'the file is smaller than announced',
  'hash-mismatch': 'damaged in transit (SHA-256 mismatch)',
  'bad-header': 'not a valid file offer',
};

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
    this.closed = false;
    this.channel = null;
    this.senders = [];
    this.remoteStream = null;
    this.call = null; // null, 'inviting' (we asked), 'invited' (they asked), 'in-call'
    this.transfers = new Map(); // transfer id -> cancel(code)
    this.pc = new RTCPeerConnection(chat.rtcConfig);
    const pc = this.pc;

    // Perfect negotiation (w3c webrtc-pc §10.7): either side may add tracks at any time.
    pc.onnegotiationneeded = async () => {
      try {
        this.makingOffer = true;
        await pc.setLocalDescription();
        this.signal({ description: pc.localDescription });
      } catch (err) {
        this.fail('negotiation-failed', err);
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

    // The newcomer opens the chat channel; that makes it the one to send the first offer.
    if (initiator) this.useChannel(pc.createDataChannel('chat'));
  }

  emit(type, detail) {
    if (!this.closed) this.chat.emit(type, { peerId: this.id, ...detail });
  }

  /** Report a failure as an `error` event: code, this peer, and the cause. */
  fail(code, err) {
    if (this.closed) return;
    this.chat.emit('error', { code, peerId: this.id, message: err?.message ?? String(err), error: err });
  }

  signal(data) {
    this.chat.send({ type: 'signal', to: this.id, data: JSON.parse(JSON.stringify(data)) });
  }

  async onSignal(data) {
    if (!isObject(data)) return;
    const { description, candidate } = data;
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
      this.fail('signal-failed', err);
    }
  }

  onState(state) {
    if (this.closed) return;
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
    if (!stats || this.closed) return;
    /** @type {any} */
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
    channel.onclose = () => {
      if (this.call === 'in-call' || this.call === 'invited') this.endCall(false);
      this.emit('peer-closed', {});
    };
    channel.onmessage = ({ data }) => {
      const message = typeof data === 'string' ? parseJSON(data) : undefined;
      if (!isObject(message)) return; // not our protocol: ignore
      if (message.type === 'text' && typeof message.text === 'string') {
        this.emit('message', { text: message.text });
      } else if (message.type === 'call') {
        this.onCallMessage(message);
      }
    };
    if (channel.readyState === 'open') this.emit('peer-open', {});
  }

  get open() {
    return this.channel?.readyState === 'open';
  }

  /** Send on the chat channel; false (and an `error` event) if it closed meanwhile. */
  sendControl(message) {
    try {
      if (!this.open) throw new Error('the chat channel is not open');
      this.channel.send(JSON.stringify(message));
      return true;
    } catch (err) {
      this.fail('send-failed', err);
      return false;
    }
  }

  sendText(text) {
    return this.sendControl({ type: 'text', text });
  }

  // -- files ---------------------------------------------------------------------------------

  /** Send one file on its own data channel: header, chunks with backpressure, trailer, ack. */
  async sendFile(file, id) {
    const channel = this.pc.createDataChannel('file');
    channel.binaryType = 'arraybuffer';
    channel.bufferedAmountLowThreshold = LOW_WATER;
    const hasher = canHash() ? new ChunkHasher() : null;
    // Every wait below also ends when the transfer fails: channel closed, the receiver's abort,
    // or cancel().
    let stop;
    const failed = new Promise((_, reject) => (stop = reject));
    failed.catch(() => {});
    const cancel = (code = 'cancelled') => stop(new TransferError(code, FILE_FAILURES[code]));
    this.transfers.set(id, cancel);
    channel.onclose = () => cancel('interrupted');
    let acked;
    const ack = new Promise((resolve) => (acked = resolve));
    channel.onmessage = ({ data }) => {
      const message = parseJSON(data);
      if (message?.type === 'ack') acked(message);
      else if (message?.type === 'abort') {
        cancel(message.code in FILE_FAILURES ? message.code : 'interrupted');
      }
    };
    const until = (promise) => Promise.race([promise, failed]);
    const next = (event) => until(new Promise((resolve) => (channel[`on${event}`] = resolve)));
    this.emit('file-start', { id, direction: 'out', name: file.name, size: file.size });
    try {
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
      const { verified = null } = await until(ack);
      this.emit('file-progress', { id, direction: 'out', bytes: file.size, size: file.size });
      this.emit('file-sent', { id, verified });
      return { peerId: this.id, ok: true, verified };
    } catch (err) {
      const code = err instanceof TransferError ? err.code : 'interrupted';
      if (code === 'cancelled' && channel.readyState === 'open') {
        channel.send(JSON.stringify({ type: 'abort', code }));
      }
      this.emit('file-failed', { id, direction: 'out', code, reason: err.message ?? String(err) });
      return { peerId: this.id, ok: false, verified: null, code };
    } finally {
      this.transfers.delete(id);
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
    const abort = (code) => {
      if (done) return;
      done = true;
      parts = [];
      this.transfers.delete(id);
      if (channel.readyState === 'open') channel.send(JSON.stringify({ type: 'abort', code }));
      channel.close();
      if (header) this.emit('file-failed', { id, direction: 'in', code, reason: FILE_FAILURES[code] });
    };
    this.transfers.set(id, () => abort('cancelled'));
    channel.onmessage = async ({ data }) => {
      if (done) return;
      if (typeof data === 'string') {
        const message = parseJSON(data);
        if (!isObject(message)) return; // not our protocol: ignore
        if (message.type === 'file' && !header) {
          const { name, size, mime } = message;
          if (typeof name !== 'string' || !Number.isSafeInteger(size) || size < 0) {
            return abort('bad-header');
          }
          header = { name, size, mime: typeof mime === 'string' ? mime : '' };
          hasher = message.hash === 'sha256-chunks' && canHash() ? new ChunkHasher() : null;
          this.emit('file-start', { id, direction: 'in', name, size });
        } else if (message.type === 'abort' && header) {
          abort(message.code === 'cancelled' ? 'cancelled' : 'interrupted');
        } else if (message.type === 'end' && header) {
          if (received !== header.size) return abort('size-mismatch');
          // verified: true when both sides could hash, null when one could not.
          let verified = null;
          if (hasher && typeof message.sha256 === 'string') {
            verified = (await hasher.final()) === message.sha256;
            if (!verified) return abort('hash-mismatch');
          }
          done = true;
          this.transfers.delete(id);
          channel.send(JSON.stringify({ type: 'ack', verified }));
          const blob = new Blob(parts, { type: header.mime || 'application/octet-stream' });
          parts = [];
          this.emit('file-received', { id, ...header, size: received, blob, verified });
        }
        return;
      }
      if (!header) return abort('bad-header');
      received += data.byteLength;
      // Refuse the excess at once: a sender that lies about the size cannot fill our memory.
      if (received > header.size) return abort('too-large');
      hasher?.add(data);
      parts.push(data);
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
      if (header && !done) abort('interrupted');
      this.transfers.delete(id);
    };
  }

  // -- calls ---------------------------------------------------------------------------------

  onCallMessage({ action, video }) {
    const chat = this.chat;
    if (action === 'invite') {
      if (this.call === 'inviting' && chat.localStream) {
        // Both pressed "Start call": each takes the other's invite as an answer.
        this.sendControl({ type: 'call', action: 'accept' });
        this.joinCall();
      } else if (this.call === null) {
        this.call = 'invited';
        this.emit('call-incoming', { video: video !== false });
      }
    } else if (action === 'accept' && this.call === 'inviting' && chat.localStream) {
      this.joinCall();
      this.emit('call-accepted', {});
    } else if (action === 'decline' && this.call === 'inviting') {
      this.call = null;
      this.emit('call-declined', {});
      chat.releaseMedia();
    } else if (action === 'hangup' && this.call !== null) {
      this.endCall(false);
      this.emit('call-ended', {});
      chat.releaseMedia();
    }
  }

  joinCall() {
    this.call = 'in-call';
    const stream = this.chat.localStream;
    if (this.senders.length || !stream) return;
    for (const track of stream.getTracks()) this.senders.push(this.pc.addTrack(track, stream));
  }

  /** Stop sending our media to this peer (and tell them, unless they told us). */
  endCall(tell) {
    if (tell && this.call !== null) {
      this.sendControl({ type: 'call', action: this.call === 'invited' ? 'decline' : 'hangup' });
    }
    this.call = null;
    for (const sender of this.senders) {
      if (this.pc.signalingState !== 'closed') this.pc.removeTrack(sender);
    }
    this.senders = [];
  }

  onTrack(track, streams) {
    const stream = streams[0] ?? (this.remoteStream ??= new MediaStream());
    if (!stream.getTracks().includes(track)) stream.addTrack(track);
    if (this.remoteStream !== stream) {
      this.remoteStream = stream;
      // When the other side hangs up, renegotiation removes its tracks from the stream.
      stream.onremovetrack = () => {
        if (stream.getTracks().length === 0) {
          this.remoteStream = null;
          this.emit('remote-stream-ended', {});
        }
      };
    }
    this.emit('remote-stream', { stream });
  }

  close() {
    for (const cancel of this.transfers.values()) cancel('interrupted');
    this.closed = true;
    this.pc.close();
  }
}

export class P2PChat extends EventTarget {
  /**
   * @param {object} [options]
   * @param {string} [options.server] base URL of p2pserver (default: this page's origin)
   * @param {boolean} [options.relayOnly] iceTransportPolicy "relay" even in a room that is not
   *   private: this browser's addresses go to nobody but the TURN server
   * @param {'udp'|'tcp'|null} [options.turnTransport] keep only the TURN URLs of this transport
   */
  constructor({ server = location.origin, relayOnly = false, turnTransport = null } = {}) {
    super();
    this.server = server;
    this.relayOnly = relayOnly;
    this.turnTransport = turnTransport;
    /** @type {string|null} our id in the room, from welcome */
    this.peerId = null;
    /** @type {boolean} the room is private: the server asked for relay-only */
    this.privateRoom = false;
    /** @type {Map<string, PeerLink>} */
    this.links = new Map();
    /** @type {MediaStream|null} our camera and microphone while a call is on */
    this.localStream = null;
    this.ws = null;
    this.rtcConfig = null;
    this.lastError = null;
    /** @type {string|null} the room we are in, and the token that resumes our place in it */
    this.roomId = null;
    this.resumeToken = null;
  }

  /**
   * Create a room. maxPeers (2 to the server's --max-room-peers) defaults to the server's;
   * private: everyone in it gathers relay candidates only, so nobody learns another's address.
   * @param {{server?: string, withPin?: boolean, maxPeers?: number, private?: boolean}} [options]
   * @returns {Promise<{roomId: string, pin: string|null}>}
   */
  static async createRoom({ server = location.origin, withPin = false, maxPeers, private: priv } = {}) {
    const { status, body } = await api(server, '/create-chat', {
      method: 'POST',
      headers: { 'Content-Type': 'application/json' },
      body: JSON.stringify({ withPin, maxPeers, private: priv }), // undefined is left out
    });
    if (status !== 200) throw new JoinError(body.error ?? 'error', body.message ?? `HTTP ${status}`);
    return { roomId: body.roomId, pin: body.pin };
  }

  /**
   * Whether the room is there, asks for a PIN, and is private.
   * @param {{server?: string, roomId: string}} options
   * @returns {Promise<{exists: boolean, pin: boolean, private: boolean}>}
   */
  static async checkRoom({ server = location.origin, roomId }) {
    const { status, body } = await api(server, `/check-chat/${encodeURIComponent(roomId)}`);
    if (status === 404) return { exists: false, pin: false, private: false };
    if (status !== 200) throw new JoinError(body.error ?? 'error', body.message ?? `HTTP ${status}`);
    return { exists: true, pin: Boolean(body.pin), private: body.private === true };
  }

  /**
   * Listen to one event, with its `detail` as the argument; returns a function that stops it.
   * @template {keyof P2PChatEvents} K
   * @param {K} type
   * @param {(detail: P2PChatEvents[K]) => void} handler
   * @param {AddEventListenerOptions} [options]
   * @returns {() => void}
   */
  on(type, handler, options) {
    const listener = (event) => handler(event.detail);
    this.addEventListener(type, listener, options);
    return () => this.removeEventListener(type, listener);
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

  /**
   * Open the signaling socket and join; resolves with the welcome, rejects with a JoinError.
   * Joining again (the same room or another) first leaves the current one.
   * @param {string} roomId
   * @param {string|null} [pin]
   */
  socket(roomId) {
    const url = new URL(`/ws/${encodeURIComponent(roomId)}`, this.server);
    url.protocol = url.protocol === 'https:' ? 'wss:' : 'ws:';
    return new WebSocket(url);
  }

  join(roomId, pin = null) {
    this.reset();
    this.roomId = roomId;
    const ws = this.socket(roomId);
    this.ws = ws;
    return new Promise((resolve, reject) => {
      let joined = false;
      let lastError = null;
      ws.onopen = () => ws.send(JSON.stringify(pin ? { type: 'join', pin } : { type: 'join' }));
      ws.onmessage = ({ data }) => {
        if (ws !== this.ws) return; // left, or joined again: this socket is on its way out
        const message = parseJSON(data);
        if (!isObject(message) || typeof message.type !== 'string') {
          this.emit('error', { code: 'bad-frame', peerId: null, message: 'not a JSON object' });
        } else if (message.type === 'welcome' && !joined) {
          joined = true;
          this.onWelcome(message);
          resolve(message);
        } else if (message.type === 'error' && !joined) {
          lastError = message;
        } else if (joined) {
          this.onMessage(message);
        }
      };
      ws.onclose = (event) => {
        const superseded = ws !== this.ws;
        if (!joined) {
          if (!superseded) this.ws = null;
          reject(
            superseded && !lastError
              ? new JoinError('left', 'left before the join completed')
              : lastError
                ? new JoinError(lastError.code, lastError.message)
                : new JoinError('unreachable', 'could not reach the server'),
          );
          return;
        }
        if (superseded) return; // closed by leave() or a new join(): nobody needs telling
        this.ws = null;
        this.onSocketClosed(event);
      };
    });
  }

  /** The joined socket closed: a lost connection is resumed, anything else is the end. */
  onSocketClosed(event) {
    if (event.code === CLOSE_LOST && this.resumeToken && this.roomId) {
      this.reconnect(this.roomId, Date.now());
      return;
    }
    this.emit('disconnected', { code: event.code, reason: event.reason, error: this.lastError });
  }

  /**
   * Open the signaling socket again and resume our place (same peerId, messages kept for us
   * delivered), retrying with backoff until the server's resume window has passed. The peer
   * connections do not need the socket meanwhile and carry on.
   */
  reconnect(roomId, since, delay = RECONNECT_FIRST_MS, attempt = 1) {
    this.emit('reconnecting', { attempt });
    setTimeout(() => {
      if (this.roomId !== roomId || this.ws || !this.resumeToken) return; // left meanwhile
      const ws = this.socket(roomId);
      this.ws = ws;
      let welcomed = false;
      let refused = null;
      ws.onopen = () => ws.send(JSON.stringify({ type: 'join', resume: this.resumeToken }));
      ws.onmessage = ({ data }) => {
        if (ws !== this.ws) return;
        const message = parseJSON(data);
        if (!isObject(message) || typeof message.type !== 'string') return;
        if (message.type === 'welcome' && !welcomed) {
          welcomed = true;
          this.onResumed(message);
        } else if (message.type === 'error' && !welcomed) {
          refused = message;
        } else if (welcomed) {
          this.onMessage(message);
        }
      };
      ws.onclose = (event) => {
        if (ws !== this.ws) return;
        this.ws = null;
        if (welcomed) return this.onSocketClosed(event);
        const next = Math.min(delay * 2, RECONNECT_MAX_MS);
        if (refused || Date.now() + next - since > RESUME_WINDOW_MS) {
          this.resumeToken = null; // refused or too late: our place is gone
          this.emit('disconnected', {
            code: event.code,
            reason: event.reason,
            error: refused ?? this.lastError,
          });
          return;
        }
        this.reconnect(roomId, since, next, attempt + 1);
      };
    }, delay * (0.8 + Math.random() * 0.4));
  }

  onResumed({ peerId, iceServers, resume }) {
    this.resumeToken = typeof resume === 'string' ? resume : null;
    if (this.rtcConfig && Array.isArray(iceServers)) {
      // Fresh TURN credentials, for the peer connections made from now on.
      this.rtcConfig = { ...this.rtcConfig, iceServers: filterIceServers(iceServers, this.turnTransport) };
    }
    this.emit('resumed', { peerId });
  }

  onWelcome({ peerId, peers, iceServers, iceTransportPolicy, resume }) {
    this.peerId = peerId;
    this.resumeToken = typeof resume === 'string' ? resume : null;
    // A private room asks every peer for relay-only; relayOnly asks it of this one anyway.
    this.privateRoom = iceTransportPolicy === 'relay';
    const policy = this.privateRoom || this.relayOnly ? 'relay' : 'all';
    this.rtcConfig = {
      iceServers: filterIceServers(Array.isArray(iceServers) ? iceServers : [], this.turnTransport),
      iceTransportPolicy: policy,
    };
    const others = Array.isArray(peers) ? peers.filter((id) => typeof id === 'string') : [];
    this.emit('joined', { peerId, peers: others, private: this.privateRoom, iceTransportPolicy: policy });
    // The newcomer calls everyone already there; they wait for its offers.
    for (const other of others) this.link(other, { polite: false, initiator: true });
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
        if (typeof message.peerId !== 'string') break;
        this.link(message.peerId, { polite: true, initiator: false });
        this.emit('peer-joined', { peerId: message.peerId });
        break;
      case 'peer-left': {
        const link = this.links.get(message.peerId);
        if (!link) break;
        link.close();
        this.links.delete(message.peerId);
        this.emit('peer-left', { peerId: message.peerId });
        if (![...this.links.values()].some((other) => other.call !== null)) this.releaseMedia();
        break;
      }
      case 'signal':
        if (typeof message.from !== 'string') break;
        this.link(message.from, { polite: true, initiator: false }).onSignal(message.data);
        break;
      case 'error':
        this.lastError = message; // a fatal one is followed by the close
        this.emit('warning', { code: message.code, message: message.message });
        break;
      default:
        break;
    }
  }

  /** Ids of the peers whose chat channel is open. */
  get connectedPeers() {
    return [...this.links.values()].filter((link) => link.open).map((link) => link.id);
  }

  /**
   * Send a text message to every connected peer; returns how many it went to. Never throws: a
   * channel that closes meanwhile is skipped and reported as an `error` (send-failed).
   * @param {string} text
   */
  sendText(text) {
    let sent = 0;
    for (const link of this.links.values()) if (link.open && link.sendText(text)) sent += 1;
    return sent;
  }

  /**
   * Send a File (or a Blob with a name) to every connected peer.
   * @param {File|Blob & {name: string}} file
   * @param {{signal?: AbortSignal}} [options] aborting it cancels the transfer
   * @returns {FileTransfer}
   */
  sendFile(file, { signal } = {}) {
    const id = `out-${++transferCount}`;
    const links = [...this.links.values()].filter((link) => link.open);
    let cancelled = false;
    const cancel = () => {
      cancelled = true;
      for (const link of links) link.transfers.get(id)?.('cancelled');
    };
    signal?.addEventListener('abort', cancel, { once: true });
    const all = Promise.all(links.map((link) => link.sendFile(file, id)));
    const transfer = all.then((results) => {
      signal?.removeEventListener('abort', cancel);
      if (cancelled) throw new DOMException('the transfer was cancelled', 'AbortError');
      return results;
    });
    if (signal?.aborted) cancel();
    return Object.assign(transfer, { id, cancel });
  }

  /** Cancel a transfer, sending or receiving, by the id of its file-start event. */
  cancelFile(id) {
    for (const link of this.links.values()) link.transfers.get(id)?.('cancelled');
  }

  // -- calls -----------------------------------------------------------------------------------

  /**
   * Start a call: get camera and microphone, and invite every connected peer. Our media goes to
   * a peer only once it accepts (call-accepted); call-declined says it did not.
   * @param {MediaStreamConstraints} [constraints]
   * @returns {Promise<MediaStream>}
   */
  async startCall(constraints = { audio: true, video: true }) {
    const stream = await this.getMedia(constraints);
    for (const link of this.links.values()) {
      if (link.call === 'invited') {
        link.sendControl({ type: 'call', action: 'accept' });
        link.joinCall();
      } else if (link.call === null && link.open) {
        link.call = 'inviting';
        link.sendControl({ type: 'call', action: 'invite', video: stream.getVideoTracks().length > 0 });
      }
    }
    return stream;
  }

  /**
   * Accept an incoming call (call-incoming) from one peer, or from all who are calling.
   * @param {string|null} [peerId]
   * @param {MediaStreamConstraints} [constraints] e.g. {audio: true, video: false}: audio only
   * @returns {Promise<MediaStream>}
   */
  async acceptCall(peerId = null, constraints = { audio: true, video: true }) {
    const stream = await this.getMedia(constraints);
    for (const link of this.links.values()) {
      if (link.call !== 'invited' || (peerId && link.id !== peerId)) continue;
      link.sendControl({ type: 'call', action: 'accept' });
      link.joinCall();
    }
    return stream;
  }

  /** Decline an incoming call, from one peer or from all who are calling. */
  declineCall(peerId = null) {
    for (const link of this.links.values()) {
      if (link.call === 'invited' && (!peerId || link.id === peerId)) link.endCall(true);
    }
  }

  /** Leave the call: everyone in it (or invited) is told, and the camera and microphone stop. */
  hangUp() {
    for (const link of this.links.values()) if (link.call !== 'invited') link.endCall(true);
    this.releaseMedia(true);
  }

  /** @deprecated the name before calls had invitations: hangUp() */
  stopCall() {
    this.hangUp();
  }

  /** Mute or unmute our microphone for everyone (the track stays, sending silence). */
  setMuted(muted) {
    for (const track of this.localStream?.getAudioTracks() ?? []) track.enabled = !muted;
  }

  /** Turn our camera off or on for everyone (black frames while off). */
  setCameraOff(off) {
    for (const track of this.localStream?.getVideoTracks() ?? []) track.enabled = !off;
  }

  /** Whether a call is on, ringing or being offered with any peer. */
  get inCall() {
    return [...this.links.values()].some((link) => link.call === 'in-call');
  }

  async getMedia(constraints) {
    if (!this.localStream) {
      try {
        this.localStream = await navigator.mediaDevices.getUserMedia(constraints);
      } catch (err) {
        this.emit('error', { code: 'call-failed', peerId: null, message: err.message, error: err });
        throw err;
      }
    }
    return this.localStream;
  }

  /** Stop our camera and microphone once no peer is in (or asked into) a call with us. */
  releaseMedia(force = false) {
    const busy = [...this.links.values()].some((link) => link.call === 'in-call' || link.call === 'inviting');
    if (busy && !force) return;
    for (const track of this.localStream?.getTracks() ?? []) track.stop();
    this.localStream = null;
    this.emit('call-idle', {});
  }

  /** Close every peer connection and the signaling socket, and forget the room. */
  reset() {
    if (this.localStream) this.hangUp();
    for (const link of this.links.values()) link.close();
    this.links.clear();
    const ws = this.ws;
    this.ws = null; // first: its close event is then not reported as `disconnected`
    ws?.close(1000);
    this.peerId = null;
    this.privateRoom = false;
    this.rtcConfig = null;
    this.lastError = null;
    this.roomId = null;
    this.resumeToken = null;
  }

  /** Leave the room. The instance can join() again afterwards. */
  leave() {
    this.reset();
  }
}
