// check.js: the connection check page (/check, docs/web.md). It does what a call would: gets the
// iceServers from the signaling, gathers ICE candidates with them, and connects two peer
// connections of its own to each other through the TURN relay. Then it says, in plain words,
// whether calls can work from this network. The CLI counterpart is `p2pserver check`.
import { P2PChat } from './p2pchat.js';

const $ = (id) => document.getElementById(id);

const VERDICT_MS = 10_000; // the verdict comes by then: what has not answered yet has failed
// Chromium reports a STUN or TURN server that never answers (icecandidateerror 701) only once its
// retransmissions are over, about 40 s on (RFC 8489 §6.2.1); the reasons are added when they come.
const REASON_MS = 45_000;
const RELAY_MS = 10_000; // how long two peer connections may take to meet through the relay
const JOIN_MS = 10_000; // how long the signaling may take to hand out the iceServers
const PROTOCOLS = ['udp', 'tcp', 'tls'];

const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

function deferred() {
  let resolve;
  const promise = new Promise((done) => {
    resolve = done;
  });
  return { promise, resolve };
}

/** The promise's value, or a rejection with `message` after `ms`. */
function bounded(promise, ms, message) {
  let timer;
  const timeout = new Promise((_, reject) => {
    timer = setTimeout(() => reject(new Error(message)), ms);
  });
  return Promise.race([promise, timeout]).finally(() => clearTimeout(timer));
}

/** {scheme, protocol} of a STUN/TURN URL (RFC 7064, RFC 7065); turns: is TURN over TLS. */
function parseUrl(url) {
  const match = /^(stuns?|turns?):[^?]*(?:\?transport=(udp|tcp))?$/i.exec(url);
  if (!match) return null;
  const scheme = match[1].toLowerCase();
  const secure = scheme.endsWith('s');
  return { scheme, protocol: secure ? 'tls' : (match[2]?.toLowerCase() ?? 'udp') };
}

/** The iceServers a call in a fresh room would get: create a room, join it, leave at once. */
async function fetchIceServers() {
  const { roomId } = await P2PChat.createRoom();
  const chat = new P2PChat();
  try {
    const welcome = await bounded(chat.join(roomId), JOIN_MS, 'the chat server did not answer');
    return welcome.iceServers ?? [];
  } finally {
    chat.leave();
  }
}

/**
 * Candidate gathering as the caller of a call does it (a data channel, an offer). Everything
 * the browser reports (candidates, icecandidateerror events) is kept as it comes; `done`
 * settles when gathering completes or after REASON_MS, and the connection is closed then.
 */
class Gathering {
  constructor(iceServers) {
    this.candidates = [];
    this.errors = [];
    this.complete = false;
    this.pc = new RTCPeerConnection({ iceServers });
    const finished = deferred();
    this.finished = finished;
    this.pc.onicecandidate = ({ candidate, url }) => {
      if (!candidate) {
        this.complete = true; // end of candidates
        finished.resolve();
      } else if (candidate.candidate) {
        this.add(candidate, candidate.url ?? url ?? null);
      }
    };
    this.pc.onicecandidateerror = ({ url, errorCode, errorText }) => {
      this.errors.push({ url, errorCode, errorText });
    };
    this.done = (async () => {
      this.pc.createDataChannel('check');
      await this.pc.setLocalDescription(await this.pc.createOffer());
      await Promise.race([finished.promise, sleep(REASON_MS)]);
    })().finally(() => this.stop());
  }

  add(candidate, url) {
    this.candidates.push({
      type: candidate.type,
      address: candidate.address,
      port: candidate.port,
      // How this browser reaches the TURN server, for a relay candidate.
      relayProtocol: candidate.relayProtocol ?? (url ? parseUrl(url)?.protocol : undefined),
      url,
      line: candidate.candidate,
    });
  }

  stop() {
    this.pc.close();
    this.finished.resolve();
  }
}

