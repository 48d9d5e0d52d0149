// Reference web client of the aichat API (contract section 7): login, role picker, streaming chat.

const $ = (selector) => document.querySelector(selector);
const TOKEN_KEY = "aichat.token";
const USER_KEY = "aichat.user";
const RESEND_SECONDS = 60;

const state = {
  loginBase: "",
  chatBase: "",
  token: localStorage.getItem(TOKEN_KEY),
  user: readJson(localStorage.getItem(USER_KEY)),
  roles: [],
  role: null,
  image: null, // {base64, type, url} of the photo waiting to be sent
  stream: null, // AbortController of the reply being streamed
};

class ApiError extends Error {
  constructor(status, code, message, retryAfter = null) {
    super(message);
    this.status = status;
    this.code = code;
    this.retryAfter = retryAfter;
  }
}

function readJson(text) {
  try {
    return JSON.parse(text);
  } catch {
    return null;
  }
}

// ---- configuration and HTTP ----

async function loadConfig() {
  const host = location.hostname || "127.0.0.1";
  const config = { login_base_url: `http://${host}:9000`, chat_base_url: `http://${host}:9001` };
  try {
    const res = await fetch("./config.json", { cache: "no-store" });
    if (res.ok) Object.assign(config, await res.json());
  } catch {
    // No config.json: keep the local defaults.
  }
  state.loginBase = config.login_base_url.replace(/\/+$/, "");
  state.chatBase = config.chat_base_url.replace(/\/+$/, "");
}

async function request(base, path, { method = "GET", body, auth = false, signal } = {}) {
  const headers = {};
  if (body !== undefined) headers["Content-Type"] = "application/json";
  if (auth) headers.Authorization = `Bearer ${state.token}`;
  let res;
  try {
    res = await fetch(base + path, { method, headers, signal, body: body === undefined ? undefined : JSON.stringify(body) });
  } catch (err) {
    if (err.name === "AbortError") throw err;
    throw new ApiError(0, "NetworkError", "网络异常，请检查网络后重试");
  }
  if (!res.ok) throw await errorOf(res);
  return res;
}

async function errorOf(res) {
  const data = (res.headers.get("Content-Type") || "").includes("application/json") ? await res.json().catch(() => null) : null;
  const retry = Number.parseInt(res.headers.get("Retry-After") || "", 10);
  return new ApiError(
    res.status,
    data?.code || `HTTP${res.status}`,
    data?.message || `请求失败（HTTP ${res.status}）`,
    Number.isFinite(retry) ? retry : null,
  );
}

const getJson = async (base, path, options) => (await request(base, path, options)).json();

// ---- messages to the user ----

function showError(text) {
  const el = $("#error");
  el.textContent = text;
  el.hidden = !text;
}

function showNotice(text) {
  const el = $("#notice");
  el.textContent = text;
  el.hidden = !text;
}

function clearMessages() {
  showError("");
  showNotice("");
}

// Every failed call ends here: a rejected token sends the user back to the login page.
function handleError(err) {
  if (err.name === "AbortError") return;
  if (err.status === 401 && err.code === "Unauthorized") {
    logout();
    showError("登录已失效，请重新登录");
    return;
  }
  showError(err.message || "出错了，请稍后再试");
}

// ---- views and routing (#/roles, #/chat/<role_code>) ----

function showView(name) {
  for (const view of ["login", "roles", "chat"]) $(`#${view}-view`).hidden = view !== name;
  const loggedIn = Boolean(state.token);
  $("#logout-btn").hidden = !loggedIn;
  $("#user-label").textContent = loggedIn && state.user ? `+${state.user.country_code} ${state.user.phone_number}` : "";
  document.body.dataset.view = name;
}

function go(hash) {
  if (location.hash === hash) route();
  else location.hash = hash;
}

