// Node's `ws` library against wsgate's handshake policy, driven by tests/clients/test_node_policy.py.
//
//   node policy.mjs ws://HOST:PORT/ '[{"name": "a", "origin": "https://x", "protocols": ["chat"]}, ...]'
//
// Opens one WebSocket per attempt, in order: `origin` (when given) is sent as the Origin header
// through the `headers` option, `protocols` (when given) is the subprotocol offer. Reports one
// JSON line per attempt: {"name", "event": "open", "protocol", "echo"} when admitted (the
// subprotocol `ws` accepted, and a text message sent through the upstream and back; then it
// closes), {"name", "event": "refused", "status"} from `unexpected-response` when the upgrade was
// answered with something other than 101, {"name", "event": "error", "message"} otherwise. Then
// {"event": "done"}. The test makes the assertions. Exits by itself after 20 s at the latest.
import WebSocket from "ws";

const url = process.argv[2];
const attempts = JSON.parse(process.argv[3]);
const say = (event) => console.log(JSON.stringify(event));
setTimeout(() => { say({ event: "timeout" }); process.exit(1); }, 20_000).unref();

const attempt = ({ name, origin, protocols }) => new Promise((resolve) => {
  let reported = false; // one outcome per attempt: a late error of a refused one is not another
  const report = (event) => {
    if (reported) return;
    reported = true;
    say({ name, ...event });
  };
  const headers = origin === undefined ? {} : { Origin: origin };
  const ws = new WebSocket(url, protocols ?? [], { headers, perMessageDeflate: false });
  ws.once("open", () => {
    ws.once("message", (data) => {
      report({ event: "open", protocol: ws.protocol, echo: data.toString() });
      ws.once("close", () => resolve());
      ws.close(1000);
    });
    ws.send("through");
  });
  ws.once("unexpected-response", (_req, res) => {
    report({ event: "refused", status: res.statusCode });
    res.resume();
    resolve();
  });
  ws.on("error", (err) => {
    report({ event: "error", message: err.message });
    resolve();
  });
});

for (const a of attempts) await attempt(a);
say({ event: "done" });
process.exit(0);
