// Load generator for bench/signaling.py: one Node process, one server, one figure per run.
//
//   node signaling_load.mjs MODE KIND BASE_URL key=value...
//
// MODE: relay | connect | idle.  KIND: p2p (p2pserver) | peerjs (PeerJS server 1.x).
// It prints one JSON line with its results (idle mode also talks to its parent over stdin and
// stdout, so the parent can read the server's memory at the right moments). Every loop here is
// bounded in time and count; it only ever connects to the BASE_URL it is given (loopback).

import WebSocket from "ws";
import { randomBytes } from "node:crypto";
import { createInterface } from "node:readline";
import http from "node:http";

const [mode, kind, base, ...rest] = process.argv.slice(2);
const opt = Object.fromEntries(rest.map((arg) => arg.split("=")));
const num = (name, fallback) => (opt[name] === undefined ? fallback : Number(opt[name]));
const wsBase = base.replace(/^http/, "ws");
// second=URL (p2p only): the second peer of each room connects there (another instance of a
// fleet sharing one Redis, bench/fleet.py); rooms are still created on BASE_URL.
const wsSecond = opt.second ? opt.second.replace(/^http/, "ws") : wsBase;
const OPEN_TIMEOUT = num("open_timeout", 30) * 1000;
const HARD_LIMIT = num("hard_limit", 120) * 1000; // the whole run, whatever happens
setTimeout(() => {
  console.log(JSON.stringify({ error: "hard time limit reached" }));
  process.exit(2);
}, HARD_LIMIT).unref();

// Peers closed by the server after they were ready, by close code (a join that "succeeded" and
// was then closed, say with 1011, failed all the same). closeAll() makes its closes expected.
const closedAfterReady = {};
let closingAll = false;

const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

// node:http with keep-alive: fetch() costs the generator several times the CPU per request,
// and the generator, not the server, would set the pace.
const agent = new http.Agent({ keepAlive: true, maxSockets: 256 });
const target = new URL(base);

function createRoom() {
  return new Promise((resolve, reject) => {
    const request = http.request(
      {
        agent,
        host: target.hostname,
        port: target.port,
        path: "/create-chat",
        method: "POST",
        headers: { "content-type": "application/json", "content-length": 2 },
      },
      (response) => {
        const chunks = [];
        response.on("data", (chunk) => chunks.push(chunk));
        response.on("end", () => {
          if (response.statusCode !== 200) return reject(new Error(`create-chat ${response.statusCode}`));
          resolve(JSON.parse(Buffer.concat(chunks).toString()).roomId);
        });
      },
    );
    request.on("error", (err) => reject(new Error(`create-chat ${err.code || err.message}`)));
    request.end("{}");
  });
}

// A connected, ready peer: p2pserver's welcome, or PeerJS server's OPEN. Rejects with a reason.
function openPeer(room, where = wsBase) {
  return new Promise((resolve, reject) => {
    let id;
    let url;
    if (kind === "p2p") {
      url = `${where}/ws/${room}`;
    } else {
      id = randomBytes(9).toString("base64url");
      url = `${wsBase}/peerjs?key=peerjs&id=${id}&token=${randomBytes(6).toString("hex")}`;
    }
    const ws = new WebSocket(url); // offers permessage-deflate, as browsers do
    let settled = false;
    const fail = (reason) => {
      if (settled) return;
      settled = true;
      clearTimeout(timer);
      ws.terminate();
      reject(new Error(reason));
    };
    const timer = setTimeout(() => fail("timeout"), OPEN_TIMEOUT);
    ws.on("open", () => {
      if (kind === "p2p") ws.send('{"type":"join"}');
    });
    ws.on("error", (err) => fail(`error ${err.code || err.message}`));
    ws.on("close", (code) => fail(`closed ${code}`));
    ws.once("message", (data) => {
      const message = JSON.parse(data.toString());
      const ready = kind === "p2p" ? message.type === "welcome" : message.type === "OPEN";
      if (!ready) return fail(`got ${message.type} ${message.code || ""}`.trim());
      settled = true;
      clearTimeout(timer);
      ws.removeAllListeners("close");
      ws.removeAllListeners("error");
      ws.on("error", () => {});
      ws.on("close", (code) => {
        if (!closingAll) closedAfterReady[code] = (closedAfterReady[code] || 0) + 1;
      });
      resolve({ ws, id: kind === "p2p" ? message.peerId : id, partner: null });
    });
  });
}

// Run `count` jobs, `inFlight` at a time; returns [results, failures by reason].
async function pool(count, inFlight, job) {
  const results = [];
  const failures = {};
  let next = 0;
  async function worker() {
    while (next < count) {
      const index = next++;
      try {
        results.push(await job(index));
      } catch (err) {
        failures[err.message] = (failures[err.message] || 0) + 1;
      }
    }
  }
  await Promise.all(Array.from({ length: Math.min(inFlight, count) }, worker));
  return [results, failures];
}

