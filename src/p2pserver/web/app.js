// The page: create a chat, join by link (#room=ID) and PIN, chat, send files, call.
// All WebRTC and signaling lives in p2pchat.js; this module only drives the DOM.
import { P2PChat, canHash } from './p2pchat.js';

const $ = (id) => document.getElementById(id);

// Options for testing and privacy: ?relay=1 sends everything through TURN (peers never see
// our address); ?turn=udp or ?turn=tcp keeps only the TURN URLs of that transport.
const params = new URLSearchParams(location.search);
const options = {
  relayOnly: params.get('relay') === '1',
  turnTransport: ['udp', 'tcp'].includes(params.get('turn')) ? params.get('turn') : null,
};

const TEXT = {
  'room-not-found': 'This chat does not exist or has expired. Ask for a new link, or start a new chat.',
  'pin-required': 'This chat needs a PIN.',
  'wrong-pin': 'Wrong PIN. Check it and try again.',
  'too-many-attempts': 'Too many wrong PINs were tried for this chat. Wait a few minutes and try again.',
  'room-full': 'This chat is full: the people it was made for are already in it.',
  'too-many-connections': 'Too many chat connections from your network. Close some chat tabs.',
  'join-timeout': 'The server did not hear from this page in time. Reload to try again.',
  unreachable: 'Could not reach the chat server. Check your connection and reload the page.',
  unavailable: 'The chat server is busy recovering. Wait a few seconds and try again.',
};

// The link carries the room id in the fragment: browsers never send it to servers or proxies
// (so it stays out of access logs) nor in Referer headers.
const roomFromHash = () => /^#room=([A-Za-z0-9_-]{1,64})$/.exec(location.hash)?.[1] ?? null;
const shareLink = (roomId) => `${location.origin}${location.pathname}#room=${roomId}`;
// The PIN is kept for this tab only, so a reload does not lock its owner out.
const pinKey = (roomId) => `p2pchat-pin:${roomId}`;

function show(section) {
  for (const id of ['start', 'join', 'room']) $(id).hidden = id !== section;
}

function notice(text, kind = 'error') {
  const box = $('notice');
  box.textContent = text ?? '';
  box.dataset.kind = kind;
  box.hidden = !text;
}

function formatSize(bytes) {
  const units = ['bytes', 'KB', 'MB', 'GB', 'TB'];
  let i = 0;
  while (bytes >= 1000 && i < units.length - 1) {
    bytes /= 1000;
    i += 1;
  }
  return `${i ? bytes.toFixed(1) : bytes} ${units[i]}`;
}

function element(tag, props = {}, ...children) {
  const node = Object.assign(document.createElement(tag), props);
  node.append(...children);
  return node;
}

/** Everything shown inside the room, driven by the events of one P2PChat. */
class RoomView {
  constructor(chat, { creator }) {
    this.chat = chat;
    this.creator = creator;
    this.peers = new Map(); // peerId -> {name, item, state, path, open}
    this.transfers = new Map(); // `${peerId}:${id}` -> {item, progress, status}
    this.guests = 0;
    this.lost = false;
    this.reconnecting = false; // the signaling connection dropped; p2pchat.js resumes it
    this.caller = null; // who is calling us
    // Page listeners go away with this view (a failed join attempt leaves none behind).
    this.abort = new AbortController();
    const on = (type, handler) => chat.addEventListener(type, (e) => handler.call(this, e.detail));
    on('joined', this.onJoined);
    on('peer-joined', ({ peerId }) => this.addPeer(peerId));
    on('peer-state', this.onPeerState);
    on('peer-open', ({ peerId }) => this.update(peerId, { open: true }));
    on('peer-closed', ({ peerId }) => this.update(peerId, { open: false }));
    on('peer-path', this.onPath);
    on('peer-left', this.onPeerLeft);
    on('message', ({ peerId, text }) => this.log(this.name(peerId), text));
    on('file-start', this.onFileStart);
    on('file-progress', this.onFileProgress);
    on('file-received', this.onFileReceived);
    on('file-sent', this.onFileSent);
    on('file-failed', this.onFileFailed);
    on('remote-stream', this.onRemoteStream);
    on('remote-stream-ended', ({ peerId }) => this.removeVideo(peerId));
    on('call-incoming', this.onCallIncoming);
    on('call-accepted', () => this.renderCall());
    on('call-declined', ({ peerId }) => notice(`${this.name(peerId)} declined the call.`, 'info'));
    on('call-ended', ({ peerId }) => this.onCallEnded(peerId));
    on('call-idle', () => this.renderCall());
    on('error', ({ code, peerId, message }) => console.warn('p2pchat:', code, peerId, message));
    on('disconnected', this.onDisconnected);
    on('reconnecting', () => {
      this.reconnecting = true;
      this.render();
    });
    on('resumed', () => {
      this.reconnecting = false;
      this.render();
    });
    on('warning', ({ code, message }) => console.warn('signaling:', code, message));
    this.bindControls();
    $('insecure').hidden = canHash() && Boolean(navigator.mediaDevices);
  }

