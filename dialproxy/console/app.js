// The console: sign-in, the pages, and what each page does.  No framework, no build step.
import { api, ApiError, session } from "./api.js";
import { bars, meters } from "./charts.js";
import {
  badge, clear, confirmDialog, fmt, formDialog, h, modal, secretDialog, table, toast,
} from "./ui.js";

const view = document.getElementById("view");
const nav = document.getElementById("nav");
let me = null; // GET /v1/console/me: who is signed in
let rendering = 0; // the latest render: an older one that finishes late is dropped

const PAGES = {
  admin: [["overview", "Overview"], ["keys", "Keys"], ["models", "Models"], ["usage", "Usage"]],
  viewer: [["overview", "Overview"], ["keys", "Keys"], ["models", "Models"], ["usage", "Usage"]],
  key: [["mine", "My key"]],
};
const canWrite = () => me && me.level === "admin";
const day = (offset) => new Date(Date.now() + offset * 86400000).toISOString().slice(0, 10);
const plural = (n, word) => `${fmt.num(n)} ${word}${n === 1 ? "" : "s"}`;
const split = (text) => text.split(",").map((t) => t.trim()).filter(Boolean);
const facts = (pairs) => h("dl.facts", {}, pairs.map(([k, v]) => [h("dt", { text: k }), h("dd", {}, v)]));
const heading = (text) => h("h1", { tabindex: "-1", text });
let cards = 0;
// A titled card: a region named by its heading.
const card = (title, ...children) => {
  const id = `card-${++cards}`;
  return h("section.card", { "aria-labelledby": id }, h("h2", { id, text: title }), ...children);
};

// --- theme --------------------------------------------------------------------------------
function setupTheme() {
  const root = document.documentElement;
  const button = document.getElementById("theme");
  const dark = matchMedia("(prefers-color-scheme: dark)");
  const saved = localStorage.getItem("dialproxy.theme");
  if (saved === "light" || saved === "dark") root.dataset.theme = saved;
  const effective = () => root.dataset.theme || (dark.matches ? "dark" : "light");
  const label = () => {
    const next = effective() === "dark" ? "light" : "dark";
    button.textContent = next === "dark" ? "Dark theme" : "Light theme";
    button.setAttribute("aria-label", `Switch to the ${next} theme`);
  };
  button.addEventListener("click", () => {
    root.dataset.theme = effective() === "dark" ? "light" : "dark";
    localStorage.setItem("dialproxy.theme", root.dataset.theme);
    label();
  });
  dark.addEventListener("change", label);
  label();
}

// --- sign in and out ----------------------------------------------------------------------
function showLogin(message = "") {
  me = null;
  document.getElementById("login").hidden = false;
  document.getElementById("logout").hidden = true;
  document.getElementById("who").textContent = "";
  nav.replaceChildren();
  view.replaceChildren();
  document.getElementById("login-error").textContent = message;
  document.getElementById("login-key").focus();
}

async function whoami() {
  me = await api("/v1/console/me");
  document.getElementById("login").hidden = true;
  document.getElementById("logout").hidden = false;
  const level = { admin: "admin", viewer: "viewer (read only)", key: "key holder" }[me.level];
  document.getElementById("who").textContent = `${me.name || me.fingerprint} · ${me.project} · ${level}`;
  clear(nav, PAGES[me.level].map(([id, label]) => h("a", { href: `#/${id}`, "data-page": id, text: label })));
}

async function login(event) {
  event.preventDefault();
  const input = document.getElementById("login-key");
  const key = input.value.trim();
  if (!key) return;
  session.set(key);
  try {
    await whoami();
  } catch (e) {
    session.clear();
    showLogin(e.status === 401 ? "This key is not accepted (unknown, revoked or expired)." : e.message);
    return;
  }
  input.value = "";
  const first = `#/${PAGES[me.level][0][0]}`;
  if (location.hash === first) route(); else location.hash = first;
}

function logout() {
  session.clear();
  history.replaceState(null, "", location.pathname);
  showLogin("Signed out: this tab no longer holds the key.");
}

