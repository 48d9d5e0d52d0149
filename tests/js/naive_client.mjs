// A frontend written from the contract alone: parse every data: payload as JSON and take
// choices[0].delta.content, with no defensive checks (no optional chaining), stop at [DONE].
// Usage: node naive_client.mjs <url> <token> <json body>  -> prints {"text": ..., "frames": n}
const [url, token, body] = process.argv.slice(2);
const res = await fetch(url, {
  method: "POST",
  headers: { "Content-Type": "application/json", Authorization: `Bearer ${token}` },
  body,
});
if (res.status !== 200) {
  console.log(JSON.stringify({ status: res.status }));
  process.exit(0);
}
const reader = res.body.getReader();
const decoder = new TextDecoder();
let buffer = "";
let text = "";
let frames = 0;
for (;;) {
  const { done, value } = await reader.read();
  if (done) break;
  buffer += decoder.decode(value, { stream: true });
  let end;
  while ((end = buffer.indexOf("\n\n")) >= 0) {
    const event = buffer.slice(0, end);
    buffer = buffer.slice(end + 2);
    for (const line of event.split("\n")) {
      if (!line.startsWith("data: ")) continue;
      const data = line.slice(6);
      if (data === "[DONE]") {
        console.log(JSON.stringify({ text, frames }));
        process.exit(0);
      }
      text += JSON.parse(data).choices[0].delta.content;
      frames += 1;
    }
  }
}
console.log(JSON.stringify({ text, frames, error: "no [DONE]" }));