  // -- peers and status ---------------------------------------------------------------------

  onJoined({ peers, private: isPrivate }) {
    $('room-private').hidden = !isPrivate;
    for (const peerId of peers) this.addPeer(peerId);
    this.render();
  }

  name(peerId) {
    return this.peers.get(peerId)?.name ?? 'Someone';
  }

  addPeer(peerId) {
    if (this.peers.has(peerId)) return;
    this.guests += 1;
    const item = element('li', { className: 'peer' });
    item.dataset.peerId = peerId;
    $('peers').append(item);
    this.peers.set(peerId, { name: `Guest ${this.guests}`, item, state: 'new', path: null });
    this.render();
  }

  update(peerId, changes) {
    const peer = this.peers.get(peerId);
    if (!peer) return;
    Object.assign(peer, changes);
    this.render();
  }

  onPeerState({ peerId, state, retrying }) {
    this.update(peerId, { state: retrying ? 'retrying' : state });
    if (state === 'failed' && !retrying) {
      notice(
        `The connection to ${this.name(peerId)} failed: no direct or relayed path was found ` +
          '(ICE failed). A firewall may block it; try another network, or reload.',
        'ice',
      );
    } else if (state === 'connected' && $('notice').dataset.kind === 'ice') {
      notice(null); // the ICE restart found a path after all
    }
  }

  onPath({ peerId, relayed, local, remote, protocol }) {
    let how = 'direct';
    if (relayed) {
      // In a private room the relay is the point: say so, per peer.
      how = this.chat.privateRoom ? 'private: relayed' : 'relayed through the server';
      if (local === 'relay' && protocol) how += ` (TURN over ${protocol.toUpperCase()})`;
    }
    this.update(peerId, { path: { relayed, how, local, remote } });
  }

  onPeerLeft({ peerId }) {
    const name = this.name(peerId);
    this.peers.get(peerId)?.item.remove();
    this.peers.delete(peerId);
    this.removeVideo(peerId);
    if (peerId === this.caller) $('incoming').hidden = true;
    this.logSystem(`${name} left the chat.`);
    notice(`${name} left the chat.`, 'info');
    this.render();
  }

  onDisconnected({ code, error }) {
    this.lost = true;
    this.reconnecting = false;
    const why = error?.message ?? (code === 1001 ? 'the server is restarting' : `code ${code}`);
    notice(
      `Lost the connection to the chat server (${why}). People already connected can keep ` +
        'chatting, but nobody can join or reconnect. Reload the page to reconnect.',
    );
    this.render();
  }

  render() {
    let open = 0;
    for (const [peerId, peer] of this.peers) {
      if (peer.open) open += 1;
      const state = peer.state === 'new' ? 'connecting' : peer.state;
      let text = `${peer.name}: ${state}`;
      if (peer.state === 'connected' && peer.path) text += `, ${peer.path.how}`;
      if (peer.state === 'disconnected') text += ' (interrupted, trying to recover)';
      if (peer.state === 'retrying') text = `${peer.name}: connection failed, trying again`;
      peer.item.textContent = text;
      Object.assign(peer.item.dataset, { peerId, state: peer.state });
      if (peer.path) {
        peer.item.dataset.path = peer.path.relayed ? 'relayed' : 'direct';
        // The selected candidate pair's types, from getStats(): host, srflx, prflx or relay.
        peer.item.dataset.local = peer.path.local ?? '';
        peer.item.dataset.remote = peer.path.remote ?? '';
      }
    }
    let status;
    if (this.lost) status = 'Disconnected from the server.';
    else if (this.reconnecting) status = 'Reconnecting to the chat server…';
    else if (this.peers.size === 0)
      status = this.creator
        ? 'Waiting for the other person to join. Send them the link above.'
        : 'Nobody else is here right now.';
    else if (open === 0) status = 'Connecting…';
    else status = `Connected to ${open} ${open === 1 ? 'person' : 'people'}.`;
    $('status').textContent = status;
    $('room').dataset.connected = String(open);
    const disabled = open === 0;
    for (const id of ['text', 'send', 'file']) $(id).disabled = disabled;
    $('file-label').setAttribute('aria-disabled', String(disabled));
    $('call').disabled = disabled || Boolean(this.chat.localStream) || !navigator.mediaDevices;
  }