// --- the router -----------------------------------------------------------------------------
async function route() {
  if (!me) return;
  const pages = PAGES[me.level];
  let page = location.hash.replace(/^#\/?/, "");
  if (!pages.some(([id]) => id === page)) page = pages[0][0];
  for (const link of nav.querySelectorAll("a")) {
    if (link.dataset.page === page) link.setAttribute("aria-current", "page");
    else link.removeAttribute("aria-current");
  }
  const token = ++rendering;
  // After an action the view is drawn anew: the focus goes back to the same control (by
  // id or label) when it is still there, else to the page's heading.
  const active = view.contains(document.activeElement) ? document.activeElement : null;
  const again = active && (active.id ? `#${CSS.escape(active.id)}`
    : active.getAttribute("aria-label") ? `[aria-label="${CSS.escape(active.getAttribute("aria-label"))}"]` : null);
  if (!view.children.length) clear(view, h("p.muted", { text: "Loading…" }));
  let content;
  try {
    content = await RENDER[page]();
  } catch (e) {
    if (e instanceof ApiError && e.status === 401) {
      session.clear();
      showLogin(e.message);
      return;
    }
    content = h("div", {}, heading("Something went wrong"), h("p.error", { role: "alert", text: e.message }));
  }
  if (token !== rendering) return;
  clear(view, content);
  const target = (again && view.querySelector(again)) || view.querySelector("h1");
  target?.focus({ preventScroll: true });
}

// --- overview -----------------------------------------------------------------------------
function hourLabel(iso) {
  return String(new Date(iso).getUTCHours()).padStart(2, "0") + ":00";
}

async function overview() {
  const o = await api("/v1/console/overview");
  const c = o.config;
  const refusal = c.lastError
    ? h("div", {},
      h("p.error", { text: "The last reload was refused; the config before it still serves:" }),
      h("ul", {}, c.lastError.map((p) => h("li", {}, h("code", { text: p.path }), " ", p.message, " ",
        h("span.muted", { text: p.file })))))
    : h("p", {}, badge("ok"), " No reload refused since the last good one.");
  const storage = o.storage;
  const cards = h("div.grid", {},
    card("Config", facts([
        ["Generation", String(c.generation)],
        ["Loaded", fmt.date(c.loadedAt)],
        ["Reloads", `${c.reloadsApplied} applied, ${c.reloadsRefused} refused`],
        ["Serves", [plural(c.models, "model"), plural(c.applications, "application"), plural(c.keys, "key"), plural(c.roles, "role")].join(", ")],
      ]),
      h("h3", { text: "Last refusal" }), refusal,
      canWrite() ? h("button", { type: "button", id: "reload-config", onclick: reloadConfig, text: "Reload config" }) : null),
    card("Storage", facts([
        ["Counters", [storage.backend, " ", badge(storage.healthy ? "ok" : "bad")]],
        ["If it fails", storage.policy],
        ["Ledger", o.ledger
          ? [`${o.ledger.writes} writes, ${o.ledger.failedWrites} failed`, " ", badge(o.ledger.failing ? "bad" : "ok")]
          : "off"],
        ["Shared keys", [o.sharedKeys.store, " ", badge(o.sharedKeys.healthy ? "ok" : "bad")]],
      ])));
  const parts = [heading("Overview"), cards];
  if (!o.usage) {
    parts.push(h("p.card", { text: "The usage ledger is off (dialproxy serve --ledger on): no usage to show." }));
    return h("div", {}, parts);
  }
  const u = o.usage;
  parts.push(h("div.grid", {},
    card("This hour", h("p.big", { text: plural(u.hour.requests, "request") }),
      h("p", { text: `${fmt.num(u.hour.totalTokens)} tokens · ${u.hour.errors} errors · ${fmt.usd(u.hour.cost)}` })),
    card("Last 24 hours", h("p.big", { text: plural(u.day.requests, "request") }),
      h("p", { text: `${fmt.num(u.day.totalTokens)} tokens · ${u.day.errors} errors · ${fmt.usd(u.day.cost)}` }))));
  const series = u.series;
  parts.push(h("div.grid", {},
    card("Requests per hour (UTC)", bars(series.map((p) => ({ label: hourLabel(p.hour), value: p.requests })), { title: "Requests per hour", unit: "requests" })),
    card("Tokens per hour (UTC)", bars(series.map((p) => ({ label: hourLabel(p.hour), value: p.totalTokens })), { title: "Tokens per hour", unit: "tokens", alt: true }))));
  const ranked = (rows, label) => table([
    { label, value: (r) => r.name },
    { label: "Requests", num: true, value: (r) => fmt.num(r.requests) },
    { label: "Tokens", num: true, value: (r) => fmt.num(r.totalTokens) },
    { label: "Cost", num: true, value: (r) => fmt.usd(r.cost) },
  ], rows, "No requests in the last 24 hours.");
  parts.push(h("div.grid", {},
    card("Top projects (24 h)", ranked(u.topProjects, "Project")),
    card("Top models (24 h)", ranked(u.topModels, "Model"))));
  parts.push(card("Limit utilisation", h("p.muted", { text: "The fullest limit windows of the projects and models used in the last 24 hours, as counted now." }),
    o.utilisation.length
      ? meters(o.utilisation.map((b) => ({ label: `${b.project} · ${b.model} · ${b.type} per ${b.window}`, used: b.used, limit: b.limit })))
      : h("p.muted", { text: "No limited window in use." })));
  return h("div", {}, parts);
}

// POST /v1/ops/config/reload (DIAL's trigger): the files read now, served when they validate.
async function reloadConfig() {
  const ok = await confirmDialog("Reload the config?",
    "The config files are read now and served if they validate; if not, the config served now stays and the refusal shows here.",
    "Reload");
  if (!ok) return;
  let message;
  try {
    const result = await api("/v1/ops/config/reload", { method: "POST" });
    message = result.applied ? `Config reloaded: generation ${result.generation}` : "The files hold the config served: nothing to reload";
  } catch (e) {
    message = e.message;
  }
  await route();
  toast(message);
}

// --- keys ---------------------------------------------------------------------------------
const keyFilters = { q: "", project: "", role: "", state: "" };
let keyList = { keys: [], etag: null };

function matches(key) {
  const f = keyFilters;
  const text = [key.name, key.description, key.fingerprint, key.project, ...(key.roles || [])].join(" ").toLowerCase();
  return (!f.q || text.includes(f.q.toLowerCase()))
    && (!f.project || key.project === f.project)
    && (!f.role || (key.roles || []).includes(f.role))
    && (!f.state || key.state === f.state);
}

// Run a write; a stale ETag reads the list again, so that the next try can succeed.
async function write(path, options) {
  try {
    return await api(path, { ...options, etag: keyList.etag });
  } catch (e) {
    if (e.status === 412) {
      keyList = await api("/v1/admin/keys");
      throw new Error(e.message + " The list was read again: check it and try again.");
    }
    throw e;
  }
}

const PAGE = 50; // keys a page of the table
const STATES = ["active", "expired", "disabled", "not yet valid"];
let keyOffset = 0;

// One page of keys under the filters: the API filters and pages when it can (its answer
// has `total`); an API that lists every key is filtered and paged here.
async function listKeys() {
  const query = new URLSearchParams();
  for (const [name, value] of Object.entries(keyFilters)) if (value) query.set(name, value);
  query.set("limit", PAGE);
  query.set("offset", keyOffset);
  keyList = await api(`/v1/admin/keys?${query}`);
  if (typeof keyList.total === "number") return { rows: keyList.keys, total: keyList.total };
  const shown = keyList.keys.filter(matches);
  return { rows: shown.slice(keyOffset, keyOffset + PAGE), total: shown.length };
}

// The config's role names: GET /v1/admin/roles where the API has it, else the listed keys'.
async function roleNames(listed) {
  try {
    const data = await api("/v1/admin/roles");
    const roles = data && data.roles !== undefined ? data.roles : data;
    const names = Array.isArray(roles) ? roles.map((r) => (typeof r === "string" ? r : r.name)) : Object.keys(roles || {});
    if (names.length) return names.sort();
  } catch { /* an API without it */ }
  return [...new Set(listed.flatMap((k) => k.roles || []))].sort();
}

async function keys() {
  let page = await listKeys();
  const roles = await roleNames(keyList.keys);
  const today = new Map(); // fingerprint -> today's usage (UTC), when the list has none
  if (keyList.keys.length && !("usageToday" in keyList.keys[0])) {
    try {
      const used = await api(`/v1/console/usage?by=key&from=${day(0)}&to=${day(0)}`);
      for (const r of used.rows) today.set(r.key, r);
    } catch { /* the ledger is off: no column */ }
  }
  const projects = [...new Set(keyList.keys.map((k) => k.project).filter(Boolean))].sort();
  const body = h("div");
  let typing;
  const refresh = async (again = false) => {
    if (!again) keyOffset = 0;
    try {
      page = await listKeys();
      draw();
    } catch (e) {
      clear(body, h("p.error", { role: "alert", text: e.message }));
    }
  };
  const select = (name, label, options) => h("div", {},
    h("label", { for: `filter-${name}`, text: label }),
    h("select", { id: `filter-${name}`, onchange: (e) => { keyFilters[name] = e.target.value; refresh(); } },
      h("option", { value: "", text: "Any" }),
      options.map((o) => h("option", { value: o, selected: keyFilters[name] === o, text: o }))));
  const toolbar = h("div.toolbar", { role: "search" },
    h("div", {}, h("label", { for: "filter-q", text: "Search" }),
      h("input", { id: "filter-q", type: "search", value: keyFilters.q, placeholder: "name, fingerprint, project…",
        oninput: (e) => { keyFilters.q = e.target.value; clearTimeout(typing); typing = setTimeout(refresh, 250); } })),
    h("div", {}, h("label", { for: "filter-project", text: "Project" }),
      h("input", { id: "filter-project", type: "search", list: "projects", value: keyFilters.project,
        onchange: (e) => { keyFilters.project = e.target.value.trim(); refresh(); } }),
      h("datalist", { id: "projects" }, projects.map((p) => h("option", { value: p })))),
    select("role", "Role", roles), select("state", "State", STATES),
    canWrite() ? h("button.primary", { type: "button", id: "new-key", onclick: () => createKey(roles), text: "New key" }) : null);
  const move = (offset) => { keyOffset = Math.max(offset, 0); refresh(true); };
  function draw() {
    const { rows, total } = page;
    const last = Math.min(keyOffset + rows.length, total);
    clear(body,
      h("p.muted", { "aria-live": "polite", text: total ? `Keys ${keyOffset + 1}–${last} of ${total}` : "" }),
      table([
        { label: "Name", value: (k) => [k.name || h("span.muted", { text: "(no name)" }),
          k.description ? h("div.muted", { text: k.description }) : null] },
        { label: "Fingerprint", value: (k) => h("code", { text: k.fingerprint || "—" }) },
        { label: "Project", value: (k) => k.project },
        { label: "Roles", value: (k) => (k.roles || []).join(", ") },
        { label: "State", value: (k) => badge(k.state) },
        { label: "Expires", cls: "hide-narrow", value: (k) => fmt.date(k.expiresAt) },
        { label: "Today", num: true, value: (k) => {
          const used = k.usageToday || today.get(k.fingerprint); // (the API's, when it says)
          return used ? `${plural(used.requests, "request")}, ${plural(used.totalTokens, "token")}` : "—";
        } },
        { label: "Actions", cls: "actions", value: (k) => keyActions(k) },
      ], rows, Object.values(keyFilters).some(Boolean) ? "No key matches these filters." : "The config has no keys."),
      total > PAGE ? h("div.actions-row", {},
        h("button", { type: "button", disabled: keyOffset === 0, onclick: () => move(keyOffset - PAGE), text: "Previous page" }),
        h("button", { type: "button", disabled: last >= total, onclick: () => move(keyOffset + PAGE), text: "Next page" })) : null);
  }
  draw();
  const note = canWrite() ? null
    : h("p.muted", { text: "Read only: a viewer sees the keys but cannot change them." });
  return h("div", {}, heading("Keys"), note, toolbar, body);
}

function keyActions(k) {
  const who = k.name ? `${k.name} (${k.fingerprint})` : k.fingerprint;
  const button = (text, onclick, cls = "") => h(`button.small${cls}`, {
    type: "button", onclick, text, "aria-label": `${text}: key ${who}`, "data-key": k.fingerprint,
  });
  const actions = [button("Details", () => keyDetails(k))];
  if (canWrite() && k.stored !== "env") {
    actions.push(button("Edit", () => editKey(k)));
    if (k.state !== "disabled") {
      actions.push(button("Rotate", () => rotateKey(k)), button("Revoke", () => revokeKey(k), ".danger"));
    }
  }
  return actions;
}

async function createKey(roles) {
  const created = await formDialog("New key", [
    { name: "project", label: "Project", required: true },
    { name: "roles", label: "Roles", required: true, hint: `Comma-separated. The config's: ${roles.join(", ") || "none yet"}` },
    { name: "name", label: "Name" },
    { name: "description", label: "Description" },
    { name: "expiresAt", label: "Expires", hint: "30d, 2027-01-31 or a date-time; empty: never" },
    { name: "models", label: "Models", hint: "Comma-separated; empty: every model its roles allow" },
    { name: "canShare", label: "May create shared keys", type: "checkbox" },
  ], "Create key", async (v) => {
    const body = { project: v.project, roles: split(v.roles), canShare: v.canShare };
    for (const field of ["name", "description", "expiresAt"]) if (v[field]) body[field] = v[field];
    const models = split(v.models);  // (none given, spaces or commas only: every model)
    if (models.length) body.models = models;
    return write("/v1/admin/keys", { method: "POST", body });
  });
  if (!created) return;
  await secretDialog("Key created", created.key,
    `Fingerprint ${created.fingerprint}, project ${created.project}. Only its sha256: form is in the config.`);
  await route();
  toast(`Key ${created.fingerprint} created`);
}

// The key's own quotas as the dialog shows them: JSON text, empty for none.
const limitsText = (limits) => (limits && Object.keys(limits).length ? JSON.stringify(limits) : "");

async function editKey(k) {
  const saved = await formDialog(`Edit key ${k.fingerprint}`, [
    { name: "name", label: "Name", value: k.name || "" },
    { name: "description", label: "Description", value: k.description || "" },
    { name: "roles", label: "Roles", value: (k.roles || []).join(", "), required: true, hint: "Comma-separated" },
    { name: "expiresAt", label: "Expires", value: k.expiresAt || "", hint: "30d, 2027-01-31 or a date-time; empty: never" },
    { name: "models", label: "Models", value: (k.models || []).join(", "), hint: "Comma-separated; empty: every model its roles allow" },
    { name: "limits", label: "Own limits (JSON)", value: limitsText(k.limits),
      hint: 'Per deployment or "*", as the config writes them, e.g. {"gpt-4o": {"day": "100000"}}; empty: none' },
    { name: "canShare", label: "May create shared keys", type: "checkbox", value: k.canShare },
  ], "Save", async (v) => {
    const body = {};
    if (v.name !== (k.name || "")) body.name = v.name || null;
    if (v.description !== (k.description || "")) body.description = v.description || null;
    if (split(v.roles).join(",") !== (k.roles || []).join(",")) body.roles = split(v.roles);
    if (v.expiresAt !== (k.expiresAt || "")) body.expiresAt = v.expiresAt || null;
    const models = split(v.models);
    if (models.join(",") !== (k.models || []).join(",")) body.models = models.length ? models : null;
    if (v.limits !== limitsText(k.limits)) {
      try {
        body.limits = v.limits ? JSON.parse(v.limits) : null;
      } catch {
        throw new Error("Own limits: not JSON, e.g. {\"gpt-4o\": {\"day\": \"100000\"}}");
      }
    }
    if (v.canShare !== !!k.canShare) body.canShare = v.canShare;
    const changes = Object.keys(body);
    if (!changes.length) throw new Error("Nothing changed.");
    const ok = await confirmDialog("Save these changes?",
      `Key ${k.fingerprint}: ${changes.join(", ")} will be written to the config file, which is then reloaded.`, "Save changes");
    if (!ok) return undefined;
    return write(`/v1/admin/keys/${k.fingerprint}`, { method: "PATCH", body });
  });
  if (!saved) return;
  await route();
  toast(`Key ${k.fingerprint} saved`);
}

async function rotateKey(k) {
  const rotated = await formDialog(`Rotate key ${k.fingerprint}?`, [
    { name: "note", label: "A new secret is made with the same project, roles and limits. The old secret keeps working for the overlap, then expires.", type: "note" },
    { name: "overlap", label: "Overlap", value: "7d", required: true, hint: "How long the old secret still works: 7d, 12h, 0" },
  ], "Rotate key", (v) => write(`/v1/admin/keys/${k.fingerprint}/rotate`, { method: "POST", body: { overlap: v.overlap } }));
  if (!rotated) return;
  await secretDialog("Key rotated: its new secret", rotated.key,
    `New fingerprint ${rotated.fingerprint}. The old secret (${rotated.replaces}) works until ${fmt.date(rotated.oldExpiresAt)}.`);
  await route();
  toast(`Key ${k.fingerprint} rotated to ${rotated.fingerprint}`);
}

async function revokeKey(k) {
  const ok = await confirmDialog(`Revoke key ${k.fingerprint}?`,
    `${k.name || "This key"} (project ${k.project}) stops working now: the config marks it disabled and is reloaded.`,
    "Revoke key", true);
  if (!ok) return;
  try {
    await write(`/v1/admin/keys/${k.fingerprint}`, { method: "DELETE" });
  } catch (e) {
    await modal("Not revoked", (dialog, close) => dialog.append(h("p.error", { role: "alert", text: e.message }),
      h("div.actions-row", {}, h("button.primary", { type: "button", onclick: () => close(), text: "OK" }))));
    return;
  }
  await route();
  toast(`Key ${k.fingerprint} revoked`);
}

function windowRows(models) {
  const rows = [];
  for (const [model, entry] of Object.entries(models || {})) {
    for (const w of entry.limits) rows.push({ model, ...w });
  }
  return rows;
}

function windowsTable(models) {
  return table([
    { label: "Model", value: (w) => w.model },
    { label: "Limit", value: (w) => `${w.type} per ${w.window} (${w.scope})` },
    { label: "Used", num: true, value: (w) => `${fmt.num(w.used)} / ${fmt.num(w.limit)}` },
    { label: "Resets", value: (w) => (w.resetAt ? fmt.date(w.resetAt) : "—") },
  ], windowRows(models), "No limited window: its models are not limited.");
}

async function keyDetails(k) {
  let detail;
  let error = null;
  try {
    detail = await api(`/v1/console/keys/${k.fingerprint}`);
  } catch (e) {
    error = e.message;
  }
  await modal(`Key ${k.name || k.fingerprint}`, (dialog, close) => {
    dialog.classList.add("wide");
    if (error) {
      dialog.append(h("p.error", { role: "alert", text: error }));
    } else {
      dialog.append(
        facts([["Fingerprint", h("code", { text: detail.fingerprint })], ["Project", detail.project], ["State", badge(detail.state)],
          ["Today", detail.today ? `${plural(detail.today.requests, "request")}, ${plural(detail.today.totalTokens, "token")}` : "ledger off"]]),
        h("h3", { text: "Windows" }), windowsTable(detail.models),
        h("h3", { text: "Shared keys" }),
        detail.sharedKeys === null
          ? h("p.muted", { text: "This key may not share (no canShare)." })
          : table([
            { label: "Name", value: (s) => s.name },
            { label: "Used / cap", num: true, value: (s) => `${fmt.num(s.utilized)} / ${s.tokens < 0 ? "no cap" : fmt.num(s.tokens)}` },
            { label: "Expires", value: (s) => fmt.date(s.expiresAt) },
          ], detail.sharedKeys, "No shared keys."));
    }
    dialog.append(h("div.actions-row", {}, h("button.primary", { type: "button", onclick: () => close(), text: "Close" })));
  });
}

// --- models -------------------------------------------------------------------------------
async function models() {
  const { models: all } = await api("/v1/console/models");
  const priced = all.filter((m) => m.pricing && m.pricing.unit === "token");
  const parts = [heading("Models")];
  if (priced.length) {
    const out = h("output", { id: "cost-out", for: "calc-model calc-prompt calc-completion", class: "big" });
    const detail = h("p.muted");
    const form = h("form.toolbar", { onsubmit: (e) => e.preventDefault(), oninput: compute },
      h("div", {}, h("label", { for: "calc-model", text: "Model" }),
        h("select", { id: "calc-model" }, priced.map((m) => h("option", { value: m.name, text: m.name })))),
      h("div", {}, h("label", { for: "calc-prompt", text: "Prompt tokens" }),
        h("input", { id: "calc-prompt", type: "number", min: 0, value: 1000, inputmode: "numeric" })),
      h("div", {}, h("label", { for: "calc-completion", text: "Completion tokens" }),
        h("input", { id: "calc-completion", type: "number", min: 0, value: 500, inputmode: "numeric" })));
    function compute() {
      const model = priced.find((m) => m.name === form.querySelector("#calc-model").value);
      const prompt = Math.max(Number(form.querySelector("#calc-prompt").value) || 0, 0);
      const completion = Math.max(Number(form.querySelector("#calc-completion").value) || 0, 0);
      const a = prompt * Number(model.pricing.prompt), b = completion * Number(model.pricing.completion);
      out.textContent = `$${(a + b).toFixed(6)}`;
      detail.textContent = `${fmt.num(prompt)} × $${model.pricing.prompt} + ${fmt.num(completion)} × $${model.pricing.completion} per token`;
    }
    compute();
    parts.push(h("section.card", { "aria-labelledby": "calc-title" },
      h("h2", { id: "calc-title", text: "Expected cost" }), form,
      h("p", {}, "Expected cost: ", out), detail));
  }
  for (const m of all) {
    const price = m.pricing
      ? `${m.pricing.prompt} prompt, ${m.pricing.completion} completion (USD per ${m.pricing.unit})`
      : "no pricing";
    parts.push(h("section.card", { "aria-label": m.name },
      h("h2", {}, m.name, " ", h("span.muted", { text: `${m.kind === "model" ? m.type : "application"}` })),
      m.displayName ? h("p", { text: m.displayName }) : null,
      facts([["Pricing", price]]),
      table([
        { label: "Upstream", value: (u) => u.id || u.name },
        { label: "URL", value: (u) => h("code", { text: u.url }) },
        { label: "Tier", num: true, value: (u) => String(u.tier) },
        { label: "Weight", num: true, value: (u) => String(u.weight) },
        { label: "State", value: (u) => [badge(u.state), u.retryIn ? ` for ${fmt.seconds(u.retryIn)}` : "",
          u.failures ? h("div.muted", { text: `${u.failures} failures in a row` }) : null] },
        { label: "Capacity", value: (u) => (u.capacity
          ? u.capacity.map((w) => `${fmt.num(w.used)} / ${fmt.num(w.limit)} ${w.type} per ${w.window}`).join("; ")
          : "—") },
      ], m.upstreams, "No upstream.")));
  }
  return h("div", {}, parts);
}

// --- usage --------------------------------------------------------------------------------
const usageQuery = { from: null, to: null, by: "project" };

function usagePath(format) {
  const q = new URLSearchParams({ from: usageQuery.from, to: usageQuery.to, by: usageQuery.by });
  if (format) q.set("format", format);
  return `/v1/console/usage?${q}`;
}

async function exportCsv(button) {
  button.disabled = true;
  try {
    const response = await api(usagePath("csv"), { raw: true });
    const blob = await response.blob();
    const name = /filename="([^"]+)"/.exec(response.headers.get("Content-Disposition") || "")?.[1] || "usage.csv";
    const link = h("a", { href: URL.createObjectURL(blob), download: name });
    document.body.append(link);
    link.click();
    link.remove();
    setTimeout(() => URL.revokeObjectURL(link.href), 10000);
  } catch (e) {
    toast(e.message);
  } finally {
    button.disabled = false;
  }
}

