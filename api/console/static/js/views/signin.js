// Signing in: the key is tried against the API before it is kept, so a wrong key is told at
// once, in words.

import { ApiError, api, session } from "../api.js";
import { h } from "../dom.js";

export function wrongKeyMessage(error) {
  if (error instanceof ApiError && error.status === 401) {
    return "This API key was not accepted. Check that you copied the whole key and that it " +
      "has not been revoked (lorafleet keys list shows the active ones).";
  }
  return error instanceof ApiError ? error.message : "Signing in failed.";
}

/** The sign-in form; `onSignedIn()` runs once a key has been accepted and kept. */
export function signInView({ message, onSignedIn }) {
  const error = h("p", { class: "error", role: "alert", id: "sign-in-error" }, message || "");
  const input = h("input", {
    id: "api-key", name: "api-key", type: "password", autocomplete: "off", spellcheck: "false",
    required: true, "aria-describedby": "api-key-help sign-in-error",
  });
  const button = h("button", { type: "submit" }, "Sign in");
  const form = h("form", { class: "card sign-in", "aria-labelledby": "sign-in-title" },
    h("h1", { id: "sign-in-title", tabindex: "-1" }, "Sign in"),
    h("label", { for: "api-key" }, "API key"),
    input,
    h("p", { class: "help", id: "api-key-help" },
      "Create one with ", h("code", {}, "lorafleet keys create --project NAME"), ". It stays " +
      "in this browser tab (session storage) and is sent only to this API, in the " +
      "Authorization header."),
    button,
    error);
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    const key = input.value.trim();
    if (!key) return;
    button.disabled = true;
    error.textContent = "";
    try {
      await api("/v1/fine_tuning/jobs?limit=1", { key });
      session.signIn(key);
      onSignedIn();
    } catch (e) {
      error.textContent = wrongKeyMessage(e);
      input.focus();
      input.select();
    } finally {
      button.disabled = false;
    }
  });
  return form;
}
