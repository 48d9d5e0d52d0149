// Reference web client of the aichat API (contract section 7): login, role picker, streaming chat,
// and each role's conversations (chat-api-v2: /chat/conversations, conversation_id, x_event frames),
// the role's skills (/chat/role/skills, /chat/skill) and the tool progress of a reply (tool.start / tool.end),
// a reply read aloud (/chat/voice), and accounts: password login, registration, refresh tokens, the profile panel.
// Every turn (a message, a skill, 继续: /chat/continue of a reply cut short) carries an Idempotency-Key, the same on
// each resend of it (a renewed token, a network error before any answer, a 409 RequestInProgress).

const $ = (selector) => document.querySelector(selector);
const TOKEN_KEY = "aichat.token";
const REFRESH_KEY = "aichat.refresh";
const USER_KEY = "aichat.user";
const RESEND_SECONDS = 60;
const CONVERSATION_PAGE = 20; // /chat/conversations limit: 1..100
const TITLE_MAX = 100; // a conversation title, after trimming
// Skills the role uses by itself as the chat goes (web search): POST /chat/skill refuses them, so no chip.
const CHAT_ONLY_SKILLS = new Set(["search"]);
// What a skill asks for before it runs (its tool's required arguments); the others take none.
const SKILL_ARGUMENTS = { stargazing: { name: "city", label: "哪个城市？", fallback: "杭州" } };
// A turn's resends of its own (409 RequestInProgress, a network error before any answer), and the longest wait.
const TURN_RETRIES = 3;
const TURN_RETRY_MAX_SECONDS = 30;
const NETWORK_RETRY_SECONDS = 1;

const state = {
  loginBase: "",
  chatBase: "",
  token: localStorage.getItem(TOKEN_KEY),
  user: readJson(localStorage.getItem(USER_KEY)),
  roles: [],
  role: null,
  conversations: [], // the role's conversations as the server lists them (most recently active first)
  nextCursor: null, // next_cursor of the list's last page, null when there is no more
  conversationId: null, // the open conversation; null: the role's default, whose id is not known yet
  notes: new Map(), // reply id ("" for a reply never stored) -> the stream error shown under that reply
  image: null, // {base64, type, url} of the photo waiting to be sent
  stream: null, // AbortController of the reply being streamed
  skills: [], // the open role's skills that can be used directly (GET /chat/role/skills, less the chat-only ones)
  pendingSkill: null, // the skill whose argument is being asked for
  profile: null, // GET /me's user, while the profile panel is open
};