async function usagePage() {
  usageQuery.from ??= day(-29);
  usageQuery.to ??= day(0);
  const data = await api(usagePath());
  const label = { project: "Project", key: "Key", model: "Model" }[data.by];
  const form = h("form.toolbar", {
    onsubmit: (e) => {
      e.preventDefault();
      usageQuery.from = form.querySelector("#usage-from").value;
      usageQuery.to = form.querySelector("#usage-to").value;
      usageQuery.by = form.querySelector("#usage-by").value;
      route();
    },
  },
  h("div", {}, h("label", { for: "usage-from", text: "From" }), h("input", { id: "usage-from", type: "date", value: usageQuery.from })),
  h("div", {}, h("label", { for: "usage-to", text: "To" }), h("input", { id: "usage-to", type: "date", value: usageQuery.to })),
  h("div", {}, h("label", { for: "usage-by", text: "By" }),
    h("select", { id: "usage-by" }, ["project", "key", "model"].map((b) => h("option", { value: b, selected: b === data.by, text: b })))),
  h("button.primary", { type: "submit", id: "usage-show", text: "Show" }),
  h("button", { type: "button", id: "export-csv", onclick: (e) => exportCsv(e.currentTarget), text: "Export CSV" }));
  const t = data.total;
  const perDay = new Map();
  for (let d = new Date(usageQuery.from + "T00:00:00Z"); d <= new Date(usageQuery.to + "T00:00:00Z") && perDay.size < 400;
    d = new Date(d.getTime() + 86400000)) perDay.set(d.toISOString().slice(0, 10), 0);
  for (const r of data.rows) if (perDay.has(r.day)) perDay.set(r.day, perDay.get(r.day) + r.totalTokens);
  const points = [...perDay].map(([d, value]) => ({ label: d.slice(5), value }));
  const chart = points.length > 1
    ? card("Tokens per day (UTC)", bars(points, { title: "Tokens per day", unit: "tokens", alt: true, every: Math.ceil(points.length / 8), width: 1200, height: 200 }))
    : null;
  return h("div", {}, heading("Usage"), form, chart,
    h("p", { "aria-live": "polite", text: `${plural(t.requests, "request")}, ${plural(t.totalTokens, "token")}, ${fmt.usd(t.cost)} from ${usageQuery.from} to ${usageQuery.to} (UTC days, both included).` }),
    h("section.card", {}, table([
      { label: "Day", value: (r) => r.day },
      { label, value: (r) => (data.by === "key" ? [h("code", { text: r.key }), r.keyName ? ` ${r.keyName}` : ""] : r[data.by]) },
      { label: "Requests", num: true, value: (r) => fmt.num(r.requests) },
      { label: "Errors", num: true, value: (r) => fmt.num(r.errors) },
      { label: "Prompt", num: true, cls: "hide-narrow", value: (r) => fmt.num(r.promptTokens) },
      { label: "Completion", num: true, cls: "hide-narrow", value: (r) => fmt.num(r.completionTokens) },
      { label: "Tokens", num: true, value: (r) => fmt.num(r.totalTokens) },
      { label: "Cost", num: true, value: (r) => fmt.usd(r.cost) },
    ], data.rows, "No usage in this range.")));
}