/** The selected candidate pair's round trip time in ms, from getStats(); null if none comes. */
async function selectedRoundTrip(pc) {
  for (let attempt = 0; attempt < 30; attempt += 1) {
    const stats = await pc.getStats();
    let pair = null;
    stats.forEach((report) => {
      if (report.type === 'transport' && report.selectedCandidatePairId) {
        pair = stats.get(report.selectedCandidatePairId);
      }
    });
    if (typeof pair?.currentRoundTripTime === 'number') {
      return pair.currentRoundTripTime * 1000;
    }
    await sleep(100); // stats can lag the channel opening by a moment
  }
  return null;
}

/** Round trip of one data channel message there and back, in ms (when stats have no RTT). */
async function echoRoundTrip(channel) {
  const reply = new Promise((resolve) => {
    channel.onmessage = resolve;
  });
  const start = performance.now();
  channel.send('ping');
  await reply;
  return performance.now() - start;
}

/**
 * Two peer connections in this page, both relay-only with one TURN URL, connected to each other:
 * every packet goes this browser -> TURN -> relay -> relay -> TURN -> this browser, as between two
 * people who both need the relay. Resolves with the round trip in ms; rejects with a reason.
 */
async function relayRoundTrip(server, url, ms) {
  const config = {
    iceServers: [{ urls: [url], username: server.username, credential: server.credential }],
    iceTransportPolicy: 'relay',
  };
  const caller = new RTCPeerConnection(config);
  const callee = new RTCPeerConnection(config);
  // Candidates go over only once the other side has the description they belong to.
  const callerReady = deferred();
  const calleeReady = deferred();
  caller.onicecandidate = ({ candidate }) => {
    if (candidate) calleeReady.promise.then(() => callee.addIceCandidate(candidate)).catch(() => {});
  };
  callee.onicecandidate = ({ candidate }) => {
    if (candidate) callerReady.promise.then(() => caller.addIceCandidate(candidate)).catch(() => {});
  };
  callee.ondatachannel = ({ channel }) => {
    channel.onmessage = ({ data }) => channel.send(data); // echo
  };
  const channel = caller.createDataChannel('round-trip');
  const opened = new Promise((resolve, reject) => {
    channel.onopen = resolve;
    caller.onconnectionstatechange = () => {
      if (caller.connectionState === 'failed') reject(new Error('nothing came through the relay'));
    };
  });
  opened.catch(() => {}); // a failure before the wait below is still reported by it
  try {
    await caller.setLocalDescription(await caller.createOffer());
    await callee.setRemoteDescription(caller.localDescription);
    calleeReady.resolve();
    await callee.setLocalDescription(await callee.createAnswer());
    await caller.setRemoteDescription(callee.localDescription);
    callerReady.resolve();
    await bounded(opened, ms, `no connection through the relay within ${ms / 1000} s`);
    const fromStats = await selectedRoundTrip(caller);
    return fromStats ?? (await bounded(echoRoundTrip(channel), ms, 'no echo through the relay'));
  } finally {
    caller.close();
    callee.close();
  }
}

// -- showing it ----------------------------------------------------------------------------------

function formatMs(ms) {
  if (ms < 1) return 'under 1 ms';
  return `${ms < 10 ? ms.toFixed(1) : Math.round(ms)} ms`;
}

const STATE_TEXT = {
  checking: 'checking…',
  works: 'works',
  failed: 'failed',
  absent: 'not offered',
  none: 'none',
};

function setRow(id, state, detail, extra = {}) {
  const row = $(id);
  row.dataset.state = state;
  row.querySelector('.state').textContent = STATE_TEXT[state];
  row.querySelector('.detail').textContent = detail;
  for (const [key, value] of Object.entries(extra)) row.dataset[key] = value;
}

function setVerdict(kind, text, detail) {
  $('verdict-box').dataset.verdict = kind;
  $('verdict').textContent = text;
  $('verdict-detail').textContent = detail;
}

function listItems(list, lines) {
  list.replaceChildren(
    ...lines.map((line) => Object.assign(document.createElement('li'), { textContent: line })),
  );
}

