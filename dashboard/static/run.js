/* The run page: draws the figures the server built (Plotly.react, so a refresh keeps zoom),
 * the alerts and the timeline; polls while the run trains (ETag: an unchanged run costs a
 * 304); and the MSign control (confirm, queue, follow the command until it is final).
 *
 * Load order: this script runs before plotly.js (see run.html) and asks for the figures at
 * once, so the server builds them while the browser compiles plotly.js; drawing waits for
 * DOMContentLoaded (every script has run). Refreshes redraw only the figures whose revision
 * changed, and the poll interval grows with the cost of a refresh and stops while the tab is
 * hidden, so a large run cannot keep the page busy. */
"use strict";

(() => {
  const runId = document.body.dataset.runId;
  const base = "/api/v1/runs/" + encodeURIComponent(runId);
  const LIVE_MS = 3000;   // while the run is running
  const IDLE_MS = 30000;  // finished or failed: only alerts/commands can still change
  const COMMAND_MS = 1000;
  // A refresh may take at most this share of the page's time (fetch, parse and draw).
  const BUSY_SHARE = 0.2;
  const FINAL = new Set(["applied", "failed", "expired", "cancelled"]);
  // The layer heatmaps are what a large model's page is opened for: they are drawn first.
  const DRAW_FIRST = ["fig-stable-rank", "fig-sa-sign-diversity"];
  const plotConfig = { responsive: true, displaylogo: false };
  let etag = null;
  let runStatus = "running";
  let cosineTarget = "";
  let timer = null;
  let lastCostMs = 0;
  const drawn = new Map(); // figure id -> revision on screen
  const $ = (id) => document.getElementById(id);
  const domReady = new Promise((resolve) => {
    if (document.readyState !== "loading") resolve();
    else document.addEventListener("DOMContentLoaded", resolve);
  });

  async function draw(figures) {
    const rank = (f) => {
      const i = DRAW_FIRST.indexOf(f.id);
      return i < 0 ? DRAW_FIRST.length : i;
    };
    const ordered = [...figures].sort((a, b) => rank(a) - rank(b));
    for (const f of ordered) {
      const div = $(f.id);
      if (!div || (f.rev && drawn.get(f.id) === f.rev)) continue;
      await Plotly.react(div, f.figure.data || [], f.figure.layout || {}, plotConfig);
      drawn.set(f.id, f.rev);
      performance.mark("rg:drawn:" + f.id);
    }
  }

  function renderRun(run) {
    runStatus = run.status;
    document.title = "rankguard: " + run.name;
    $("run-title").textContent = run.name;
    $("run-name").textContent = run.name;
    const badge = $("run-status");
    badge.textContent = run.status;
    badge.className = "badge " + run.status;
    $("run-last-step").textContent = RG.fmt(run.last_step);
    $("run-updated").textContent = "updated " + new Date().toLocaleTimeString();
    $("msign-button").disabled = run.status !== "running";
  }

  function renderAlerts(rows) {
    const table = $("alerts-table");
    const body = table.querySelector("tbody");
    body.replaceChildren();
    for (const a of rows) {
      const what = [a.message, a.targets.length ? "targets: " + a.targets.join(", ") : ""]
        .filter(Boolean).join(" — ");
      body.append(RG.el("tr", { class: a.state },
        RG.el("td", { class: "num", text: RG.fmt(a.step) }),
        RG.el("td", {}, RG.el("span", { class: "badge " + a.state, text: a.state })),
        RG.el("td", { text: a.severity }),
        RG.el("td", {}, a.alert_id
          ? RG.el("a", { href: "/incidents/" + encodeURIComponent(a.alert_id), text: a.rule,
            title: "the incident page of this alert" })
          : a.rule),
        RG.el("td", { text: what }),
        RG.el("td", { class: "action" },
          // the runbook is long: one line shown, the rest on demand
          RG.el("details", {},
            RG.el("summary", { text: a.suggested_action.split(/(?<=\.)\s+(?=[A-Z])/)[0] }),
            RG.el("p", { text: a.suggested_action })))));
    }
    table.hidden = rows.length === 0;
    $("alerts-empty").hidden = rows.length !== 0;
  }

  function renderTimeline(rows) {
    const body = $("timeline-table").querySelector("tbody");
    body.replaceChildren();
    for (const e of rows) {
      body.append(RG.el("tr", { class: "kind-" + (e.marker || "none") },
        RG.el("td", { class: "num", text: RG.fmt(e.step) }),
        RG.el("td", { text: e.kind }),
        RG.el("td", { text: e.summary }),
        RG.el("td", { text: RG.when(e.created_at) })));
    }
  }

  function ruleState(m) {
    if (m.firing) return "firing";
    if (m.relative === null) return m.pending ? "not assessed" : "no data";
    if (m.relative < 0) return "tripping";
    return m.relative < 0.25 ? "near" : "clear";
  }

  function renderMargins(body) {
    const badge = $("run-health");
    badge.textContent = body.health;
    badge.className = "badge health-" + body.health;
    const n = body.nearest;
    $("run-nearest").textContent = n ? `nearest to firing: ${n.rule}, ${n.text}` : "";
    const tbody = $("rules-table").querySelector("tbody");
    tbody.replaceChildren();
    for (const m of body.data) {
      const state = ruleState(m);
      tbody.append(RG.el("tr", { "data-rule": m.rule, class: "rule-" + state.replace(" ", "-") },
        RG.el("td", { text: m.rule }),
        RG.el("td", { text: m.severity }),
        RG.el("td", {}, RG.el("span", { class: "badge health-" + state.replace(" ", "-"), text: state })),
        RG.el("td", { text: m.quantity + (m.target ? " · " + m.target : "") }),
        RG.el("td", { text: m.text })));
    }
  }

  async function loadMargins() {
    const resp = await RG.api(base + "/margins");
    if (resp.ok) renderMargins(await resp.json());
  }

  function renderCosineTargets(targets) {
    const select = $("cosine-target");
    if (!select || select.options.length === targets.length + 1) return;
    select.replaceChildren(RG.el("option", { value: "", text: "all targets (summed)" }));
    for (const t of targets) select.append(RG.el("option", { value: t, text: t }));
    select.value = cosineTarget;
  }

  function fetchFigures() {
    const query = cosineTarget ? "?cosine_target=" + encodeURIComponent(cosineTarget) : "";
    const headers = etag ? { "If-None-Match": etag } : {};
    performance.mark("rg:fetch");
    return RG.api(base + "/figures" + query, { headers });
  }

  async function load(pending) {
    const started = performance.now();
    const resp = await (pending || fetchFigures());
    performance.mark("rg:response");
    if (resp.status === 304) return;
    await domReady; // plotly.js and the page's other scripts have run
    if (!resp.ok) {
      $("run-updated").textContent = await RG.errorText(resp);
      return;
    }
    etag = resp.headers.get("ETag");
    const page = await resp.json();
    performance.mark("rg:parsed");
    renderRun(page.run);
    renderAlerts(page.alerts);
    renderTimeline(page.timeline);
    renderCosineTargets(page.cosine_targets);
    loadMargins().catch(() => {}); // beside the figures: a table, not worth a wait
    await draw(page.figures);
    lastCostMs = performance.now() - started;
    window.__rankguardRenderedAt = performance.now();
    window.__rankguardRendered = true;
    document.body.dataset.rendered = "1";
  }

  async function poll(pending) {
    clearTimeout(timer);
    try {
      await load(pending);
    } catch (e) {
      $("run-updated").textContent = "refresh failed: " + e;
    }
    schedule();
  }

  function schedule() {
    clearTimeout(timer);
    if (document.hidden) return; // resumed by visibilitychange
    const every = runStatus === "running" ? LIVE_MS : IDLE_MS;
    timer = setTimeout(poll, Math.max(every, lastCostMs / BUSY_SHARE));
  }

  // --- MSign -------------------------------------------------------------------------

  function msignArgs() {
    const choice = $("msign-targets").value;
    let targets = choice;
    if (choice === "globs") {
      targets = $("msign-globs").value.split(/[\s,]+/).filter(Boolean);
    }
    return { targets, engine: $("msign-engine").value };
  }

  function setState(state, text) {
    const node = $("msign-state");
    node.dataset.state = state;
    node.className = "state-" + state;
    node.textContent = text;
  }

  function describe(args) {
    const targets = Array.isArray(args.targets) ? args.targets.join(", ") : args.targets;
    return `Apply MSign to ${targets} with the ${args.engine} engine on run "` +
      `${$("run-title").textContent}"? This rewrites those weights in the running job ` +
      "at its next step boundary.";
  }

  function askConfirm() {
    const args = msignArgs();
    if (Array.isArray(args.targets) && args.targets.length === 0) {
      setState("invalid", "Enter at least one name glob, e.g. transformer.h.*.attn.*");
      return;
    }
    $("msign-confirm-text").textContent = describe(args);
    $("msign-confirm").hidden = false;
    $("msign-button").hidden = true;
  }

  function closeConfirm() {
    $("msign-confirm").hidden = true;
    $("msign-button").hidden = false;
  }

  async function queue() {
    const args = msignArgs();
    closeConfirm();
    setState("sending", "queueing…");
    const resp = await RG.api(base + "/commands", {
      method: "POST",
      headers: { "Content-Type": "application/json" },
      body: JSON.stringify({ kind: "msign", args }),
    });
    if (resp.status === 403) {
      setState("forbidden", "This token cannot order commands (it needs the operate scope). " +
        "Forget it and enter an operate token to act.");
      return;
    }
    if (!resp.ok) {
      setState("error", "not queued: " + (await RG.errorText(resp)));
      return;
    }
    follow(await resp.json());
  }

  function summary(command) {
    const id = command.id.slice(0, 8);
    let text = `MSign ${id}: ${command.state}`;
    if (command.applied_step !== null && command.applied_step !== undefined) {
      text += ` at step ${command.applied_step}`;
    }
    if (command.error) text += ` (${command.error})`;
    if (command.state === "applied" && command.result) {
      const r = command.result;
      const n = r.targets ? (Array.isArray(r.targets) ? r.targets.length : r.targets) : null;
      if (n !== null) text += ` on ${n} matrices`;
    }
    return text;
  }

  async function follow(command) {
    setState(command.state, summary(command));
    while (!FINAL.has(command.state)) {
      await new Promise((r) => setTimeout(r, COMMAND_MS));
      const resp = await RG.api(base + "/commands/" + encodeURIComponent(command.id));
      if (!resp.ok) {
        setState("error", "lost track of the command: " + (await RG.errorText(resp)));
        return;
      }
      command = await resp.json();
      setState(command.state, summary(command));
    }
    poll(); // the intervention marker appears with the next data
  }

  // The first request goes out now, before plotly.js is even compiled.
  const first = fetchFigures();
  first.catch(() => {}); // reported by poll()

  document.addEventListener("visibilitychange", () => {
    if (document.hidden) clearTimeout(timer);
    else if (etag !== null) poll();
  });

  domReady.then(() => {
    $("msign-targets").addEventListener("change", () => {
      $("msign-globs").hidden = $("msign-targets").value !== "globs";
    });
    $("msign-button").addEventListener("click", askConfirm);
    $("msign-cancel-button").addEventListener("click", closeConfirm);
    $("msign-confirm-button").addEventListener("click", () => {
      queue().catch((e) => setState("error", String(e)));
    });
    const select = $("cosine-target");
    if (select) {
      select.addEventListener("change", () => {
        cosineTarget = select.value;
        etag = null;
        poll();
      });
    }
  });
  poll(first);
})();