// --- a key holder's own key ---------------------------------------------------------------
async function mine() {
  const limits = await api("/v1/user/limits");
  const parts = [heading("My key"),
    h("section.card", {}, facts([
      ["Name", me.name || "(no name)"], ["Fingerprint", h("code", { text: me.fingerprint })],
      ["Project", me.project], ["Roles", me.roles.join(", ")]]))];
  const rows = windowRows(limits.models);
  parts.push(card("Limits", rows.length
      ? meters(rows.map((w) => ({
        label: `${w.model} · ${w.type} per ${w.window}${w.scope === "key" ? " (this key)" : " (project)"}${w.resetAt ? ` · resets ${fmt.date(w.resetAt)}` : ""}`,
        used: w.used, limit: w.limit })))
      : h("p.muted", { text: "No limited window on the models this key may call." }),
    h("p.muted", { text: `Models this key may call: ${Object.keys(limits.models).join(", ") || "none"}` })));
  try {
    const u = await api("/v1/user/usage?scope=key");
    parts.push(card("Usage (last 30 days, this key)", h("p", { text: `${plural(u.usage.requests, "request")}, ${plural(u.usage.totalTokens, "token")}, ${fmt.usd(u.usage.cost)}` }),
      table([
        { label: "Model", value: (r) => r[0] },
        { label: "Requests", num: true, value: (r) => fmt.num(r[1].usage ? r[1].usage.requests : 0) },
        { label: "Tokens", num: true, value: (r) => fmt.num(r[1].usage ? r[1].usage.totalTokens : 0) },
        { label: "Cost", num: true, value: (r) => fmt.usd(r[1].usage ? r[1].usage.cost : 0) },
      ], Object.entries(u.deployments), "No usage yet.")));
  } catch (e) {
    parts.push(card("Usage", h("p.muted", { text: e.message })));
  }
  if (me.canShare) parts.push(await sharedKeys());
  return h("div", {}, parts);
}

