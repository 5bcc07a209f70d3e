// The public /v1 API, called with the signed-in key. The key lives in this tab's
// sessionStorage only: it goes in the Authorization header, never in a URL, and is gone when
// the tab closes.

const KEY_NAME = "lorafleet.apiKey";

export const session = {
  get key() {
    return sessionStorage.getItem(KEY_NAME);
  },
  signIn(key) {
    sessionStorage.setItem(KEY_NAME, key);
  },
  signOut() {
    sessionStorage.removeItem(KEY_NAME);
  },
};

/** An error answer of the API (OpenAI's shape), or no answer at all (status 0). */
export class ApiError extends Error {
  constructor(status, message, code = null, param = null) {
    super(message);
    this.name = "ApiError";
    this.status = status;
    this.code = code;
    this.param = param;
  }
}

export const NETWORK_ERROR = "The API did not answer: is the service running, and is this " +
  "page served by it?";

/** Turn an error response into an ApiError with the API's own message. */
export async function errorOf(response) {
  let message = `The API answered ${response.status} ${response.statusText}`.trim();
  let code = null;
  let param = null;
  try {
    const body = await response.json();
    if (body && body.error && typeof body.error.message === "string") {
      ({ message } = body.error);
      code = body.error.code || null;
      param = body.error.param || null;
    }
  } catch {
    // Not JSON (a proxy's page, say): the status line says enough.
  }
  return new ApiError(response.status, message, code, param);
}

/**
 * fetch() with the key; resolves to the raw Response when it is 2xx, else throws ApiError.
 * A 401 with the session's key signs out (the key was revoked) through the "unauthorized" event.
 */
export async function send(path, { method = "GET", json, form, key, signal } = {}) {
  const usingSession = key === undefined;
  const headers = { Authorization: `Bearer ${usingSession ? session.key : key}` };
  let body;
  if (form) {
    body = form;
  } else if (json !== undefined) {
    headers["Content-Type"] = "application/json";
    body = JSON.stringify(json);
  }
  let response;
  try {
    response = await fetch(path, { method, headers, body, signal, cache: "no-store",
      credentials: "omit" });
  } catch (e) {
    if (e && e.name === "AbortError") throw e;
    throw new ApiError(0, NETWORK_ERROR, "network_error");
  }
  if (response.ok) return response;
  const error = await errorOf(response);
  if (error.status === 401 && usingSession) {
    window.dispatchEvent(new CustomEvent("lorafleet:unauthorized", { detail: error }));
  }
  throw error;
}

/**
 * The service's /health (public: no key is sent): whether the database and the broker answer,
 * and which inference engine serves and why. Its body is read whatever the status: a 503 says
 * what is wrong as well.
 */
export async function health({ signal } = {}) {
  let response;
  try {
    response = await fetch("/health", { signal, cache: "no-store", credentials: "omit" });
  } catch (e) {
    if (e && e.name === "AbortError") throw e;
    throw new ApiError(0, NETWORK_ERROR, "network_error");
  }
  try {
    return await response.json();
  } catch {
    throw new ApiError(response.status, `/health answered ${response.status}`);
  }
}

/** A JSON call: api("/v1/models"), api(path, {method: "POST", json: {...}}). */
export async function api(path, options) {
  const response = await send(path, options);
  return response.json();
}

/** A query string from an object, skipping empty values. */
export function query(params) {
  const q = new URLSearchParams();
  for (const [k, v] of Object.entries(params)) {
    if (v !== undefined && v !== null && v !== "") q.set(k, String(v));
  }
  const s = q.toString();
  return s ? `?${s}` : "";
}

/** Every page of a list endpoint (newest first), up to `maxPages` pages of `limit`. */
export async function listAll(path, { limit = 100, maxPages = 50, signal } = {}) {
  const items = [];
  let after;
  for (let page = 0; page < maxPages; page += 1) {
    const body = await api(path + query({ limit, after }), { signal });
    items.push(...body.data);
    if (!body.has_more || body.data.length === 0) break;
    after = body.data[body.data.length - 1].id;
  }
  return items;
}
