// Node's `ws` library as a wsgate client, driven by tests/clients/test_node_ws.py.
//
//   node client.mjs ws://HOST:PORT/
//
// Against a cap of 2: opens a and b, checks that a third connection is refused with 503 and
// Retry-After, echoes a text and a 1 MiB binary message on a, then prints {"event":"ready"} and
// waits for wsgate to close a and b (the test sends SIGTERM). Every observation is one JSON line
// on stdout; the test makes the assertions. Exits by itself after 20 s at the latest.
//
//   node client.mjs ws://HOST:PORT/ guard-size        (tests/clients/test_node_guards.py)
//
// Against max_message_size = 65536, without permessage-deflate (so wire size = payload size):
// echoes 65536 bytes, then sends 65537 and reports the close.
//
//   node client.mjs ws://HOST:PORT/ guard-rate-close  (tests/clients/test_node_guards.py)
//
// Against message_rate_action = close: sends 200 text messages at once and reports the close.
//
//   node client.mjs ws://HOST:PORT/ close-refusal     (tests/clients/test_close_refusals.py)
//
// Against a cap of 1 with refusal_mode = close: opens one connection that holds the slot, then a
// second, and reports what `ws` saw of it: its open (wsgate's own 101) and its close.
import WebSocket from "ws";

const url = process.argv[2];
const say = (event) => console.log(JSON.stringify(event));
setTimeout(() => { say({ event: "timeout" }); process.exit(1); }, 20_000).unref();

const open = (name) => new Promise((resolve, reject) => {
  const ws = new WebSocket(url);
  ws.once("open", () => resolve(ws));
  ws.once("unexpected-response", (_req, res) => {
    say({ name, event: "refused", status: res.statusCode, retryAfter: res.headers["retry-after"] ?? null });
    res.resume();
    resolve(null);
  });
  ws.once("error", reject);
});

const echo = (ws, data) => new Promise((resolve) => {
  ws.once("message", (got, isBinary) => resolve({ got, isBinary }));
  ws.send(data);
});

const closed = (name, ws) => new Promise((resolve) => {
  ws.once("close", (code, reason) => {
    say({ name, event: "close", code, reason: reason.toString() });
    resolve();
  });
});

const pattern = (n) => {
  const buf = Buffer.alloc(n);
  for (let i = 0; i < n; i++) buf[i] = (i * 31 + 7) & 0xff;
  return buf;
};

const openGuarded = (options) => new Promise((resolve, reject) => {
  const ws = new WebSocket(url, options);
  ws.once("open", () => resolve(ws));
  ws.once("error", reject);
});

const modes = {
  "guard-size": async () => {
    const ws = await openGuarded({ perMessageDeflate: false });
    const wsClosed = closed("g", ws);
    const fits = pattern(65536);
    const got = await echo(ws, fits);
    say({ name: "g", event: "binary", length: got.got.length, intact: got.isBinary && fits.equals(got.got) });
    ws.send(pattern(65537));
    say({ name: "g", event: "sent", length: 65537 });
    await wsClosed;
  },
  "guard-rate-close": async () => {
    const ws = await openGuarded({});
    const wsClosed = closed("g", ws);
    for (let i = 0; i < 200; i++) ws.send(`message ${i}`);
    say({ name: "g", event: "sent", count: 200 });
    await wsClosed;
  },
  "close-refusal": async () => {
    const held = await open("held");
    const refused = new WebSocket(url);
    refused.once("open", () => say({ name: "r", event: "open", protocol: refused.protocol }));
    refused.once("unexpected-response", (_req, res) => {
      say({ name: "r", event: "refused", status: res.statusCode });
      res.resume();
    });
    await closed("r", refused);
    held.close();
  },
};

const mode = process.argv[3];
if (mode !== undefined) {
  if (!(mode in modes)) { say({ event: "unknown mode", mode }); process.exit(2); }
  await modes[mode]();
  say({ event: "done" });
  process.exit(0);
}

const a = await open("a");
const b = await open("b");
const aClosed = closed("a", a);
const bClosed = closed("b", b);
await open("c");

const text = await echo(a, "hello from node ws");
say({ name: "a", event: "text", data: text.got.toString(), binary: text.isBinary });
const bulk = Buffer.alloc(1 << 20, 0);
for (let i = 0; i < bulk.length; i++) bulk[i] = (i * 31 + 7) & 0xff;
const bin = await echo(a, bulk);
say({ name: "a", event: "binary", length: bin.got.length, intact: bin.isBinary && bulk.equals(bin.got) });

say({ event: "ready" });
await Promise.all([aClosed, bClosed]);
say({ event: "done" });
