// Small DOM helpers: elements built without HTML strings, dialogs, formatting.

// h("tag.class", {attr: value, onclick: fn}, ...children): an element.
export function h(spec, attrs = {}, ...children) {
  const [tag, ...classes] = spec.split(".");
  const el = document.createElement(tag || "div");
  if (classes.length) el.className = classes.join(" ");
  for (const [name, value] of Object.entries(attrs || {})) {
    if (value === undefined || value === null || value === false) continue;
    if (name.startsWith("on")) el.addEventListener(name.slice(2), value);
    else if (name === "text") el.textContent = value;
    else if (value === true) el.setAttribute(name, "");
    else el.setAttribute(name, String(value));
  }
  append(el, children);
  return el;
}

function append(el, children) {
  for (const child of children.flat(Infinity)) {
    if (child === undefined || child === null || child === false) continue;
    el.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
}

export function clear(el, ...children) {
  el.replaceChildren();
  append(el, children);
  return el;
}

const SVG = "http://www.w3.org/2000/svg";
export function s(tag, attrs = {}, ...children) {
  const el = document.createElementNS(SVG, tag);
  for (const [name, value] of Object.entries(attrs)) el.setAttribute(name, String(value));
  for (const child of children.flat()) {
    if (child !== undefined && child !== null) el.append(child instanceof Node ? child : String(child));
  }
  return el;
}

export const fmt = {
  num: (n) => (n === null || n === undefined ? "—" : Number(n).toLocaleString("en-US")),
  compact: (n) => Intl.NumberFormat("en-US", { notation: "compact", maximumFractionDigits: 1 }).format(n),
  usd: (n) => (n === null || n === undefined ? "—" : "$" + Number(n).toFixed(n && Math.abs(n) < 0.01 ? 6 : 2)),
  date: (iso) => (iso ? new Date(iso).toLocaleString("en-GB", { dateStyle: "medium", timeStyle: "short" }) : "—"),
  seconds: (s) => (s >= 3600 ? `${(s / 3600).toFixed(1)} h` : s >= 60 ? `${Math.round(s / 60)} min` : `${Math.round(s)} s`),
};

export function badge(text) {
  return h("span.badge." + String(text).replace(/\s+/g, "-"), { text });
}

export function toast(message) {
  const el = document.getElementById("toast");
  el.textContent = message;
  el.classList.add("show");
  clearTimeout(toast.timer);
  toast.timer = setTimeout(() => el.classList.remove("show"), 3500);
}

// A modal dialog (the browser's <dialog>: the page behind is inert, Tab stays inside,
// Escape closes); focus goes back where it was when it closes.  `build(dialog, close)`
// fills it; answers a promise of the value given to close().
export function modal(title, build) {
  const opener = document.activeElement;
  const heading = h("h2", { id: "dialog-title-" + Math.random().toString(36).slice(2), text: title });
  const dialog = h("dialog", { "aria-labelledby": heading.id }, heading);
  document.body.append(dialog);
  return new Promise((resolve) => {
    let value;
    const close = (v) => { value = v; dialog.close(); };
    dialog.addEventListener("close", () => {
      dialog.remove();
      if (opener && opener.isConnected) opener.focus();
      resolve(value);
    });
    build(dialog, close);
    dialog.showModal();
    const first = dialog.querySelector("[autofocus], input, select, textarea, button.primary, button.danger, button");
    if (first) first.focus();
  });
}

// Yes or no: answers true when confirmed.
export function confirmDialog(title, message, label, danger = false) {
  return modal(title, (dialog, close) => {
    dialog.append(
      h("p", { text: message }),
      h("div.actions-row", {},
        h("button", { type: "button", onclick: () => close(false), text: "Cancel" }),
        h(danger ? "button.danger" : "button.primary", { type: "button", onclick: () => close(true), text: label })),
    );
  }).then((v) => v === true);
}

// A form in a dialog.  `fields`: [{name, label, type, value, hint, required, options}];
// `submit(values)` runs on submit and may throw (its message shows in the dialog);
// answers what it returned, or undefined when cancelled.
export function formDialog(title, fields, label, submit) {
  return modal(title, (dialog, close) => {
    const error = h("p.error", { role: "alert" });
    const form = h("form", { novalidate: true });
    for (const f of fields) {
      const id = "f-" + f.name;
      if (f.type === "note") {
        form.append(h("p", { text: f.label }));
        continue;
      }
      if (f.type === "checkbox") {
        form.append(h("label.check", {}, h("input", { id, name: f.name, type: "checkbox", checked: !!f.value }), f.label));
      } else if (f.type === "select") {
        const select = h("select", { id, name: f.name },
          f.options.map((o) => h("option", { value: o.value ?? o, selected: (o.value ?? o) === f.value, text: o.label ?? o })));
        form.append(h("label", { for: id, text: f.label }), select);
      } else {
        form.append(h("label", { for: id, text: f.label }),
          h("input", { id, name: f.name, type: f.type || "text", value: f.value ?? "", required: f.required,
            autocomplete: "off", inputmode: f.type === "number" ? "numeric" : undefined, "aria-describedby": f.hint ? id + "-hint" : undefined }));
      }
      if (f.hint) form.append(h("p.hint", { id: id + "-hint", text: f.hint }));
    }
    const ok = h("button.primary", { type: "submit", text: label });
    form.append(error, h("div.actions-row", {},
      h("button", { type: "button", onclick: () => close(undefined), text: "Cancel" }), ok));
    form.addEventListener("submit", async (event) => {
      event.preventDefault();
      const values = {};
      for (const f of fields.filter((field) => field.type !== "note")) {
        const input = form.elements[f.name];
        values[f.name] = f.type === "checkbox" ? input.checked : input.value.trim();
        if (f.required && !values[f.name]) {
          error.textContent = `${f.label} is required.`;
          input.focus();
          return;
        }
      }
      ok.disabled = true;
      error.textContent = "";
      try {
        const result = await submit(values);
        if (result !== undefined) close(result);
      } catch (e) {
        error.textContent = e.message;
      } finally {
        ok.disabled = false;
      }
    });
    dialog.append(form);
  });
}

// The secret of a new key, shown this once, with a Copy button.
export function secretDialog(title, secret, note) {
  return modal(title, (dialog, close) => {
    const copy = h("button.primary", {
      type: "button", text: "Copy",
      onclick: async () => {
        try {
          await navigator.clipboard.writeText(secret);
          copy.textContent = "Copied";
        } catch {
          const range = document.createRange();
          range.selectNodeContents(code);
          getSelection().removeAllRanges();
          getSelection().addRange(range);
          copy.textContent = "Selected: press Ctrl+C";
        }
      },
    });
    const code = h("code.secret", { id: "new-secret", text: secret });
    dialog.append(
      h("p.warning", { role: "note" },
        h("strong", { text: "Copy this key now. " }),
        "It is shown this once: the proxy keeps only its SHA-256, and this page forgets it when the dialog closes."),
      code,
      note ? h("p.muted", { text: note }) : null,
      h("div.actions-row", {}, copy, h("button", { type: "button", onclick: () => close(true), text: "Done" })),
    );
  });
}

export function table(columns, rows, empty = "Nothing yet.") {
  if (!rows.length) return h("p.muted", { text: empty });
  return h("div.scroll", {}, h("table", {},
    h("thead", {}, h("tr", {}, columns.map((c) => h("th", { class: c.num ? "num" : c.cls, scope: "col", text: c.label })))),
    h("tbody", {}, rows.map((row) => h("tr", {}, columns.map((c) => {
      const value = c.value(row);
      return h("td", { class: c.num ? "num" : c.cls, "data-label": c.label }, h("span.cell", {}, value));
    }))))));
}