function reset() {
  setVerdict('checking', 'Checking…', `This takes up to ${VERDICT_MS / 1000} seconds.`);
  for (const id of ['host', 'srflx', ...PROTOCOLS.map((p) => `relay-${p}`)]) {
    setRow(id, 'checking', '');
    delete $(id).dataset.rttMs;
  }
  $('results').setAttribute('aria-busy', 'true');
  $('problems').hidden = true;
  listItems($('errors'), []);
  listItems($('servers'), []);
  listItems($('candidates'), []);
}

/** The browser's error text for each URL, once each. */
function errorLines(errors) {
  const lines = errors.map(
    (e) => `${e.url ?? 'unknown server'}: ${e.errorCode} ${e.errorText || '(no text)'}`,
  );
  return [...new Set(lines)];
}

/** Why a server gave nothing: the browser's words if it has said, else how long it was silent. */
function silence(errors, urls, waited) {
  const said = errorLines(errors.filter((e) => urls.includes(e.url)));
  if (said.length) return `The browser says: ${said.join('; ')}`;
  const wait = waited.final ? '' : " (waiting for the browser's reason)";
  return `No answer from ${urls.join(', ')} within ${waited.seconds} s${wait}.`;
}

function showHost(candidates) {
  const addresses = new Set(candidates.filter((c) => c.type === 'host').map((c) => c.address));
  if (!addresses.size) {
    setRow('host', 'none', 'The browser offered no local address.');
    return;
  }
  const hidden = [...addresses].some((a) => a?.endsWith('.local'));
  const count = `${addresses.size} local address${addresses.size === 1 ? '' : 'es'}`;
  setRow('host', 'works', hidden ? `${count}, hidden by the browser behind .local names.` : `${count}.`);
}

/** STUN works: a server-reflexive candidate, or gathering completed without a STUN error. */
function showStun(urls, gathering, waited) {
  const stunUrls = urls.filter((u) => parseUrl(u)?.scheme.startsWith('stun'));
  const srflx = gathering.candidates.find((c) => c.type === 'srflx');
  if (srflx) {
    setRow('srflx', 'works', `The server sees this browser at ${srflx.address}:${srflx.port}.`);
    return true;
  }
  if (!stunUrls.length) {
    setRow('srflx', 'absent', 'The server hands out no STUN address.');
    return false;
  }
  const errors = gathering.errors.filter((e) => stunUrls.includes(e.url));
  if (gathering.complete && !errors.length) {
    // Chromium drops a server-reflexive candidate equal to a local one (no NAT on the way).
    setRow('srflx', 'works', 'The STUN server answered; this browser is not behind a NAT.');
    return true;
  }
  const hint = 'UDP to the server may be blocked on this network.';
  setRow('srflx', 'failed', `${silence(gathering.errors, stunUrls, waited)} ${hint}`);
  return false;
}

/** One row per TURN transport; returns the protocols whose relay carried data. */
function showRelays(turnServers, gathering, trips, waited) {
  const working = [];
  for (const protocol of PROTOCOLS) {
    const urls = turnServers.flatMap(({ url }) => (parseUrl(url).protocol === protocol ? [url] : []));
    const id = `relay-${protocol}`;
    if (!urls.length) {
      setRow(id, 'absent', 'The server does not offer this transport.');
      continue;
    }
    const relay = gathering.candidates.find(
      (c) => c.type === 'relay' && c.relayProtocol === protocol,
    );
    const where = relay ? `Relayed address ${relay.address}:${relay.port}` : 'The relay answered';
    const trip = trips.find((t) => urls.includes(t.url));
    if (trip?.ok) {
      working.push(protocol);
      setRow(id, 'works', `${where}; round trip through the relay ${formatMs(trip.ms)}.`, {
        rttMs: trip.ms.toFixed(3),
      });
    } else if (relay) {
      const reason = trip?.reason ?? 'no round trip was made';
      const operator = "The server's operator can find out why with `p2pserver check`.";
      setRow(id, 'failed', `${where}, but ${reason}. ${operator}`);
    } else {
      const hint = `${protocol === 'udp' ? 'UDP' : 'TCP'} to the server may be blocked on this network.`;
      setRow(id, 'failed', `No relayed address. ${silence(gathering.errors, urls, waited)} ${hint}`);
    }
  }
  return working;
}