  // -- messages -----------------------------------------------------------------------------

  log(who, text, className = 'message') {
    const item = element('li', { className }, element('span', { className: 'who' }, `${who}: `));
    item.append(text); // text nodes only: nothing a peer sends is parsed as HTML
    $('messages').append(item);
    item.scrollIntoView({ block: 'nearest' });
    return item;
  }

  logSystem(text) {
    const item = element('li', { className: 'system' }, text);
    $('messages').append(item);
  }

  dispose() {
    this.abort.abort();
  }

  bindControls() {
    const { signal } = this.abort;
    $('composer').addEventListener('submit', (event) => {
      event.preventDefault();
      const text = $('text').value.trim();
      if (!text) return;
      if (this.chat.sendText(text) > 0) {
        this.log('You', text, 'message mine');
        $('text').value = '';
      }
    }, { signal });
    $('file').addEventListener('change', () => {
      for (const file of $('file').files) this.chat.sendFile(file);
      $('file').value = ''; // the same file can be chosen again
    }, { signal });
    $('call').addEventListener('click', () => this.startCall(), { signal });
    $('accept-video').addEventListener('click', () => this.accept(true), { signal });
    $('accept-audio').addEventListener('click', () => this.accept(false), { signal });
    $('decline').addEventListener('click', () => this.decline(), { signal });
    $('hang-up').addEventListener('click', () => this.chat.hangUp(), { signal });
    $('mute').addEventListener('click', () => this.toggle('mute'), { signal });
    $('camera').addEventListener('click', () => this.toggle('camera'), { signal });
  }

  // -- files --------------------------------------------------------------------------------

  onFileStart({ peerId, id, direction, name, size }) {
    const who = direction === 'out' ? `You → ${this.name(peerId)}` : this.name(peerId);
    const label = `${name} (${formatSize(size)})`;
    const item = this.log(who, label, `message file ${direction}`);
    const progress = element('progress', { max: size || 1, value: 0 });
    progress.setAttribute('aria-label', `${direction === 'out' ? 'Sending' : 'Receiving'} ${name}`);
    const status = element('span', { className: 'file-status' }, '0%');
    item.append(' ', progress, ' ', status);
    Object.assign(item.dataset, { fileId: id, peerId, direction, state: 'sending' });
    this.transfers.set(`${peerId}:${id}`, { item, progress, status });
  }

  onFileProgress({ peerId, id, bytes, size, buffered = 0 }) {
    const transfer = this.transfers.get(`${peerId}:${id}`);
    if (!transfer) return;
    // The most the browser held queued for this transfer: shows backpressure at work.
    transfer.peak = Math.max(transfer.peak ?? 0, buffered);
    transfer.item.dataset.peakBuffered = String(transfer.peak);
    transfer.progress.value = bytes;
    transfer.status.textContent = `${size ? Math.floor((100 * bytes) / size) : 100}%`;
  }

  onFileReceived({ peerId, id, name, blob, verified }) {
    const transfer = this.transfers.get(`${peerId}:${id}`);
    if (!transfer) return;
    transfer.progress.value = transfer.progress.max;
    const link = element('a', { href: URL.createObjectURL(blob), download: name }, `Save ${name}`);
    link.className = 'download';
    transfer.status.replaceChildren(link, ' ', this.verdict(verified));
    transfer.item.dataset.state = 'done';
    transfer.item.dataset.verified = verified === null ? 'unverified' : String(verified);
  }

