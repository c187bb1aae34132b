// The API key of this tab (sessionStorage only) and the one way the page calls the proxy.
const STORE_KEY = "dialproxy.apiKey";

export const session = {
  get key() { return sessionStorage.getItem(STORE_KEY); },
  set(key) { sessionStorage.setItem(STORE_KEY, key); },
  clear() { sessionStorage.removeItem(STORE_KEY); },
};

export class ApiError extends Error {
  constructor(status, message, body) {
    super(message);
    this.status = status;
    this.body = body;
  }
}

const MEANING = {
  401: "The key is not accepted (unknown, revoked or expired).",
  403: "This key may not do that.",
  404: "Not found.",
  409: "Refused: the config cannot be edited this way.",
  412: "The config file changed since this page read it: reload the list and try again.",
  422: "Refused: the change would not validate.",
  428: "The page did not say which version of the config it edits.",
  429: "Too many requests: try again shortly.",
  503: "A storage the proxy needs is unavailable.",
};

// Calls `path`; answers the parsed JSON (or text), or throws an ApiError with a message a
// person can read (the proxy's own `error.message`, else what the status means).
export async function api(path, { method = "GET", body, etag, key, raw = false } = {}) {
  const headers = { "Api-Key": key ?? session.key ?? "" };
  if (body !== undefined) headers["Content-Type"] = "application/json";
  if (etag) headers["If-Match"] = etag;
  let response;
  try {
    response = await fetch(path, {
      method, headers, body: body === undefined ? undefined : JSON.stringify(body),
      cache: "no-store", credentials: "omit",
    });
  } catch (e) {
    throw new ApiError(0, "The proxy did not answer (" + e.message + ").");
  }
  if (raw && response.ok) return response;
  const text = await response.text();
  let data = text;
  try { data = text ? JSON.parse(text) : null; } catch { /* not JSON */ }
  if (!response.ok) {
    const said = data && data.error && data.error.message;
    let message = said || MEANING[response.status] || `The proxy answered ${response.status}.`;
    if (data && Array.isArray(data.problems) && data.problems.length) {
      message += "\n" + data.problems.map((p) => `${p.path || ""} ${p.message}`.trim()).join("\n");
    }
    throw new ApiError(response.status, message, data);
  }
  return data;
}
