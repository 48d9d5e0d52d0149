// A frontend using @microsoft/fetch-event-source the way the README warns against: its default onerror
// retries (here every 100 ms) whatever failed, re-sending the same POST. With an Idempotency-Key the
// repeats must not become new messages. Node stands in for the browser (window/document shims).
// Usage: node fetch_event_source_retry.mjs <lib dir> <url> <token> <json body> <key> <attempts>
//   -> prints {"attempts": n, "statuses": [...], "texts": [...]}
import { createRequire } from "node:module";

const [libDir, url, token, body, key, attemptsArg] = process.argv.slice(2);
globalThis.window = globalThis;
globalThis.document = { hidden: false, addEventListener() {}, removeEventListener() {} };
const require = createRequire(import.meta.url);
const { fetchEventSource } = require(`${libDir}/lib/cjs/index.js`);

const maxAttempts = Number(attemptsArg);
const statuses = [];
const texts = [];
let text = "";
const controller = new AbortController();
await new Promise((resolve) => {
  fetchEventSource(url, {
    method: "POST",
    headers: { "Content-Type": "application/json", Authorization: `Bearer ${token}`, "Idempotency-Key": key },
    body,
    openWhenHidden: true,
    signal: controller.signal,
    async onopen(res) {
      statuses.push(res.status);
      text = "";
      if (!res.ok || !(res.headers.get("content-type") || "").startsWith("text/event-stream")) {
        throw new Error(`status ${res.status}`); // what the library's default onopen does too
      }
    },
    onmessage(ev) {
      if (ev.data === "[DONE]") return;
      text += JSON.parse(ev.data).choices[0].delta.content;
    },
    onclose() {
      texts.push(text);
      // Like a client that does not close on [DONE]: the stream ended, so "reconnect".
      throw new Error("closed");
    },
    onerror() {
      if (statuses.length >= maxAttempts) {
        controller.abort();
        resolve();
        throw new Error("enough");
      }
      return 100; // retry in 100 ms, as the default does every second
    },
  }).catch(() => resolve());
});
console.log(JSON.stringify({ attempts: statuses.length, statuses, texts }));