  verdict(verified) {
    if (verified === true) return element('span', { className: 'ok' }, '✓ SHA-256 checked');
    if (verified === false) {
      return element('strong', { className: 'bad' }, '✗ damaged in transit: do not trust it');
    }
    return element('span', { className: 'hint' }, 'not checked (needs HTTPS on both sides)');
  }

  onFileSent({ peerId, id, verified }) {
    const transfer = this.transfers.get(`${peerId}:${id}`);
    if (!transfer) return;
    transfer.status.replaceChildren('sent ', this.verdict(verified));
    transfer.item.dataset.state = 'done';
    transfer.item.dataset.verified = verified === null ? 'unverified' : String(verified);
  }

  onFileFailed({ peerId, id, reason }) {
    const transfer = this.transfers.get(`${peerId}:${id}`);
    if (!transfer) return;
    transfer.status.replaceChildren(element('strong', { className: 'bad' }, `failed: ${reason}`));
    transfer.item.dataset.state = 'failed';
  }

  // -- calls --------------------------------------------------------------------------------
  // One call at a time. Starting it invites the others; media flows only to those who accept.

  async startCall() {
    $('call').disabled = true;
    $('incoming').hidden = true; // a call from them that rings now is accepted by this
    if ($('notice').dataset.kind === 'info') notice(null); // "declined" and the like are old news
    try {
      await this.chat.startCall();
    } catch (err) {
      this.mediaFailed(err);
    }
    this.renderCall();
  }

  onCallIncoming({ peerId, video }) {
    this.caller = peerId;
    $('incoming-text').textContent = `${this.name(peerId)} is calling${video ? '' : ' (audio only)'}`;
    $('incoming').hidden = false;
    $('accept-video').focus();
  }

  async accept(video) {
    $('incoming').hidden = true;
    if ($('notice').dataset.kind === 'info') notice(null);
    try {
      await this.chat.acceptCall(this.caller, { audio: true, video });
    } catch (err) {
      this.chat.declineCall(this.caller);
      this.mediaFailed(err);
    }
    this.renderCall();
  }

  decline() {
    $('incoming').hidden = true;
    this.chat.declineCall(this.caller);
  }

  onCallEnded(peerId) {
    if (peerId === this.caller) $('incoming').hidden = true; // they gave up before we answered
    notice(`${this.name(peerId)} hung up.`, 'info');
    this.renderCall();
  }

  mediaFailed(err) {
    const why = {
      NotAllowedError: 'access to the camera and microphone was refused',
      NotFoundError: 'no camera or microphone was found',
      NotReadableError: 'the camera or microphone is in use by another program',
    };
    notice(`Cannot start the call: ${why[err.name] ?? err.message}.`);
  }

  toggle(which) {
    const button = $(which);
    const on = button.getAttribute('aria-pressed') !== 'true';
    button.setAttribute('aria-pressed', String(on));
    if (which === 'mute') {
      this.chat.setMuted(on);
      button.textContent = on ? 'Unmute' : 'Mute';
    } else {
      this.chat.setCameraOff(on);
      button.textContent = on ? 'Camera on' : 'Camera off';
    }
  }

  /** The call area: the others large, ourselves small; the status line says who is in it. */
  renderCall() {
    const stream = this.chat.localStream;
    const local = $('local-video');
    if (local.srcObject !== stream) local.srcObject = stream;
    local.hidden = !stream || stream.getVideoTracks().length === 0;
    $('call-area').hidden = !stream && !document.querySelector('video.remote');
    if (!stream) {
      for (const id of ['mute', 'camera']) $(id).setAttribute('aria-pressed', 'false');
      $('mute').textContent = 'Mute';
      $('camera').textContent = 'Camera off';
    }
    $('camera').hidden = local.hidden;
    const inCall = [...this.chat.links.values()].filter((link) => link.call === 'in-call');
    const ringing = [...this.chat.links.values()].filter((link) => link.call === 'inviting');
    let text = '';
    if (inCall.length) text = `In a call with ${inCall.map((l) => this.name(l.id)).join(', ')}.`;
    else if (ringing.length) text = `Calling ${ringing.map((l) => this.name(l.id)).join(', ')}…`;
    $('call-status').textContent = text;
    $('call-area').dataset.state = inCall.length ? 'in-call' : ringing.length ? 'calling' : 'idle';
    this.render();
  }