async function sharedKeys() {
  const { data } = await api("/v1/sharedkeys");
  const create = async () => {
    const made = await formDialog("New shared key", [
      { name: "name", label: "Name", required: true },
      { name: "tokens", label: "Token cap", type: "number", value: "100000", required: true, hint: "-1: no cap of its own (your limits still apply)" },
      { name: "expiresAt", label: "Expires", hint: "An ISO date-time such as 2027-01-31T00:00:00Z; empty: never" },
    ], "Create shared key", (v) => {
      const body = { name: v.name, tokens: Number(v.tokens) };
      if (v.expiresAt) body.expiresAt = v.expiresAt;
      return api("/v1/sharedkeys", { method: "POST", body });
    });
    if (!made) return;
    await secretDialog("Shared key created", made.key, `It acts as your key, within its cap of ${made.tokens < 0 ? "no" : fmt.num(made.tokens)} tokens.`);
    await route();
  };
  const topUp = async (s) => {
    const done = await formDialog(`Top up ${s.name}`, [
      { name: "add", label: "Tokens to add", type: "number", value: "100000", required: true, hint: `Cap now ${fmt.num(s.tokens)}, used ${fmt.num(s.utilized)}` },
    ], "Top up", (v) => {
      const add = Number(v.add);
      if (!Number.isInteger(add) || add <= 0) throw new Error("Tokens to add: a whole number above 0.");
      return api(`/v1/sharedkeys/${encodeURIComponent(s.id)}`, { method: "PATCH", body: { tokens: s.tokens + add } });
    });
    if (done) { await route(); toast(`${s.name}: cap now ${fmt.num(done.tokens)} tokens`); }
  };
  const remove = async (s) => {
    if (!await confirmDialog(`Delete ${s.name}?`, "The shared key stops working at once.", "Delete", true)) return;
    try {
      await api(`/v1/sharedkeys/${encodeURIComponent(s.id)}`, { method: "DELETE" });
    } catch (e) {
      toast(e.message);
      return;
    }
    await route();
    toast(`${s.name} deleted`);
  };
  return card("Shared keys", h("div.toolbar", {}, h("button.primary", { type: "button", id: "new-shared-key", onclick: create, text: "New shared key" })),
    table([
      { label: "Name", value: (s) => s.name },
      { label: "Used / cap", num: true, value: (s) => `${fmt.num(s.utilized)} / ${s.tokens < 0 ? "no cap" : fmt.num(s.tokens)}` },
      { label: "Expires", value: (s) => fmt.date(s.expiresAt) },
      { label: "Actions", cls: "actions", value: (s) => [
        s.tokens >= 0 ? h("button.small", { type: "button", onclick: () => topUp(s), text: "Top up", "aria-label": `Top up ${s.name}` }) : null,
        h("button.small.danger", { type: "button", onclick: () => remove(s), text: "Delete", "aria-label": `Delete ${s.name}` })] },
    ], data, "No shared keys yet."));
}

const RENDER = { overview, keys, models, usage: usagePage, mine };

// --- start ----------------------------------------------------------------------------------
async function start() {
  setupTheme();
  document.getElementById("login-form").addEventListener("submit", login);
  document.getElementById("logout").addEventListener("click", logout);
  window.addEventListener("hashchange", route);
  if (!session.key) return showLogin();
  try {
    await whoami();
  } catch (e) {
    session.clear();
    return showLogin(e.message);
  }
  await route();
}

start();