async function route() {
  abortStream();
  if (!state.token) return showView("login");
  const match = location.hash.match(/^#\/chat\/([\w-]+)$/);
  if (!state.roles.length) await loadRoles();
  const role = match && state.roles.find((r) => r.role_code === match[1]);
  if (role) return openChat(role);
  showView("roles");
}

// ---- login ----

function loginFields() {
  return { phone_number: $("#phone").value.trim(), country_code: $("#country-code").value.trim().replace(/^\+/, "") || "86" };
}

let cooldownTimer = null;

function cooldown(seconds) {
  const button = $("#send-code-btn");
  clearInterval(cooldownTimer);
  let left = seconds;
  const tick = () => {
    if (left <= 0) {
      clearInterval(cooldownTimer);
      button.disabled = false;
      button.textContent = "获取验证码";
      return;
    }
    button.disabled = true;
    button.textContent = `${left} 秒后重发`;
    left -= 1;
  };
  tick();
  cooldownTimer = setInterval(tick, 1000);
}

async function sendCode() {
  clearMessages();
  const button = $("#send-code-btn");
  button.disabled = true;
  try {
    const data = await getJson(state.loginBase, "/send_code", { method: "POST", body: loginFields() });
    showNotice(data.message || "验证码已发送");
    cooldown(RESEND_SECONDS);
  } catch (err) {
    button.disabled = false;
    if (err.status === 429 && err.retryAfter) {
      showError(`${err.message}（${err.retryAfter} 秒后可重试）`);
      cooldown(err.retryAfter);
    } else {
      handleError(err);
    }
  }
}

async function login(event) {
  event.preventDefault();
  clearMessages();
  const button = $("#login-btn");
  button.disabled = true;
  try {
    const body = { ...loginFields(), verify_code: $("#code").value.trim() };
    const data = await getJson(state.loginBase, "/login", { method: "POST", body });
    state.token = data.access_token;
    state.user = data.user;
    localStorage.setItem(TOKEN_KEY, state.token);
    localStorage.setItem(USER_KEY, JSON.stringify(state.user));
    go(location.hash.startsWith("#/chat/") ? location.hash : "#/roles");
  } catch (err) {
    handleError(err);
  } finally {
    button.disabled = false;
  }
}

function logout() {
  abortStream();
  state.token = null;
  state.user = null;
  state.role = null;
  localStorage.removeItem(TOKEN_KEY);
  localStorage.removeItem(USER_KEY);
  clearMessages();
  history.replaceState(null, "", location.pathname + location.search);
  showView("login");
}

// ---- roles ----

// A stand-in picture (the name's first character) for an avatar that cannot be loaded.
function fallbackAvatar(name) {
  const initial = (Array.from(name || "?")[0] || "?").replace(/[&<>]/g, (c) => `&#${c.charCodeAt(0)};`);
  const svg = `<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 96 96"><rect width="96" height="96" rx="48" fill="#f6d7e3"/><text x="48" y="63" font-size="42" text-anchor="middle" fill="#8a3b5c">${initial}</text></svg>`;
  return `data:image/svg+xml;charset=utf-8,${encodeURIComponent(svg)}`;
}

function setAvatar(img, url, name) {
  img.alt = name;
  img.onerror = () => {
    img.onerror = null;
    img.src = fallbackAvatar(name);
  };
  img.src = url || fallbackAvatar(name);
}

async function loadRoles() {
  try {
    state.roles = (await getJson(state.chatBase, "/chat/roles")).roles || [];
  } catch (err) {
    handleError(err);
    state.roles = [];
  }
  const list = $("#role-list");
  list.replaceChildren();
  for (const role of state.roles) {
    const item = document.createElement("li");
    const card = document.createElement("button");
    card.type = "button";
    card.className = "role-card";
    card.dataset.role = role.role_code;
    const text = document.createElement("span");
    text.className = "role-text";
    const name = document.createElement("strong");
    name.textContent = role.nickname;
    const intro = document.createElement("span");
    intro.className = "muted small";
    intro.textContent = role.intro;
    text.append(name, intro);
    const img = document.createElement("img");
    img.className = "avatar";
    setAvatar(img, role.avatar_url, role.nickname);
    card.append(img, text);
    card.addEventListener("click", () => go(`#/chat/${role.role_code}`));
    item.append(card);
    list.append(item);
  }
}

// ---- conversation ----

async function openChat(role) {
  state.role = role;
  clearMessages();
  $("#chat-bg").style.backgroundImage = role.background_url ? `url(${JSON.stringify(role.background_url)})` : "";
  setAvatar($("#chat-avatar"), role.avatar_url, role.nickname);
  $("#chat-name").textContent = role.nickname;
  $("#messages").dataset.role = role.role_code;
  $("#messages").setAttribute("aria-busy", "true");
  showView("chat");
  renderMessages([]);
  await refreshHistory();
  $("#message").focus();
}

function bubble(sender, content, { hasImage = false, partial = false, opening = false, time = "" } = {}) {
  const el = document.createElement("div");
  el.className = `bubble ${sender}`;
  if (opening) el.classList.add("opening");
  if (time) el.title = time.replace("T", " ");
  if (hasImage) el.append(tag("[图片]", "image-tag"));
  const text = document.createElement("span");
  text.className = "text";
  text.textContent = content;
  el.append(text);
  if (partial) el.append(tag("（未完成）", "partial-tag"));
  return el;
}

function tag(text, className) {
  const el = document.createElement("span");
  el.className = `tag ${className}`;
  el.textContent = text;
  return el;
}

function addBubble(el) {
  const box = $("#messages");
  box.append(el);
  box.scrollTop = box.scrollHeight;
  return el;
}

function renderMessages(messages) {
  $("#messages").replaceChildren(bubble("assistant", state.role.opening_message, { opening: true }));
  for (const m of messages) {
    const sender = m.sender_role === "user" ? "user" : "assistant";
    addBubble(bubble(sender, m.content, { hasImage: m.has_image, partial: m.is_partial, time: m.created_at }));
  }
}

async function refreshHistory() {
  const role = state.role;
  const box = $("#messages");
  box.setAttribute("aria-busy", "true");
  try {
    const path = `/chat/history?role_code=${encodeURIComponent(role.role_code)}`;
    const data = await getJson(state.chatBase, path, { auth: true });
    if (state.role === role) renderMessages(data.messages || []);
  } catch (err) {
    handleError(err);
  } finally {
    if (state.role === role || !state.role) box.setAttribute("aria-busy", "false");
  }
}

function abortStream() {
  state.stream?.abort();
  state.stream = null;
}

function setStreaming(on) {
  $("#send-btn").disabled = on;
  $("#clear-btn").disabled = on;
  $("#composer").classList.toggle("busy", on);
}

async function send(event) {
  event?.preventDefault();
  const text = $("#message").value.trim();
  const image = state.image;
  if (state.stream || !state.role || (!text && !image)) return;
  clearMessages();
  const body = { role_code: state.role.role_code };
  if (text) body.message = text;
  if (image) Object.assign(body, { image_base64: image.base64, image_mime_type: image.type });

  const controller = new AbortController();
  state.stream = controller;
  setStreaming(true);
  addBubble(bubble("user", text, { hasImage: Boolean(image) }));
  const reply = addBubble(bubble("assistant", ""));
  reply.classList.add("streaming");
  try {
    const res = await request(state.chatBase, "/chat/stream", { method: "POST", body, auth: true, signal: controller.signal });
    $("#message").value = "";
    removePhoto();
    await readStream(res, reply);
  } catch (err) {
    reply.remove();
    handleError(err);
  } finally {
    if (state.stream === controller) state.stream = null;
    if (!state.stream) setStreaming(false);
  }
  // The server stored what was said; show its record (flow step 6).
  if (state.token && !controller.signal.aborted) await refreshHistory();
}

// Reads `data: <json>\n\n` events, appending choices[0].delta.content until `data: [DONE]`.
async function readStream(res, reply) {
  const reader = res.body.getReader();
  const decoder = new TextDecoder();
  const textEl = reply.querySelector(".text");
  let buffer = "";
  let done = false;
  try {
    while (!done) {
      const chunk = await reader.read();
      if (chunk.done) break;
      buffer += decoder.decode(chunk.value, { stream: true }).replace(/\r/g, "");
      let end;
      while (!done && (end = buffer.indexOf("\n\n")) >= 0) {
        const event = buffer.slice(0, end);
        buffer = buffer.slice(end + 2);
        const data = event.split("\n").filter((l) => l.startsWith("data:")).map((l) => l.slice(5).trimStart()).join("\n");
        if (data === "[DONE]") done = true;
        else if (data) applyFrame(readJson(data), reply, textEl);
      }
    }
  } catch (err) {
    if (err.name === "AbortError") throw err;
  } finally {
    reader.cancel().catch(() => {});
  }
  reply.classList.remove("streaming");
  if (!done) {
    reply.classList.add("failed");
    showError("连接中断，回复可能不完整");
  }
}

function applyFrame(frame, reply, textEl) {
  if (!frame) return;
  const content = frame.choices?.[0]?.delta?.content;
  if (typeof content === "string" && content) {
    textEl.textContent += content;
    const box = $("#messages");
    box.scrollTop = box.scrollHeight;
  }
  if (frame.error) {
    reply.classList.add("failed");
    showError(frame.error.message || "回复中断了，请稍后再试");
  }
}

async function clearChat() {
  const role = state.role;
  if (!role || !confirm(`确定清空与「${role.nickname}」的全部聊天记录吗？`)) return;
  clearMessages();
  try {
    const data = await getJson(state.chatBase, "/chat/clear", { method: "POST", body: { role_code: role.role_code }, auth: true });
    showNotice(data.message || "当前聊天已清空");
  } catch (err) {
    handleError(err);
  }
  if (state.token && state.role === role) await refreshHistory();
}

// ---- photo attachment ----

function pickPhoto() {
  const file = $("#photo-input").files[0];
  if (!file) return;
  if (!file.type.startsWith("image/")) {
    removePhoto();
    showError("请选择图片文件");
    return;
  }
  const reader = new FileReader();
  reader.addEventListener("load", () => {
    const url = String(reader.result);
    state.image = { url, type: file.type, base64: url.slice(url.indexOf(",") + 1) };
    $("#photo-thumb").src = url;
    $("#photo-preview").hidden = false;
  });
  reader.addEventListener("error", () => showError("图片读取失败，请重新选择"));
  reader.readAsDataURL(file);
}

function removePhoto() {
  state.image = null;
  $("#photo-input").value = "";
  $("#photo-thumb").removeAttribute("src");
  $("#photo-preview").hidden = true;
}

// ---- wiring ----

function onKeydown(event) {
  // isComposing: Enter that confirms an IME candidate (Chinese input) must not send.
  if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
    event.preventDefault();
    send();
  }
}

async function start() {
  $("#login-form").addEventListener("submit", login);
  $("#send-code-btn").addEventListener("click", sendCode);
  $("#logout-btn").addEventListener("click", logout);
  $("#switch-role-btn").addEventListener("click", () => go("#/roles"));
  $("#clear-btn").addEventListener("click", clearChat);
  $("#composer").addEventListener("submit", send);
  $("#message").addEventListener("keydown", onKeydown);
  $("#photo-input").addEventListener("change", pickPhoto);
  $("#photo-remove").addEventListener("click", removePhoto);
  window.addEventListener("hashchange", route);
  await loadConfig();
  await route();
  document.body.dataset.ready = "true";
}

start();
