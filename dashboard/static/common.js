/* Shared by the dashboard pages: the token (sessionStorage only, sent as a bearer header,
 * never in a URL), authenticated fetches and small DOM helpers. */
"use strict";

const RG = (() => {
  const KEY = "rankguard.token";
  let pending = null; // the promise of a token the user is being asked for

  function token() {
    return sessionStorage.getItem(KEY);
  }

  function showAuth() {
    const status = document.getElementById("auth-status");
    const forget = document.getElementById("forget-token");
    if (token()) {
      status.textContent = "token set";
      forget.hidden = false;
    } else {
      status.textContent = "";
      forget.hidden = true;
    }
  }

  function forget() {
    sessionStorage.removeItem(KEY);
    showAuth();
  }

  /* Shows the token form and resolves with the token the user submits. */
  function askToken(message) {
    if (pending) return pending;
    const panel = document.getElementById("token-panel");
    const form = document.getElementById("token-form");
    const input = document.getElementById("token-input");
    document.getElementById("token-error").textContent = message || "";
    panel.hidden = false;
    input.focus();
    pending = new Promise((resolve) => {
      form.onsubmit = (ev) => {
        ev.preventDefault();
        const value = input.value.trim();
        if (!value) return;
        sessionStorage.setItem(KEY, value);
        input.value = "";
        panel.hidden = true;
        pending = null;
        showAuth();
        resolve(value);
      };
    });
    return pending;
  }

  /* fetch() with the bearer token; on 401 asks for a token and retries. */
  async function api(path, options = {}) {
    for (;;) {
      const headers = new Headers(options.headers || {});
      const t = token();
      if (t) headers.set("Authorization", "Bearer " + t);
      const resp = await fetch(path, { cache: "no-store", ...options, headers });
      if (resp.status !== 401) return resp;
      const hadToken = Boolean(t);
      forget();
      await askToken(hadToken ? "That token was refused (invalid or revoked)." : "");
    }
  }

  async function errorText(resp) {
    try {
      const body = await resp.json();
      return typeof body.detail === "string" ? body.detail : JSON.stringify(body.detail);
    } catch (e) {
      return resp.status + " " + resp.statusText;
    }
  }

  function el(tag, attrs = {}, ...children) {
    const node = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs)) {
      if (k === "class") node.className = v;
      else if (k === "text") node.textContent = v;
      else node.setAttribute(k, v);
    }
    for (const c of children) node.append(c);
    return node;
  }

  function fmt(value, digits = 4) {
    if (value === null || value === undefined) return "–";
    if (typeof value === "string") return value; // "NaN", "Infinity" from the wire
    if (Number.isInteger(value)) return String(value);
    return Number(value).toPrecision(digits);
  }

  function when(iso) {
    if (!iso) return "";
    const d = new Date(iso);
    return isNaN(d) ? iso : d.toLocaleString();
  }

  document.addEventListener("DOMContentLoaded", () => {
    document.getElementById("forget-token").addEventListener("click", () => {
      forget();
      location.reload();
    });
    showAuth();
  });

  return { api, askToken, forget, token, errorText, el, fmt, when };
})();