async function openPair() {
  const room = kind === "p2p" ? await createRoom() : null;
  const a = await openPeer(room);
  const b = await openPeer(room, wsSecond);
  a.partner = b.id;
  b.partner = a.id;
  return [a, b];
}

function closeAll(peers) {
  closingAll = true;
  for (const peer of peers) peer.ws.terminate();
}

function percentile(sorted, p) {
  if (sorted.length === 0) return null;
  return sorted[Math.min(sorted.length - 1, Math.floor((p / 100) * sorted.length))];
}

async function relay() {
  const rooms = num("rooms", 50);
  const inFlight = num("in_flight", 8); // per peer
  const payload = num("payload", 300);
  const warmup = num("warmup", 1) * 1000;
  const duration = num("duration", 5) * 1000;
  const maxMessages = num("max_messages", 5e6);
  const [pairs, failures] = await pool(rooms, 32, openPair);
  const peers = pairs.flat();
  let counting = false;
  let stopped = false;
  let received = 0;
  let errors = 0;
  const latencies = new Float64Array(maxMessages);
  // Frames of about `payload` bytes: the padding makes up what the envelope does not.
  const pad = "x".repeat(Math.max(0, payload - 110));
  const frame = (peer) =>
    kind === "p2p"
      ? `{"type":"signal","to":"${peer.partner}","data":{"t":${performance.now()},"candidate":"${pad}"}}`
      : `{"type":"CANDIDATE","dst":"${peer.partner}","payload":{"t":${performance.now()},"candidate":"${pad}"}}`;
  for (const peer of peers) {
    peer.ws.on("message", (data) => {
      const message = JSON.parse(data.toString());
      const body = kind === "p2p" ? message.data : message.payload;
      if (body === undefined || body.t === undefined) {
        if (message.type === "error" || message.type === "ERROR") errors++;
        return;
      }
      if (counting && received < maxMessages) latencies[received++] = performance.now() - body.t;
      if (!stopped) peer.ws.send(frame(peer));
    });
  }
  const started = performance.now();
  for (const peer of peers) for (let i = 0; i < inFlight; i++) peer.ws.send(frame(peer));
  await sleep(warmup);
  const cpuBefore = process.cpuUsage();
  const t0 = performance.now();
  counting = true;
  await sleep(duration);
  counting = false;
  const elapsed = (performance.now() - t0) / 1000;
  const cpu = process.cpuUsage(cpuBefore);
  stopped = true;
  const sorted = Array.from(latencies.subarray(0, received)).sort((x, y) => x - y);
  closeAll(peers);
  return {
    peers: peers.length,
    setup_failures: failures,
    signals_per_s: received / elapsed,
    p50_ms: percentile(sorted, 50),
    p99_ms: percentile(sorted, 99),
    errors,
    generator_cpu: (cpu.user + cpu.system) / 1e6 / elapsed,
    seconds: (performance.now() - started) / 1000,
  };
}

async function connect() {
  const count = num("peers", 2000);
  const inFlight = num("in_flight", 64);
  const cpuBefore = process.cpuUsage();
  const t0 = performance.now();
  let createMs = 0;
  let openMs = 0;
  const [peers, failures] = await pool(count, inFlight, async () => {
    const t0 = performance.now();
    const room = kind === "p2p" ? await createRoom() : null;
    const t1 = performance.now();
    const peer = await openPeer(room);
    createMs += t1 - t0;
    openMs += performance.now() - t1;
    return peer;
  });
  const elapsed = (performance.now() - t0) / 1000;
  const cpu = process.cpuUsage(cpuBefore);
  await sleep(500); // a close that follows a welcome closely still counts
  closeAll(peers);
  for (const [code, n] of Object.entries(closedAfterReady)) failures[`closed ${code} after ready`] = n;
  const failed = Object.values(failures).reduce((sum, n) => sum + n, 0);
  return {
    peers: count,
    ready: peers.length,
    failed,
    failures,
    ready_per_s: peers.length / elapsed,
    create_ms: createMs / Math.max(1, peers.length), // mean time per step, per peer
    open_ms: openMs / Math.max(1, peers.length),
    generator_cpu: (cpu.user + cpu.system) / 1e6 / elapsed,
  };
}

// idle: warm up, say "warm", wait for "go", open the peers, say "held", wait for "done".
async function idle() {
  const count = num("peers", 5000);
  const lines = createInterface({ input: process.stdin });
  const iterator = lines[Symbol.asyncIterator]();
  const [warm] = await pool(50, 16, openPair);
  closeAll(warm.flat());
  await sleep(500);
  console.log(JSON.stringify({ state: "warm" }));
  await iterator.next();
  const [pairs, failures] = await pool(Math.ceil(count / 2), 64, openPair);
  const peers = pairs.flat();
  await sleep(1000); // let the server settle (writers idle, queues empty)
  console.log(JSON.stringify({ state: "held", held: peers.length, failures }));
  await iterator.next();
  closeAll(peers);
  lines.close();
  return { held: peers.length, failures };
}

const modes = { relay, connect, idle };
const result = await modes[mode]();
console.log(JSON.stringify(result));
process.exit(0);
