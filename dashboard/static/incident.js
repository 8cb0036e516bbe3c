/* The incident page: one alert episode from /api/v1/dashboard/incidents/{id}. Reached from a
 * notification (/incidents/{id}), the run page's alerts table, or Grafana
 * (/runs/{run}/incidents/latest?rule=...: the newest alert of that rule is looked up first). */
"use strict";

(() => {
  const plotConfig = { responsive: true, displaylogo: false };
  const $ = (id) => document.getElementById(id);
  const domReady = new Promise((resolve) => {
    if (document.readyState !== "loading") resolve();
    else document.addEventListener("DOMContentLoaded", resolve);
  });

  /* The alert id: from the URL, or the newest alert of ?rule= on the run. */
  async function alertId() {
    const given = document.body.dataset.alertId;
    if (given) return given;
    const run = document.body.dataset.runId;
    const rule = new URLSearchParams(location.search).get("rule");
    const resp = await RG.api("/api/v1/runs/" + encodeURIComponent(run) + "/alerts?limit=1000");
    if (!resp.ok) throw new Error(await RG.errorText(resp));
    const found = (await resp.json()).data.find((a) => !rule || a.rule_name === rule);
    if (!found) throw new Error(`no incident${rule ? " of rule " + rule : ""} on this run yet`);
    history.replaceState(null, "", "/incidents/" + encodeURIComponent(found.id));
    return found.id;
  }

  function num(v) {
    return RG.fmt(v);
  }

  function renderHead(body) {
    const a = body.alert;
    document.title = `rankguard: ${a.rule} on ${body.run.name}`;
    $("incident-title").textContent = `${a.rule} on ${body.run.name}`;
    const runLink = $("run-link");
    runLink.textContent = body.run.name;
    runLink.href = "/runs/" + encodeURIComponent(body.run.id);
    $("incident-severity").textContent = a.severity;
    $("incident-severity").className = "badge severity-" + a.severity;
    $("incident-state").textContent = a.state;
    $("incident-state").className = "badge " + a.state;
    const o = body.outcome;
    $("incident-outcome").textContent = o.state;
    $("incident-outcome").className = "badge outcome outcome-" + o.state.replace(" ", "-");
    $("outcome-detail").textContent = o.detail;
    const steps = [`trouble began at step ${a.first_step}`, `fired at step ${a.fired_step}`];
    if (a.resolved_step !== null) steps.push(`resolved at step ${a.resolved_step}`);
    steps.push(`episode ${a.episode} of this rule`, `window shown: steps ${body.window[0]}–${body.window[1]}`);
    $("incident-steps").textContent = steps.join(" · ");
    $("incident-message").textContent = a.message;
    $("incident-description").textContent = a.rule_description;
    $("incident-action-text").textContent = a.suggested_action;
    $("incident-action").hidden = !a.suggested_action;
  }

  function renderTargets(body) {
    const tbody = $("targets-table").querySelector("tbody");
    tbody.replaceChildren();
    body.targets.forEach((t, i) => {
      tbody.append(RG.el("tr", { "data-target": t.target },
        RG.el("td", { class: "num", text: String(i + 1) }),
        RG.el("td", { text: t.target }),
        RG.el("td", { class: "num", text: num(t.since) }),
        RG.el("td", { class: "num", text: num(t.value) }),
        RG.el("td", { class: "num", text: num(t.bound) })));
    });
    $("targets-note").textContent = body.targets.length > body.targets_drawn
      ? `The figure draws the ${body.targets_drawn} earliest movers.` : "";
  }

  function beforeAfter(rows) {
    if (!rows.length) return RG.el("td", { class: "muted", text: "–" });
    const list = RG.el("ul", { class: "before-after" });
    for (const r of rows) {
      const change = typeof r.before === "number" && typeof r.after === "number" && r.before
        ? ` (${r.after >= r.before ? "+" : ""}${(100 * (r.after - r.before) / Math.abs(r.before)).toFixed(1)}%)`
        : "";
      list.append(RG.el("li", { title: `step ${num(r.before_step)} → step ${num(r.after_step)}`,
        text: `${r.what}: ${num(r.before)} → ${num(r.after)}${change}` }));
    }
    return RG.el("td", {}, list);
  }

  function renderCommands(commands) {
    const tbody = $("commands-table").querySelector("tbody");
    tbody.replaceChildren();
    for (const c of commands) {
      const args = Object.entries(c.args || {}).map(([k, v]) => `${k}=${v}`).join(" ");
      tbody.append(RG.el("tr", { "data-command-id": c.id, class: "state-row-" + c.state },
        RG.el("td", {}, RG.el("strong", { text: c.kind }), " ",
          RG.el("span", { class: "small muted", text: args })),
        RG.el("td", { text: c.ordered_by_alert ? "this alert's rule" : c.created_by }),
        RG.el("td", { class: "state-" + c.state, text: c.state + (c.error ? ` (${c.error})` : "") }),
        RG.el("td", { class: "num", text: num(c.applied_step) }),
        beforeAfter(c.before_after),
        RG.el("td", { class: "small", text: c.result })));
    }
    $("commands-table").hidden = commands.length === 0;
    $("commands-empty").hidden = commands.length !== 0;
  }

  function renderEvents(events) {
    const tbody = $("events-table").querySelector("tbody");
    tbody.replaceChildren();
    for (const e of events) {
      tbody.append(RG.el("tr", { class: "kind-" + e.kind, "data-kind": e.kind },
        RG.el("td", { class: "num", text: num(e.step) }),
        RG.el("td", { text: e.kind }),
        RG.el("td", { text: e.summary }),
        RG.el("td", { text: RG.when(e.created_at) })));
    }
    if (!events.length) {
      tbody.append(RG.el("tr", {}, RG.el("td", { colspan: "4", class: "muted", text: "No events." })));
    }
  }

  async function draw(figures) {
    // Every container first: a plot sized while it was alone in its row would not shrink.
    const holder = $("incident-figures");
    for (const f of figures) {
      if (!$(f.id)) {
        holder.append(RG.el("section", { class: "card figure-card" },
          RG.el("div", { id: f.id, class: "figure" })));
      }
    }
    for (const f of figures) {
      await Plotly.react($(f.id), f.figure.data || [], f.figure.layout || {}, plotConfig);
    }
  }

  async function load() {
    const id = await alertId();
    const resp = await RG.api("/api/v1/dashboard/incidents/" + encodeURIComponent(id));
    await domReady;
    if (!resp.ok) throw new Error(await RG.errorText(resp));
    const body = await resp.json();
    renderHead(body);
    renderTargets(body);
    renderCommands(body.commands);
    renderEvents(body.events);
    await draw(body.figures);
    window.__rankguardRenderedAt = performance.now();
    window.__rankguardRendered = true;
    document.body.dataset.rendered = "1";
  }

  load().catch(async (e) => {
    await domReady;
    $("incident-title").textContent = "Incident not shown";
    $("outcome-detail").textContent = String(e.message || e);
    document.body.dataset.rendered = "error";
  });
})();