  onRemoteStream({ peerId, stream }) {
    let video = document.querySelector(`video.remote[data-peer-id="${CSS.escape(peerId)}"]`);
    if (!video) {
      video = element('video', { className: 'remote', autoplay: true, playsInline: true });
      video.dataset.peerId = peerId;
      video.setAttribute('aria-label', this.name(peerId));
      $('videos').prepend(video);
    }
    if (video.srcObject !== stream) video.srcObject = stream;
    video.play().catch(() => {}); // autoplay may wait for a click; the controls are there
    this.renderCall();
  }

  removeVideo(peerId) {
    document.querySelector(`video.remote[data-peer-id="${CSS.escape(peerId)}"]`)?.remove();
    this.renderCall();
  }
}

async function enterRoom(roomId, pin, { creator = false } = {}) {
  const chat = new P2PChat(options);
  const view = new RoomView(chat, { creator });
  try {
    await chat.join(roomId, pin);
  } catch (err) {
    view.dispose();
    throw err; // a JoinError: the caller shows it
  }
  if (pin) sessionStorage.setItem(pinKey(roomId), pin);
  window.addEventListener('pagehide', () => chat.leave());
  show('room');
  return view;
}

function showShare(roomId, pin) {
  $('share').hidden = false;
  $('share-link').value = shareLink(roomId);
  $('share-pin').hidden = !pin;
  $('pin-value').textContent = pin ?? '';
  $('copy-link').addEventListener('click', async () => {
    $('share-link').select();
    try {
      await navigator.clipboard.writeText($('share-link').value);
      $('copy-status').textContent = 'Link copied.';
    } catch {
      $('copy-status').textContent = 'Copy the selected link with Ctrl+C (⌘C).';
    }
  });
}

function showStart() {
  show('start');
  $('create-form').addEventListener('submit', async (event) => {
    event.preventDefault();
    $('create').disabled = true;
    try {
      const { roomId, pin } = await P2PChat.createRoom({
        withPin: $('with-pin').checked,
        private: $('private').checked,
      });
      // No navigation: the page stays, and the address bar now holds the link.
      history.replaceState(null, '', `#room=${roomId}`);
      if (pin) sessionStorage.setItem(pinKey(roomId), pin);
      notice(null);
      showShare(roomId, pin);
      await enterRoom(roomId, pin, { creator: true });
    } catch (err) {
      notice(TEXT[err.code] ?? `Could not create a chat: ${err.message}`);
      $('create').disabled = false;
    }
  });
}

function showJoin(roomId) {
  show('join');
  $('pin').focus();
  $('pin-form').addEventListener('submit', async (event) => {
    event.preventDefault();
    const pin = $('pin').value.replace(/\D/g, '');
    const error = $('pin-error');
    error.hidden = true;
    if (pin.length !== 6) {
      error.textContent = 'The PIN has 6 digits.';
      error.hidden = false;
      return;
    }
    $('join-button').disabled = true;
    try {
      await enterRoom(roomId, pin);
    } catch (err) {
      error.textContent = TEXT[err.code] ?? err.message;
      error.hidden = false;
      $('pin').select();
    } finally {
      $('join-button').disabled = false;
    }
  });
}

async function main() {
  // Pasting another chat's link into this tab changes only the fragment: start afresh.
  window.addEventListener('hashchange', () => location.reload());
  const roomId = roomFromHash();
  if (!roomId) return showStart();
  let room;
  try {
    room = await P2PChat.checkRoom({ roomId });
  } catch {
    return notice(TEXT.unreachable);
  }
  if (!room.exists) {
    notice(TEXT['room-not-found']);
    return showStart();
  }
  $('join-private').hidden = !room.private; // said before anyone joins
  const saved = room.pin ? sessionStorage.getItem(pinKey(roomId)) : null;
  if (room.pin && !saved) return showJoin(roomId);
  try {
    await enterRoom(roomId, saved);
  } catch (err) {
    sessionStorage.removeItem(pinKey(roomId));
    if (err.code === 'wrong-pin') return showJoin(roomId);
    notice(TEXT[err.code] ?? err.message);
  }
}

main();