function showVerdict(relays, stun) {
  if (relays.length && stun) {
    setVerdict(
      'ok',
      'Calls will work from this network.',
      'Calls can find a direct path (STUN answered), and the relay works where they cannot.',
    );
  } else if (relays.length) {
    setVerdict(
      'relay-only',
      'Calls will work, but only through the relay.',
      'STUN does not work from here, so calls cannot find a direct path; they go through ' +
        `the relay over ${relays.map((p) => p.toUpperCase()).join(' and ')}, which works.`,
    );
  } else {
    setVerdict(
      'no-relay',
      'No relay: calls will fail behind strict NATs.',
      stun
        ? 'Calls can still connect directly where neither side is behind a strict NAT or firewall.'
        : 'Neither STUN nor the relay works from here: calls will probably fail.',
    );
  }
}

/** Everything the page shows, from what is known so far. */
function render({ urls, turnServers, gathering, trips, waited }) {
  showHost(gathering.candidates);
  const stun = showStun(urls, gathering, waited);
  const relays = showRelays(turnServers, gathering, trips, waited);
  const errors = errorLines(gathering.errors);
  listItems($('errors'), errors);
  $('problems').hidden = !errors.length;
  listItems(
    $('candidates'),
    gathering.candidates.map((c) => (c.url ? `${c.line} (${c.url})` : c.line)),
  );
  showVerdict(relays, stun);
  $('results').setAttribute('aria-busy', 'false');
}

let runs = 0; // a newer run (Check again) makes an older one stop showing things
let current = null; // the latest run's Gathering

async function run() {
  const token = ++runs;
  current?.stop();
  $('again').disabled = true;
  reset();
  try {
    if (typeof RTCPeerConnection !== 'function') {
      setVerdict('error', 'This browser cannot make calls.', 'It has no WebRTC (RTCPeerConnection).');
      return;
    }
    let iceServers;
    try {
      iceServers = await fetchIceServers();
    } catch (err) {
      if (err.name === 'JoinError' && err.code !== 'unreachable') {
        // The server answered, but no: rooms created too fast, too many connections...
        setVerdict('error', 'The chat server refused the check.', `${err.message}. Try again later.`);
      } else {
        setVerdict('error', 'Could not reach the chat server.', 'Check your connection and try again.');
      }
      return;
    }
    if (token !== runs) return;
    const urls = iceServers.flatMap((server) => [].concat(server.urls ?? []));
    listItems($('servers'), urls);
    const turnServers = iceServers.flatMap((server) =>
      [].concat(server.urls ?? []).flatMap((url) =>
        parseUrl(url)?.scheme.startsWith('turn') ? [{ url, server }] : [],
      ),
    );
    // All at once: gathering, and a round trip through the relay for each TURN URL.
    const gathering = new Gathering(iceServers);
    current = gathering;
    const ended = gathering.done.then(
      () => true,
      () => true,
    );
    const [trips] = await Promise.all([
      Promise.all(
        turnServers.map(({ url, server }) =>
          relayRoundTrip(server, url, RELAY_MS).then(
            (ms) => ({ url, ok: true, ms }),
            (err) => ({ url, ok: false, reason: err.message }),
          ),
        ),
      ),
      Promise.race([ended, sleep(VERDICT_MS)]),
    ]);
    if (token !== runs) return;
    const view = { urls, turnServers, gathering, trips };
    const final = gathering.complete;
    render({ ...view, waited: { seconds: VERDICT_MS / 1000, final } });
    $('again').disabled = false;
    if (!final) {
      await ended; // the browser's reasons for what did not answer come later
      if (token === runs) render({ ...view, waited: { seconds: REASON_MS / 1000, final: true } });
    }
  } catch (err) {
    if (token === runs) setVerdict('error', 'The check itself failed.', String(err?.message ?? err));
  } finally {
    if (token === runs) $('again').disabled = false;
  }
}

$('again').addEventListener('click', run);
run();