// The reply being read aloud: one <audio> for the page, so one clip plays at a time.
const voice = {
  clips: new Map(), // message id -> blob: URL of its MP3, kept for the page's life
  id: null, // the message whose clip the player holds
  loading: null, // the message whose clip is being fetched (the one asked for last)
  unlocked: false, // the player was started inside a tap once (iOS lets it play later)
  grown: new Set(), // replies continued on this page: their clip is fetched past the HTTP cache (same URL, new text)
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

// One call. With `auth`, an access token the server rejects (401 Unauthorized: expired, or replaced in another
// tab) is renewed once with the refresh token and the call sent again. A 401 answers before the server does
// anything, so even a streaming POST is safe to resend then: its status came before any frame. A stream that
// has started is never sent again (a failure after that is read from the frames, not retried). A turn's `key`
// (Idempotency-Key) goes with every send of it, the renewed one included: the server stores one message for it.
async function request(base, path, { method = "GET", body, auth = false, signal, renew = true, key, cache } = {}) {
  const headers = {};
  if (body !== undefined) headers["Content-Type"] = "application/json";
  const token = auth ? currentToken() : null;
  if (auth) headers.Authorization = `Bearer ${token}`;
  if (key) headers["Idempotency-Key"] = key;
  let res;
  try {
    const init = { method, headers, signal, body: body === undefined ? undefined : JSON.stringify(body) };
    if (cache) init.cache = cache;
    res = await fetch(base + path, init);
  } catch (err) {
    if (err.name === "AbortError") throw err;
    throw new ApiError(0, "NetworkError", "网络异常，请检查网络后重试");
  }
  if (res.ok) return res;
  const err = await errorOf(res);
  if (auth && renew && res.status === 401 && err.code === "Unauthorized" && (await renewToken(token))) {
    if (signal?.aborted) throw new DOMException("The call was aborted", "AbortError");
    return request(base, path, { method, body, auth, signal, renew: false, key, cache });
  }
  throw err;
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

// A fresh idempotency key for one user action: 32 hex digits (the server takes 1–64 of [A-Za-z0-9_-]).
// getRandomValues, not randomUUID: that one exists only in secure contexts (not on http://<LAN address>).
function idempotencyKey() {
  const bytes = crypto.getRandomValues(new Uint8Array(16));
  return Array.from(bytes, (b) => b.toString(16).padStart(2, "0")).join("");
}

// A pause that ends early (AbortError) when the signal aborts.
function pause(seconds, signal) {
  return new Promise((resolve, reject) => {
    const aborted = () => new DOMException("The call was aborted", "AbortError");
    if (signal?.aborted) return reject(aborted());
    const onAbort = () => {
      clearTimeout(timer);
      reject(aborted());
    };
    const timer = setTimeout(() => {
      signal?.removeEventListener("abort", onAbort);
      resolve();
    }, seconds * 1000);
    signal?.addEventListener("abort", onAbort, { once: true });
  });
}

// One turn operation (/chat/stream, /chat/skill, /chat/continue; /chat/regenerate and /chat/edit alike): the
// action's one key on every send. Sent again, with that key, when the server says the same request still runs
// (409 RequestInProgress: after Retry-After) or when no answer came at all (a network error, before any frame):
// a repeat of a request that did finish is answered with its stored reply (x_event.replayed), nothing new.
async function turnRequest(path, body, { key, signal }) {
  for (let attempt = 0; ; attempt += 1) {
    try {
      return await request(state.chatBase, path, { method: "POST", body, auth: true, signal, key });
    } catch (err) {
      if (err.name === "AbortError" || attempt >= TURN_RETRIES) throw err;
      let wait;
      if (err.status === 409 && err.code === "RequestInProgress") {
        wait = Math.min(Math.max(err.retryAfter ?? 2, 1), TURN_RETRY_MAX_SECONDS);
      } else if (err.status === 0 && err.code === "NetworkError") {
        wait = NETWORK_RETRY_SECONDS * (attempt + 1);
      } else {
        throw err;
      }
      await pause(wait, signal);
    }
  }
}

// ---- tokens: the access token, and the refresh token that renews it (rotated on every use) ----

// localStorage is the one copy, shared by the page's tabs: a tab that renewed the tokens renews them for all.
function currentToken() {
  state.token = localStorage.getItem(TOKEN_KEY);
  return state.token;
}

function saveTokens(data) {
  state.token = data.access_token;
  localStorage.setItem(TOKEN_KEY, data.access_token);
  // Always keep the newest refresh token: the one just spent is refused from now on (and ends the session).
  if (typeof data.refresh_token === "string" && data.refresh_token) localStorage.setItem(REFRESH_KEY, data.refresh_token);
}

let renewal = null; // the refresh under way in this page: concurrent 401s wait for the same one

// A call sent with `sentWith` was refused: true when a newer access token is there to send it again with, false
// when the session is over (no refresh token, or the server refused it); network trouble throws.
function renewToken(sentWith) {
  if (!renewal) {
    const run = () => refreshTokens(sentWith);
    // Tabs take turns (the Web Locks API, where there is one): a refresh token is good for one use only.
    renewal = (navigator.locks ? navigator.locks.request("aichat.token-refresh", run) : run()).finally(() => {
      renewal = null;
    });
  }
  return renewal;
}

async function refreshTokens(sentWith) {
  const latest = currentToken();
  if (latest && latest !== sentWith) return true; // renewed meanwhile, here or in another tab
  const refreshToken = localStorage.getItem(REFRESH_KEY);
  if (!latest || !refreshToken) return false;
  try {
    const data = await getJson(state.loginBase, "/token/refresh", { method: "POST", body: { refresh_token: refreshToken } });
    if (typeof data.access_token !== "string" || !data.access_token) return false;
    if (localStorage.getItem(TOKEN_KEY) !== latest) return true; // logged out (or in again) while it ran
    saveTokens(data);
    return true;
  } catch (err) {
    if (err.status === 400 || err.status === 401) return false;
    throw err;
  }
}

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

// Every failed call ends here: a token that could not be renewed sends the user back to the login page.
function handleError(err) {
  if (err.name === "AbortError") return;
  if (err.status === 401 && err.code === "Unauthorized") {
    if (!state.token) return; // logged out already (here, or in another tab)
    logout();
    showError("登录已失效，请重新登录");
    return;
  }
  const text = err.message || "出错了，请稍后再试";
  showError(err.status === 429 && err.retryAfter ? `${text}（${err.retryAfter} 秒后可重试）` : text);
}

// ---- views and routing (#/roles, #/chat/<role_code>, #/me) ----

function showView(name) {
  for (const view of ["login", "roles", "chat", "profile"]) $(`#${view}-view`).hidden = view !== name;
  const loggedIn = Boolean(state.token);
  $("#logout-btn").hidden = !loggedIn;
  $("#profile-btn").hidden = !loggedIn || name === "profile";
  showUserLabel();
  document.body.dataset.view = name;
}

// The nickname, else the phone number, else the username.
function showUserLabel() {
  const user = state.token ? state.user : null;
  let label = "";
  if (user?.nickname) label = user.nickname;
  else if (user?.phone_number) label = `+${user.country_code} ${user.phone_number}`;
  else if (user?.username) label = user.username;
  $("#user-label").textContent = label;
}

function go(hash) {
  if (location.hash === hash) route();
  else location.hash = hash;
}

async function route() {
  abortStream();
  if (!state.token) return showView("login");
  if (location.hash === "#/me") return openProfile();
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
    loggedIn(await getJson(state.loginBase, "/login", { method: "POST", body }));
  } catch (err) {
    handleError(err);
  } finally {
    button.disabled = false;
  }
}

// SMS and password logins answer the same: the tokens and the user ({uid, phone_number, country_code}).
function loggedIn(data) {
  saveTokens(data);
  state.user = data.user || {};
  localStorage.setItem(USER_KEY, JSON.stringify(state.user));
  loadMe(); // the nickname and username for the top bar
  $("#password").value = "";
  go(/^#\/(chat\/|me$)/.test(location.hash) ? location.hash : "#/roles");
}

function passwordLogin(account, password) {
  return getJson(state.loginBase, "/login/password", { method: "POST", body: { account, password } });
}

async function loginWithPassword(event) {
  event.preventDefault();
  clearMessages();
  const account = $("#account").value.trim();
  const password = $("#password").value;
  if (!account) return showError("请输入用户名、邮箱或手机号");
  if (!password) return showError("请输入密码");
  const button = $("#password-login-btn");
  button.disabled = true;
  try {
    loggedIn(await passwordLogin(account, password));
  } catch (err) {
    handleError(err);
  } finally {
    button.disabled = false;
  }
}

// A new account, then logged in with its password at once.
async function register(event) {
  event.preventDefault();
  clearMessages();
  const username = $("#reg-username").value.trim();
  const password = $("#reg-password").value;
  if (!username) return showError("请输入用户名");
  if (!password) return showError("请输入密码");
  const body = { username, password };
  const email = $("#reg-email").value.trim();
  const nickname = $("#reg-nickname").value.trim();
  if (email) body.email = email;
  if (nickname) body.nickname = nickname;
  const button = $("#register-btn");
  button.disabled = true;
  try {
    const data = await getJson(state.loginBase, "/register", { method: "POST", body });
    const registered = data.user?.username || username;
    let session;
    try {
      session = await passwordLogin(registered, password);
    } catch (err) {
      // Registered, but not logged in (throttled, the network): the password tab, with the account filled in.
      showLoginTab("password-form");
      $("#account").value = registered;
      handleError(err);
      return;
    }
    for (const id of ["reg-username", "reg-password", "reg-email", "reg-nickname"]) $(`#${id}`).value = "";
    loggedIn(session);
    showNotice(data.message || "注册成功");
  } catch (err) {
    handleError(err);
  } finally {
    button.disabled = false;
  }
}

function showLoginTab(formId) {
  for (const tab of document.querySelectorAll("#login-tabs [role=tab]")) {
    const selected = tab.dataset.form === formId;
    tab.setAttribute("aria-selected", String(selected));
    tab.tabIndex = selected ? 0 : -1;
    $(`#${tab.dataset.form}`).hidden = !selected;
  }
}

// Arrow keys move between the tabs (the tablist pattern).
function onTabKeydown(event) {
  const tabs = [...document.querySelectorAll("#login-tabs [role=tab]")];
  const at = tabs.indexOf(event.target);
  const step = { ArrowRight: 1, ArrowLeft: -1 }[event.key];
  if (at < 0 || !step) return;
  const next = tabs[(at + step + tabs.length) % tabs.length];
  showLoginTab(next.dataset.form);
  next.focus();
}

// The signed-in user's profile: the top bar's name (the user label).
async function loadMe() {
  try {
    const data = await getJson(state.loginBase, "/me", { auth: true });
    if (data.user && state.token) rememberProfile(data.user);
    return data.user || null;
  } catch (err) {
    if (err.status === 401) handleError(err);
    return null;
  }
}

// The profile fields the top bar uses (the login's own phone fields are kept: /me masks the number).
function rememberProfile(user) {
  state.user = { ...state.user, uid: user.uid, username: user.username, nickname: user.nickname };
  if (!state.user.phone_number && user.phone_number) {
    Object.assign(state.user, { phone_number: user.phone_number, country_code: user.country_code });
  }
  localStorage.setItem(USER_KEY, JSON.stringify(state.user));
  showUserLabel();
}

// Forgets the tokens here (the server side ends with signOut).
function logout() {
  abortStream();
  stopVoice({ forget: true });
  state.token = null;
  state.user = null;
  state.role = null;
  state.profile = null;
  resetConversations();
  closeDrawer();
  localStorage.removeItem(TOKEN_KEY);
  localStorage.removeItem(REFRESH_KEY);
  localStorage.removeItem(USER_KEY);
  clearMessages();
  history.replaceState(null, "", location.pathname + location.search);
  showView("login");
}

// 退出登录: this session ends on the server (its refresh token too), then here, even if the call failed.
async function signOut() {
  if (state.token) {
    try {
      await request(state.loginBase, "/logout", { method: "POST", auth: true });
    } catch {
      // Offline or already ended: the tokens are forgotten here all the same.
    }
  }
  logout();
}

// 退出所有设备: every session of the user ends; this one only once the server said so.
async function signOutEverywhere() {
  if (!confirm("确定在所有设备上退出登录吗？")) return;
  clearMessages();
  const button = $("#logout-all");
  button.disabled = true;
  try {
    const data = await getJson(state.loginBase, "/logout/all", { method: "POST", auth: true });
    logout();
    showNotice(data.message || "已在所有设备退出登录");
  } catch (err) {
    handleError(err);
  } finally {
    button.disabled = false;
  }
}

// ---- the profile panel (#/me): GET /me, /me/update, /password/set, the sessions ----

async function openProfile() {
  state.role = null;
  resetConversations();
  closeDrawer();
  clearMessages();
  showView("profile");
  $("#profile-card").setAttribute("aria-busy", "true");
  await Promise.all([loadProfile(), loadSessions()]);
}

async function loadProfile() {
  const user = await loadMe();
  if (!user || location.hash !== "#/me") return;
  renderProfile(user);
}

function renderProfile(user) {
  state.profile = user;
  const name = user.nickname || user.username || (user.phone_number ? `+${user.country_code} ${user.phone_number}` : "我");
  setAvatar($("#me-avatar"), user.avatar_url, name);
  $("#me-name").textContent = name;
  $("#me-account").textContent = user.username ? `@${user.username}` : "";
  const facts = [
    ["用户名", user.username],
    ["手机号", user.phone_number ? `+${user.country_code} ${user.phone_number}` : ""],
    ["邮箱", user.email],
    ["注册时间", (user.created_at || "").replace("T", " ")],
    ["简介", user.bio],
  ];
  const list = $("#me-facts");
  list.replaceChildren();
  for (const [label, value] of facts) {
    const term = document.createElement("dt");
    term.textContent = label;
    const detail = document.createElement("dd");
    detail.textContent = value || "未设置";
    if (!value) detail.className = "muted";
    list.append(term, detail);
  }
  $("#nickname").value = user.nickname || "";
  $("#avatar-url").value = user.avatar_url || "";
  $("#bio").value = user.bio || "";
  const hasPassword = Boolean(user.has_password);
  $("#password-set-title").textContent = hasPassword ? "修改密码" : "设置密码";
  $("#password-set-btn").textContent = hasPassword ? "修改密码" : "设置密码";
  $("#current-password-row").hidden = !hasPassword;
  $("#password-set-hint").textContent = hasPassword
    ? "修改后，其他设备上的登录会失效。"
    : "设置后，也可以用用户名或手机号加密码登录。";
  $("#pw-username").value = user.username || user.phone_number || "";
  $("#profile-card").setAttribute("aria-busy", "false");
}

// Only the fields that changed are sent; an emptied one is sent as null (cleared).
async function saveProfile(event) {
  event.preventDefault();
  const user = state.profile;
  if (!user) return;
  clearMessages();
  const body = {};
  for (const [field, input] of [["nickname", "#nickname"], ["avatar_url", "#avatar-url"], ["bio", "#bio"]]) {
    const value = $(input).value.trim();
    if (value !== (user[field] || "")) body[field] = value || null;
  }
  if (!Object.keys(body).length) return showNotice("资料没有变化");
  const button = $("#profile-save");
  button.disabled = true;
  try {
    const data = await getJson(state.loginBase, "/me/update", { method: "POST", body, auth: true });
    if (data.user) {
      rememberProfile(data.user);
      renderProfile(data.user);
    }
    showNotice("资料已保存");
  } catch (err) {
    handleError(err);
  } finally {
    button.disabled = false;
  }
}

async function setPassword(event) {
  event.preventDefault();
  const user = state.profile;
  if (!user) return;
  clearMessages();
  const body = { new_password: $("#new-password").value };
  if (!body.new_password) return showError("请输入新密码");
  if (user.has_password) {
    body.current_password = $("#current-password").value;
    if (!body.current_password) return showError("请输入当前密码");
  }
  const button = $("#password-set-btn");
  button.disabled = true;
  try {
    // A wrong current password is 401 InvalidCredentials: an error to show, not the end of the login.
    const data = await getJson(state.loginBase, "/password/set", { method: "POST", body, auth: true });
    $("#current-password").value = "";
    $("#new-password").value = "";
    await Promise.all([loadProfile(), loadSessions()]); // has_password now; a change ended the other sessions
    showNotice(data.message || "密码已设置");
  } catch (err) {
    handleError(err);
  } finally {
    button.disabled = false;
  }
}

async function loadSessions() {
  const list = $("#session-list");
  list.setAttribute("aria-busy", "true");
  try {
    const data = await getJson(state.loginBase, "/sessions", { auth: true });
    if (location.hash === "#/me") renderSessions(Array.isArray(data.sessions) ? data.sessions : []);
  } catch (err) {
    handleError(err);
  } finally {
    list.setAttribute("aria-busy", "false");
  }
}

// "Mozilla/5.0 (…; Android 14; …) … Chrome/126.0 Mobile Safari/537.36" -> "Chrome · Android"
function deviceOf(userAgent) {
  const ua = userAgent || "";
  const browser = [
    [/Edg\//, "Edge"],
    [/MicroMessenger/, "微信"],
    [/Firefox\//, "Firefox"],
    [/Chrome\/|CriOS\//, "Chrome"],
    [/Safari\//, "Safari"],
    [/okhttp|Dart|python-requests|curl/i, "应用"],
  ].find(([pattern]) => pattern.test(ua))?.[1];
  const system = [
    [/iPhone|iPad|iOS/, "iOS"],
    [/Android/, "Android"],
    [/Mac OS X|Macintosh/, "macOS"],
    [/Windows/, "Windows"],
    [/Linux/, "Linux"],
  ].find(([pattern]) => pattern.test(ua))?.[1];
  return [browser, system].filter(Boolean).join(" · ") || (ua ? ua.slice(0, 40) : "未知设备");
}

function renderSessions(sessions) {
  const list = $("#session-list");
  list.replaceChildren();
  for (const session of sessions) {
    const item = document.createElement("li");
    item.className = "session-item";
    item.dataset.id = session.session_id;
    if (session.current) item.dataset.current = "true";
    const text = document.createElement("span");
    text.className = "session-text";
    const device = document.createElement("span");
    device.className = "session-device";
    device.textContent = deviceOf(session.user_agent);
    if (session.user_agent) device.title = session.user_agent;
    if (session.current) device.append(tag("本机", "current-tag"));
    const meta = document.createElement("span");
    meta.className = "session-meta muted small";
    meta.textContent = [session.client_ip, `最近使用 ${shortTime(session.last_used_at)}`, `登录于 ${shortTime(session.created_at)}`]
      .filter(Boolean)
      .join(" · ");
    text.append(device, meta);
    item.append(text);
    if (!session.current) {
      const end = document.createElement("button");
      end.type = "button";
      end.className = "link small danger session-end";
      end.textContent = "结束";
      end.setAttribute("aria-label", `结束 ${device.textContent} 上的登录`);
      end.addEventListener("click", () => endSession(session, end));
      item.append(end);
    }
    list.append(item);
  }
  if (!sessions.length) {
    const empty = document.createElement("li");
    empty.className = "muted small";
    empty.textContent = "没有其他登录";
    list.append(empty);
  }
}

async function endSession(session, button) {
  clearMessages();
  button.disabled = true;
  try {
    const data = await getJson(state.loginBase, "/session/revoke", { method: "POST", body: { session_id: session.session_id }, auth: true });
    showNotice(data.message || "会话已结束");
  } catch (err) {
    handleError(err);
  }
  if (state.token) await loadSessions(); // ended, or gone already (404 SessionNotFound): the list as it is now
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
  resetConversations();
  closeDrawer();
  clearMessages();
  $("#chat-bg").style.backgroundImage = role.background_url ? `url(${JSON.stringify(role.background_url)})` : "";
  setAvatar($("#chat-avatar"), role.avatar_url, role.nickname);
  $("#chat-name").textContent = role.nickname;
  $("#messages").dataset.role = role.role_code;
  $("#messages").setAttribute("aria-busy", "true");
  showView("chat");
  renderMessages([]);
  renderConversations();
  state.skills = [];
  closeSkillForm();
  renderSkills();
  loadSkills(role); // in parallel with the history: the chips are extra, the chat works without them
  await openDefault();
  if (state.role === role) $("#message").focus();
}

function bubble(sender, content, { id = null, hasImage = false, partial = false, opening = false, time = "" } = {}) {
  const el = document.createElement("div");
  el.className = `bubble ${sender}`;
  if (opening) el.classList.add("opening");
  if (id != null) el.dataset.id = id;
  if (time) el.title = time.replace("T", " ");
  if (hasImage) el.append(tag("[图片]", "image-tag"));
  const text = document.createElement("span");
  text.className = "text";
  text.textContent = content;
  el.append(text);
  if (partial) el.append(tag("（未完成）", "partial-tag"));
  // A stored reply with something to say can be read aloud.
  if (sender === "assistant" && id != null && !opening && String(content ?? "").trim()) el.append(voiceButton(id));
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
  const box = $("#messages");
  box.replaceChildren(bubble("assistant", state.role.opening_message, { opening: true }));
  for (const m of messages) {
    const sender = m.sender_role === "user" ? "user" : "assistant";
    addBubble(bubble(sender, m.content, { id: m.id, hasImage: m.has_image, partial: m.is_partial, time: m.created_at }));
    // What the reply was built on (include_tools=1): the finished tool lines, as they ended while streaming.
    if (sender === "assistant" && Array.isArray(m.tools) && m.tools.length) {
      const trace = toolTrace();
      for (const call of m.tools) {
        if (!call || typeof call !== "object") continue;
        const line = toolLine(call.tool_call_id, call.name);
        trace.append(line);
        if (typeof call.ok === "boolean") endToolLine(line, call);
        else stopToolLine(line, call.display);
      }
      if (trace.childElementCount) addBubble(trace);
    }
  }
  // The conversation's last message, a reply cut short: 继续 (/chat/continue) lets the role finish it.
  const last = messages[messages.length - 1];
  if (last && last.sender_role !== "user" && last.is_partial && last.id != null) {
    box.querySelector(`.bubble[data-id="${CSS.escape(String(last.id))}"]`)?.append(continueButton(last.id));
  }
  // A stream error stays under its reply when the history is shown again.
  const bubbles = box.querySelectorAll(".bubble");
  for (const [id, text] of state.notes) {
    const target = (id && box.querySelector(`.bubble[data-id="${CSS.escape(id)}"]`)) || bubbles[bubbles.length - 1];
    addNote(target, text);
  }
}

// ---- tool progress under a reply (x_event tool.start / tool.end; the history's `tools`) ----

function toolTrace() {
  const trace = document.createElement("ul");
  trace.className = "tool-trace";
  trace.setAttribute("aria-label", "工具调用");
  return trace;
}

// One line per tool call: an icon (a spinner while it runs, then ✓ or ✗) and the server's display text.
function toolLine(callId, name) {
  const line = document.createElement("li");
  line.className = "tool-line";
  if (typeof callId === "string" && callId) line.dataset.callId = callId;
  if (typeof name === "string" && name) line.dataset.name = name;
  const icon = document.createElement("span");
  icon.className = "tool-icon";
  icon.setAttribute("aria-hidden", "true");
  const display = document.createElement("span");
  display.className = "tool-display";
  display.textContent = typeof name === "string" && name ? name : "工具";
  line.append(icon, display);
  return line;
}

function setToolLine(line, status, text, title = "") {
  line.classList.remove("running", "ok", "failed", "stopped");
  line.classList.add(status);
  line.querySelector(".tool-icon").textContent = { running: "", ok: "✓", failed: "✗", stopped: "–" }[status];
  if (typeof text === "string" && text) line.querySelector(".tool-display").textContent = text;
  if (title) line.title = title;
  else line.removeAttribute("title");
}

function startToolLine(line, display) {
  setToolLine(line, "running", display, "进行中");
}

function endToolLine(line, { ok, display, ms }) {
  const took = Number.isFinite(ms) ? `，用时 ${ms} ms` : "";
  setToolLine(line, ok === false ? "failed" : "ok", display, `${ok === false ? "失败" : "完成"}${took}`);
}

// A call whose end never came (the stream broke off): no spinner left running.
function stopToolLine(line, display) {
  setToolLine(line, "stopped", display, "未完成");
}

// The reply's line of this call, made (with its list, right under the bubble) on the call's first event.
function liveToolLine(turn, event) {
  const id = typeof event.tool_call_id === "string" ? event.tool_call_id : "";
  let line = id ? turn.tools.get(id) : null;
  if (!line) {
    if (!turn.trace || !turn.trace.isConnected) {
      turn.trace = toolTrace();
      turn.reply.after(turn.trace);
    }
    line = toolLine(id, event.name);
    turn.trace.append(line);
    if (id) turn.tools.set(id, line);
  }
  return line;
}

// A small notice right under a reply bubble.
function addNote(target, text) {
  const note = document.createElement("div");
  note.className = "reply-note";
  note.setAttribute("role", "status");
  note.textContent = text;
  target.after(note);
  const box = $("#messages");
  box.scrollTop = box.scrollHeight;
}

// The open conversation's messages: by conversation_id, or the role's default by role_code until its id is known.
async function refreshHistory() {
  const role = state.role;
  const id = state.conversationId;
  const current = () => state.role === role && state.conversationId === id;
  const box = $("#messages");
  box.setAttribute("aria-busy", "true");
  try {
    const query = id ? `conversation_id=${encodeURIComponent(id)}` : `role_code=${encodeURIComponent(role.role_code)}`;
    const data = await getJson(state.chatBase, `/chat/history?${query}&include_tools=1`, { auth: true });
    if (current()) renderMessages(data.messages || []);
  } catch (err) {
    handleError(err);
    // Deleted elsewhere (or never this user's): fall back to the role's default conversation.
    if (id && current() && err.code === "ConversationNotFound") {
      state.conversationId = null;
      state.notes.clear();
      await openDefault();
    }
  } finally {
    if (current() || !state.role) box.setAttribute("aria-busy", "false");
  }
}

// ---- the role's conversations (drawer; a sidebar on wide screens) ----

function resetConversations() {
  state.conversations = [];
  state.nextCursor = null;
  state.conversationId = null;
  state.notes.clear();
}

function titleOf(conversation) {
  if (!conversation) return "默认对话";
  return conversation.title || (conversation.is_default ? "默认对话" : "新对话");
}

function currentConversation() {
  return state.conversations.find((c) => c.conversation_id === state.conversationId) || null;
}

// "2026-03-22T15:20:25" -> "03-22 15:20"
function shortTime(time) {
  return time ? time.slice(5, 16).replace("T", " ") : "";
}

// The list's first pages again (as many as are shown, within the server's limit), in the server's order.
async function loadConversations({ more = false } = {}) {
  const role = state.role;
  if (!role) return;
  const shown = Math.max(CONVERSATION_PAGE, state.conversations.length);
  const params = new URLSearchParams({ role_code: role.role_code, limit: String(more ? CONVERSATION_PAGE : Math.min(100, shown)) });
  if (more) {
    if (!state.nextCursor) return;
    params.set("cursor", state.nextCursor);
  }
  const list = $("#conv-list");
  list.setAttribute("aria-busy", "true");
  try {
    const data = await getJson(state.chatBase, `/chat/conversations?${params}`, { auth: true });
    if (state.role !== role) return;
    const page = data.conversations || [];
    if (more) {
      const known = new Set(state.conversations.map((c) => c.conversation_id));
      state.conversations.push(...page.filter((c) => !known.has(c.conversation_id)));
    } else {
      state.conversations = page;
    }
    state.nextCursor = data.has_more ? data.next_cursor || null : null;
  } catch (err) {
    handleError(err);
  } finally {
    if (state.role === role) {
      list.setAttribute("aria-busy", "false");
      renderConversations();
    }
  }
}

// Opens the role's default conversation (is_default), or the role's history by role_code if it is not listed.
async function openDefault() {
  const role = state.role;
  await loadConversations();
  if (state.role !== role) return;
  state.conversationId = state.conversations.find((c) => c.is_default)?.conversation_id ?? null;
  renderConversations();
  await refreshHistory();
}

function renderConversations() {
  const list = $("#conv-list");
  list.replaceChildren();
  const shown = [...state.conversations];
  // The default conversation only exists once something was said in it; until then, a placeholder (id null).
  if (!state.nextCursor && !shown.some((c) => c.is_default)) {
    shown.push({ conversation_id: null, is_default: true, title: "", message_count: 0, last_message_at: null, created_at: null });
  }
  for (const c of shown) {
    const item = document.createElement("li");
    item.className = "conv-item";
    if (c.conversation_id) item.dataset.id = c.conversation_id;
    if (c.is_default) item.dataset.default = "true";
    const open = document.createElement("button");
    open.type = "button";
    open.className = "conv-open";
    if (c.conversation_id === state.conversationId) {
      item.classList.add("current");
      open.setAttribute("aria-current", "true");
    }
    const title = document.createElement("span");
    title.className = "conv-title";
    title.textContent = titleOf(c);
    const meta = document.createElement("span");
    meta.className = "conv-meta muted small";
    meta.textContent = [c.is_default ? "默认" : "", `${c.message_count ?? 0} 条`, shortTime(c.last_message_at || c.created_at)]
      .filter(Boolean)
      .join(" · ");
    open.append(title, meta);
    open.addEventListener("click", () => switchConversation(c.conversation_id));
    item.append(open);
    if (c.conversation_id) {
      const rename = document.createElement("button");
      rename.type = "button";
      rename.className = "link small conv-rename";
      rename.textContent = "重命名";
      rename.addEventListener("click", () => renameConversation(c));
      item.append(rename);
    }
    // The default conversation is the role's own history: 清空聊天 empties it, it is not deleted.
    if (c.conversation_id && !c.is_default) {
      const remove = document.createElement("button");
      remove.type = "button";
      remove.className = "link small danger conv-delete";
      remove.textContent = "删除";
      remove.addEventListener("click", () => deleteConversation(c));
      item.append(remove);
    }
    list.append(item);
  }
  $("#conv-more").hidden = !state.nextCursor;
  const conversation = currentConversation();
  if (conversation || !state.conversationId) $("#chat-title").textContent = titleOf(conversation);
}

function openDrawer() {
  $("#chat-view").classList.add("drawer-open");
  $("#conv-btn").setAttribute("aria-expanded", "true");
}

function closeDrawer() {
  $("#chat-view").classList.remove("drawer-open");
  $("#conv-btn").setAttribute("aria-expanded", "false");
}

async function switchConversation(id) {
  closeDrawer();
  if (!state.role || id === state.conversationId) return;
  abortStream();
  clearMessages();
  state.conversationId = id;
  state.notes.clear();
  renderConversations();
  renderMessages([]);
  await refreshHistory();
  $("#message").focus();
}

async function newConversation() {
  const role = state.role;
  if (!role) return;
  clearMessages();
  const button = $("#new-conv-btn");
  button.disabled = true;
  try {
    const body = { role_code: role.role_code };
    const { conversation } = await getJson(state.chatBase, "/chat/conversations", { method: "POST", body, auth: true });
    if (state.role !== role) return;
    state.conversations = [conversation, ...state.conversations.filter((c) => c.conversation_id !== conversation.conversation_id)];
    await switchConversation(conversation.conversation_id);
    await loadConversations();
  } catch (err) {
    handleError(err);
  } finally {
    button.disabled = false;
  }
}

async function renameConversation(conversation) {
  const input = prompt("给这个对话起个名字", conversation.title || "");
  if (input === null) return;
  const title = input.trim();
  clearMessages();
  if (Array.from(title).length > TITLE_MAX) return showError(`标题最多 ${TITLE_MAX} 个字`);
  try {
    const body = { conversation_id: conversation.conversation_id, title };
    const data = await getJson(state.chatBase, "/chat/conversation/update", { method: "POST", body, auth: true });
    const updated = data.conversation;
    state.conversations = state.conversations.map((c) => (c.conversation_id === updated.conversation_id ? updated : c));
    renderConversations();
  } catch (err) {
    handleError(err);
    if (err.code === "ConversationNotFound") await loadConversations();
  }
}

async function deleteConversation(conversation) {
  if (!confirm(`确定删除对话「${titleOf(conversation)}」吗？其中的聊天记录会一并删除。`)) return;
  clearMessages();
  const id = conversation.conversation_id;
  try {
    const data = await getJson(state.chatBase, "/chat/conversation/delete", { method: "POST", body: { conversation_id: id }, auth: true });
    showNotice(data.message || "会话已删除");
  } catch (err) {
    handleError(err);
    if (err.code !== "ConversationNotFound") return;
  }
  state.conversations = state.conversations.filter((c) => c.conversation_id !== id);
  if (id !== state.conversationId) return loadConversations();
  abortStream();
  state.conversationId = null;
  state.notes.clear();
  await openDefault();
}

function abortStream() {
  state.stream?.abort();
  state.stream = null;
}

function setStreaming(on) {
  $("#send-btn").disabled = on;
  $("#clear-btn").disabled = on;
  $("#skill-go").disabled = on;
  for (const chip of document.querySelectorAll(".skill-chip")) chip.disabled = on;
  for (const button of document.querySelectorAll(".continue-btn")) button.disabled = on;
  $("#composer").classList.toggle("busy", on);
}

async function send(event) {
  event?.preventDefault();
  const text = $("#message").value.trim();
  const image = state.image;
  if (state.stream || !state.role || (!text && !image)) return;
  const body = { role_code: state.role.role_code };
  if (state.conversationId) body.conversation_id = state.conversationId;
  if (text) body.message = text;
  if (image) Object.assign(body, { image_base64: image.base64, image_mime_type: image.type });
  const accepted = () => {
    $("#message").value = "";
    removePhoto();
  };
  await streamTurn("/chat/stream", body, { text, hasImage: Boolean(image), accepted });
}

// One streamed turn (/chat/stream or /chat/skill, the same SSE): the user's bubble, the reply growing under it
// with its tool lines, then the stored record read back.
async function streamTurn(path, body, { text, hasImage = false, accepted = () => {} }) {
  clearMessages();
  const turn = {
    user: addBubble(bubble("user", text, { hasImage })),
    reply: addBubble(bubble("assistant", "")),
    trace: null, // the reply's tool lines, made on the first tool event
    tools: new Map(), // tool_call_id -> its line
    prefix: null, // a continued reply's text before this turn (null: a new reply)
  };
  await runTurn(path, body, turn, {
    accepted,
    failed: () => {
      turn.reply.remove();
      turn.trace?.remove();
    },
  });
}

// 继续 under the conversation's last reply when it was cut short (is_partial).
function continueButton(id) {
  const button = document.createElement("button");
  button.type = "button";
  button.className = "continue-btn";
  button.textContent = "继续";
  button.title = "让角色接着说完这条回复";
  button.disabled = Boolean(state.stream);
  button.addEventListener("click", () => continueReply(id));
  return button;
}

// POST /chat/continue: only the new text streams, appended to the same bubble (no new bubble, no user message);
// the stored reply grows in place, and the history read after [DONE] shows it whole.
async function continueReply(id) {
  if (state.stream || !state.role) return;
  const reply = $(`#messages .bubble.assistant[data-id="${CSS.escape(String(id))}"]`);
  if (!reply) return;
  clearMessages();
  const textEl = reply.querySelector(".text");
  const turn = { user: null, reply, trace: null, tools: new Map(), prefix: textEl.textContent, replayed: null };
  for (const el of reply.querySelectorAll(".continue-btn, .partial-tag")) el.remove();
  reply.classList.remove("failed");
  forgetClip(String(id)); // its clip (if one was fetched) says the old text
  await runTurn("/chat/continue", { message_id: id }, turn, {
    // Accepted: the error shown under the cut reply is over.
    accepted: () => {
      state.notes.delete(String(id));
      while (reply.nextElementSibling?.classList.contains("reply-note")) reply.nextElementSibling.remove();
    },
  });
}

// The streaming part every turn shares: one idempotency key for this user action (the same on every resend of
// it), the reply's frames, then the stored records and the conversation list read back (a first message sets the
// title). `accepted` runs when the server took the turn; `failed` when it refused it (or the stream was left).
async function runTurn(path, body, turn, { accepted = () => {}, failed = () => {} } = {}) {
  const controller = new AbortController();
  state.stream = controller;
  setStreaming(true);
  turn.reply.classList.add("streaming");
  const key = idempotencyKey();
  try {
    const res = await turnRequest(path, body, { key, signal: controller.signal });
    accepted();
    await readStream(res, turn);
  } catch (err) {
    turn.reply.classList.remove("streaming");
    failed();
    handleError(err);
  } finally {
    if (state.stream === controller) state.stream = null;
    if (!state.stream) setStreaming(false);
  }
  // The server stored what was said; show its record (flow step 6).
  if (state.token && !controller.signal.aborted) await Promise.all([refreshHistory(), loadConversations()]);
}

// Reads `data: <json>\n\n` events, appending choices[0].delta.content until `data: [DONE]`.
async function readStream(res, turn) {
  const { reply } = turn;
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
        else if (data) applyFrame(readJson(data), turn, textEl);
      }
    }
  } catch (err) {
    if (err.name === "AbortError") throw err;
  } finally {
    reader.cancel().catch(() => {});
  }
  reply.classList.remove("streaming");
  for (const line of turn.trace?.querySelectorAll(".tool-line.running") || []) stopToolLine(line);
  if (!done) {
    reply.classList.add("failed");
    showError("连接中断，回复可能不完整");
  }
}

// The text is choices[0].delta.content of every frame; x_event says what the server did (stream.meta, tool.start,
// tool.end, done, error; any other type is ignored).
function applyFrame(frame, turn, textEl) {
  if (!frame) return;
  const event = frame.x_event && typeof frame.x_event === "object" ? frame.x_event : {};
  // A repeat of a finished turn (its key seen before) is its stored outcome: drawn like any other stream.
  if (event.type === "stream.meta" && event.replayed === true && turn.prefix != null) turn.replayed = "";
  const content = frame.choices?.[0]?.delta?.content;
  if (typeof content === "string" && content) {
    if (turn.replayed != null) {
      turn.replayed += content;
      textEl.textContent = replayedText(turn.prefix, turn.replayed);
    } else {
      textEl.textContent += content;
    }
    const box = $("#messages");
    box.scrollTop = box.scrollHeight;
  }
  if (event.type === "stream.meta") {
    // A continuation has no user message (its meta names the reply it continues).
    if (event.message_id != null && turn.user) turn.user.dataset.id = event.message_id;
    // The role's default conversation, sent to by role_code before its id was known.
    if (!state.conversationId && typeof event.conversation_id === "string" && event.conversation_id) {
      state.conversationId = event.conversation_id;
    }
  } else if (event.type === "tool.start") {
    const line = liveToolLine(turn, event);
    startToolLine(line, typeof event.display === "string" && event.display ? event.display : `正在使用 ${event.name || "工具"}…`);
    const box = $("#messages");
    box.scrollTop = box.scrollHeight;
  } else if (event.type === "tool.end") {
    endToolLine(liveToolLine(turn, event), event);
  } else if (event.type === "done") {
    if (event.message_id != null) {
      turn.reply.dataset.id = event.message_id;
      if (textEl.textContent.trim() && !turn.reply.querySelector(".voice-btn")) turn.reply.append(voiceButton(event.message_id));
    }
  }
  const failure = event.type === "error" ? event : frame.error;
  if (failure) {
    // The fallback frame's text is "": the error's message goes under the bubble, and stays there.
    const text = failure.message || "回复中断了，请稍后再试";
    const id = event.type === "error" && event.message_id != null ? String(event.message_id) : "";
    if (id) turn.reply.dataset.id = id;
    turn.reply.classList.add("failed");
    state.notes.set(id, text);
    addNote(turn.reply, text);
  }
}

// A replayed continuation answers only what that continuation added (the server keeps where the reply was cut);
// should a server answer the whole stored reply instead, it is shown whole: never the cut part twice.
function replayedText(prefix, replayed) {
  if (replayed.startsWith(prefix)) return replayed;
  if (prefix.startsWith(replayed)) return prefix;
  return prefix + replayed;
}

async function clearChat() {
  const role = state.role;
  const id = state.conversationId;
  if (!role || !confirm(`确定清空与「${role.nickname}」在「${titleOf(currentConversation())}」中的全部聊天记录吗？`)) return;
  clearMessages();
  try {
    const body = { role_code: role.role_code };
    if (id) body.conversation_id = id;
    const data = await getJson(state.chatBase, "/chat/clear", { method: "POST", body, auth: true });
    showNotice(data.message || "当前聊天已清空");
    if (state.conversationId === id) state.notes.clear();
  } catch (err) {
    handleError(err);
  }
  if (state.token && state.role === role) await Promise.all([refreshHistory(), loadConversations()]);
}

// ---- a reply read aloud (GET /chat/voice: an MP3, or a 302 to one) ----

// ▶ under a reply; ⏸ while its clip plays; a spinner while it loads. Its look follows `voice` and the player.
function voiceButton(id) {
  const button = document.createElement("button");
  button.type = "button";
  button.className = "voice-btn";
  button.dataset.id = String(id);
  button.addEventListener("click", () => toggleVoice(String(id)));
  paintVoiceButton(button);
  return button;
}

function paintVoiceButton(button) {
  const player = $("#voice-player");
  const id = button.dataset.id;
  const status = voice.loading === id ? "loading" : voice.id === id && !player.paused && !player.ended ? "playing" : "idle";
  button.dataset.state = status;
  button.textContent = { idle: "▶", loading: "", playing: "⏸" }[status];
  button.setAttribute("aria-label", { idle: "朗读这条回复", loading: "语音加载中", playing: "暂停朗读" }[status]);
  button.title = button.getAttribute("aria-label");
  button.setAttribute("aria-busy", String(status === "loading"));
}

function paintVoiceButtons() {
  for (const button of document.querySelectorAll(".voice-btn")) paintVoiceButton(button);
}

async function toggleVoice(id) {
  const player = $("#voice-player");
  if (voice.id === id && !player.paused && !player.ended) {
    player.pause(); // ⏸: stop here; ▶ again goes on from where it stopped
    return;
  }
  if (voice.loading === id) return;
  showError("");
  unlockPlayer(player);
  let url = voice.clips.get(id);
  if (!url) {
    if (voice.id !== null && !player.paused) player.pause(); // one clip at a time, even while the next loads
    voice.loading = id;
    paintVoiceButtons();
    try {
      // A reply continued on this page grew under the same URL: past the HTTP cache (revalidated by its ETag).
      const cache = voice.grown.has(id) ? "no-cache" : undefined;
      const res = await request(state.chatBase, `/chat/voice?message_id=${encodeURIComponent(id)}`, { auth: true, cache });
      const blob = await res.blob();
      url = URL.createObjectURL(blob);
      voice.clips.set(id, url);
    } catch (err) {
      if (voice.loading === id) voice.loading = null;
      paintVoiceButtons();
      handleError(err.name === "TypeError" ? new ApiError(0, "NetworkError", "语音下载失败，请稍后再试") : err);
      return;
    }
    if (voice.loading !== id) return; // another reply was tapped meanwhile (or the user logged out)
    voice.loading = null;
  }
  if (voice.id !== id) {
    voice.id = id;
    player.src = url;
  }
  try {
    await player.play();
  } catch (err) {
    // AbortError: another clip was started before this one could. NotAllowedError: the browser wants a tap.
    if (err.name === "NotAllowedError") showError("浏览器阻止了自动播放，请再点一次 ▶");
    else if (err.name !== "AbortError") {
      // Not audio this browser can play: fetched again on the next tap.
      URL.revokeObjectURL(url);
      voice.clips.delete(id);
      voice.id = null;
      showError("这段语音无法播放");
    }
  } finally {
    paintVoiceButtons();
  }
}

// iOS plays an <audio> from script only once a tap has started it: on the first tap, start it with silence.
function unlockPlayer(player) {
  if (voice.unlocked) return;
  voice.unlocked = true;
  if (player.src) return;
  player.src = silentWav();
  player.play().catch(() => {});
}

function silentWav() {
  const samples = 800; // 0.1 s of 8-bit 8 kHz mono silence
  const view = new DataView(new ArrayBuffer(44 + samples));
  const ascii = (at, text) => [...text].forEach((c, i) => view.setUint8(at + i, c.charCodeAt(0)));
  ascii(0, "RIFF");
  view.setUint32(4, 36 + samples, true);
  ascii(8, "WAVEfmt ");
  view.setUint32(16, 16, true);
  view.setUint16(20, 1, true); // PCM
  view.setUint16(22, 1, true); // mono
  view.setUint32(24, 8000, true);
  view.setUint32(28, 8000, true);
  view.setUint16(32, 1, true);
  view.setUint16(34, 8, true);
  ascii(36, "data");
  view.setUint32(40, samples, true);
  new Uint8Array(view.buffer, 44).fill(128);
  return `data:audio/wav;base64,${btoa(String.fromCharCode(...new Uint8Array(view.buffer)))}`;
}

// A reply that is about to grow (继续): its clip, kept or playing, is of the old text.
function forgetClip(id) {
  voice.grown.add(id);
  const player = $("#voice-player");
  if (voice.loading === id) voice.loading = null;
  if (voice.id === id) {
    if (!player.paused) player.pause();
    voice.id = null;
  }
  const url = voice.clips.get(id);
  if (url) {
    URL.revokeObjectURL(url);
    voice.clips.delete(id);
  }
  paintVoiceButtons();
}

// Nothing plays any more; `forget` (logging out) also drops the clips kept for the page.
function stopVoice({ forget = false } = {}) {
  const player = $("#voice-player");
  voice.loading = null;
  if (!player.paused) player.pause();
  if (forget) {
    voice.id = null;
    player.removeAttribute("src");
    player.load();
    for (const url of voice.clips.values()) URL.revokeObjectURL(url);
    voice.clips.clear();
    voice.grown.clear();
  }
  paintVoiceButtons();
}

// ---- the role's skills (chips above the composer; POST /chat/skill streams like a message) ----

async function loadSkills(role) {
  let skills = [];
  try {
    const data = await getJson(state.chatBase, `/chat/role/skills?role_code=${encodeURIComponent(role.role_code)}`);
    skills = (Array.isArray(data.skills) ? data.skills : []).filter(
      (s) => s && typeof s.skill_code === "string" && typeof s.name === "string" && !CHAT_ONLY_SKILLS.has(s.skill_code),
    );
  } catch (err) {
    // A server without skills (or a role that has none): no chips, the chat itself is unaffected.
    if (err.name === "AbortError") return;
  }
  if (state.role !== role) return;
  state.skills = skills;
  renderSkills();
}

function renderSkills() {
  const bar = $("#skills-bar");
  bar.replaceChildren();
  for (const skill of state.skills) {
    const chip = document.createElement("button");
    chip.type = "button";
    chip.className = "skill-chip";
    chip.dataset.skill = skill.skill_code;
    chip.textContent = skill.name;
    if (typeof skill.description === "string") chip.title = skill.description;
    chip.disabled = Boolean(state.stream);
    chip.addEventListener("click", () => pickSkill(skill));
    bar.append(chip);
  }
  $("#skills").hidden = !state.skills.length;
}

// A skill that needs an argument asks for it inline first; the others run at once.
function pickSkill(skill) {
  if (state.stream || !state.role) return;
  const ask = SKILL_ARGUMENTS[skill.skill_code];
  if (!ask) {
    closeSkillForm();
    return useSkill(skill, null);
  }
  state.pendingSkill = skill;
  $("#skill-arg-label").textContent = `${skill.name}：${ask.label}`;
  const input = $("#skill-arg");
  input.value = ask.fallback;
  input.placeholder = ask.fallback;
  $("#skill-form").hidden = false;
  for (const chip of document.querySelectorAll(".skill-chip")) {
    chip.setAttribute("aria-pressed", String(chip.dataset.skill === skill.skill_code));
  }
  input.focus();
  input.select();
}

function closeSkillForm() {
  state.pendingSkill = null;
  $("#skill-form").hidden = true;
  for (const chip of document.querySelectorAll(".skill-chip")) chip.removeAttribute("aria-pressed");
}

function submitSkillForm(event) {
  event.preventDefault();
  const skill = state.pendingSkill;
  if (!skill || state.stream) return;
  const ask = SKILL_ARGUMENTS[skill.skill_code];
  const value = $("#skill-arg").value.trim() || ask.fallback;
  closeSkillForm();
  useSkill(skill, { [ask.name]: value });
}

async function useSkill(skill, args) {
  if (state.stream || !state.role) return;
  const body = { role_code: state.role.role_code, skill_code: skill.skill_code };
  if (state.conversationId) body.conversation_id = state.conversationId;
  if (args) body.arguments = args;
  // What the server stores as the user's message (the history read after [DONE] shows its own record).
  const shown = args ? Object.values(args).join("，") : "";
  await streamTurn("/chat/skill", body, { text: `（使用技能「${skill.name}」${shown ? `：${shown}` : ""}）` });
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
  $("#password-form").addEventListener("submit", loginWithPassword);
  $("#register-form").addEventListener("submit", register);
  for (const tab of document.querySelectorAll("#login-tabs [role=tab]")) {
    tab.addEventListener("click", () => {
      clearMessages();
      showLoginTab(tab.dataset.form);
    });
  }
  $("#login-tabs").addEventListener("keydown", onTabKeydown);
  $("#logout-btn").addEventListener("click", signOut);
  $("#profile-btn").addEventListener("click", () => go("#/me"));
  $("#profile-back").addEventListener("click", () => go("#/roles"));
  $("#profile-form").addEventListener("submit", saveProfile);
  $("#password-set-form").addEventListener("submit", setPassword);
  $("#logout-here").addEventListener("click", signOut);
  $("#logout-all").addEventListener("click", signOutEverywhere);
  const player = $("#voice-player");
  for (const type of ["play", "playing", "pause", "ended", "emptied"]) player.addEventListener(type, paintVoiceButtons);
  player.addEventListener("error", () => {
    if (voice.id !== null && player.getAttribute("src")) showError("这段语音无法播放");
    paintVoiceButtons();
  });
  $("#switch-role-btn").addEventListener("click", () => go("#/roles"));
  $("#clear-btn").addEventListener("click", clearChat);
  $("#conv-btn").addEventListener("click", () => ($("#chat-view").classList.contains("drawer-open") ? closeDrawer() : openDrawer()));
  $("#conv-close").addEventListener("click", closeDrawer);
  $("#conv-backdrop").addEventListener("click", closeDrawer);
  $("#new-conv-btn").addEventListener("click", newConversation);
  $("#conv-more").addEventListener("click", () => loadConversations({ more: true }));
  document.addEventListener("keydown", (event) => {
    if (event.key !== "Escape") return;
    closeDrawer();
    closeSkillForm();
  });
  $("#composer").addEventListener("submit", send);
  $("#message").addEventListener("keydown", onKeydown);
  $("#photo-input").addEventListener("change", pickPhoto);
  $("#photo-remove").addEventListener("click", removePhoto);
  $("#skill-form").addEventListener("submit", submitSkillForm);
  $("#skill-cancel").addEventListener("click", closeSkillForm);
  window.addEventListener("hashchange", route);
  // Logged out in another tab: here too.
  window.addEventListener("storage", (event) => {
    if ((event.key === TOKEN_KEY || event.key === null) && !localStorage.getItem(TOKEN_KEY) && state.token) logout();
  });
  await loadConfig();
  if (state.token && location.hash !== "#/me") loadMe(); // the name in the top bar as it is now (#/me loads it itself)
  await route();
  document.body.dataset.ready = "true";
}

start();
