/* The compare page: runs overlaid from /api/v1/dashboard/compare. The runs and the choices
 * (quantity, target, aggregate) live in the URL; the request goes out before plotly.js is
 * compiled (compare.html loads this script first) and drawing waits for it. */
"use strict";

(() => {
  const MAX_RUNS = 6;
  const plotConfig = { responsive: true, displaylogo: false };
  const $ = (id) => document.getElementById(id);
  const domReady = new Promise((resolve) => {
    if (document.readyState !== "loading") resolve();
    else document.addEventListener("DOMContentLoaded", resolve);
  });
  let request = 0;

  function params() {
    return new URLSearchParams(location.search);
  }

  function runIds() {
    return (params().get("runs") || "").split(",").map((s) => s.trim()).filter(Boolean);
  }

  function navigate(changes) {
    const p = params();
    for (const [k, v] of Object.entries(changes)) {
      if (v === "" || v === null || v === undefined) p.delete(k);
      else p.set(k, v);
    }
    history.pushState(null, "", "?" + p.toString().replace(/%2C/g, ","));
    load();
  }

  function fetchCompare() {
    const ids = runIds();
    if (!ids.length) return null;
    const p = params();
    const query = new URLSearchParams({ runs: ids.join(",") });
    for (const k of ["quantity", "target", "agg"]) if (p.get(k)) query.set(k, p.get(k));
    return RG.api("/api/v1/dashboard/compare?" + query.toString().replace(/%2C/g, ","));
  }

  function renderChips(runs) {
    const list = $("compare-runs");
    list.replaceChildren();
    for (const r of runs) {
      const remove = RG.el("button", { type: "button", class: "link-dark", title: "remove",
        "aria-label": "remove " + r.label, text: "×" });
      remove.addEventListener("click", () => {
        navigate({ runs: runIds().filter((id) => id !== r.id).join(",") });
      });
      const swatch = RG.el("span", { class: "swatch" });
      swatch.style.background = r.colour;
      list.append(RG.el("li", { class: "chip", "data-run-id": r.id }, swatch,
        RG.el("a", { href: "/runs/" + encodeURIComponent(r.id), text: r.label }),
        RG.el("span", { class: "badge " + r.status, text: r.status }),
        r.has_data ? "" : RG.el("span", { class: "muted small", text: "no data" }),
        remove));
    }
  }

  function fillSelect(select, values, selected, first) {
    const options = first ? [RG.el("option", { value: "", text: first })] : [];
    for (const v of values) options.push(RG.el("option", { value: v, text: v }));
    select.replaceChildren(...options);
    select.value = selected || "";
  }

  async function draw(figures) {
    for (const f of figures) {
      await Plotly.react($(f.id), f.figure.data || [], f.figure.layout || {}, plotConfig);
    }
  }

  async function load(pending) {
    const mine = ++request;
    const message = $("compare-message");
    const resp = await (pending === undefined ? fetchCompare() : pending);
    performance.mark("rg:response");
    await domReady;
    if (mine !== request) return;
    if (resp === null) {
      message.textContent = "Pick runs to compare: add them below, or select them on the runs page.";
      $("compare-runs").replaceChildren();
      document.body.dataset.rendered = "1";
      return;
    }
    if (!resp.ok) {
      message.textContent = await RG.errorText(resp);
      return;
    }
    const body = await resp.json();
    performance.mark("rg:parsed");
    if (mine !== request) return;
    renderChips(body.runs);
    fillSelect($("c-quantity"), body.quantities, body.quantity, null);
    if (!body.quantities.includes(body.quantity)) {
      $("c-quantity").prepend(RG.el("option", { value: body.quantity, text: body.quantity }));
      $("c-quantity").value = body.quantity;
    }
    const more = body.targets_total > body.targets.length
      ? ` (first ${body.targets.length} of ${body.targets_total})` : "";
    fillSelect($("c-target"), body.targets, body.target, "aggregated over targets" + more);
    $("c-agg").value = params().get("agg") || "";
    $("c-agg").disabled = Boolean(body.target);
    message.textContent = body.runs.length < 2
      ? "Add another run to compare with." : "";
    $("compare-notes").textContent = body.notes.join(" · ");
    await draw(body.figures);
    document.title = "rankguard: compare " + body.runs.map((r) => r.label).join(", ");
    window.__rankguardRenderedAt = performance.now();
    window.__rankguardRendered = true;
    document.body.dataset.rendered = "1";
  }

  async function suggest() {
    const q = $("add-run").value.trim();
    if (q.length < 1) return;
    const resp = await RG.api("/api/v1/dashboard/runs?limit=10&q=" + encodeURIComponent(q));
    if (!resp.ok) return;
    const rows = (await resp.json()).data;
    $("add-run-options").replaceChildren(...rows.map((r) =>
      RG.el("option", { value: r.id, text: `${r.name} · ${r.project} · ${r.status}` })));
  }

  async function addRun(ev) {
    ev.preventDefault();
    const value = $("add-run").value.trim();
    if (!value) return;
    let id = value;
    const option = [...$("add-run-options").options].find((o) => o.value === value);
    if (!option) { // a name typed in full: the newest run of that name
      const resp = await RG.api("/api/v1/dashboard/runs?limit=1&q=" + encodeURIComponent(value));
      const rows = resp.ok ? (await resp.json()).data : [];
      if (!rows.length) {
        $("compare-message").textContent = `No run matches "${value}".`;
        return;
      }
      id = rows[0].id;
    }
    const ids = runIds().filter((x) => x !== id);
    if (ids.length >= MAX_RUNS) {
      $("compare-message").textContent = `At most ${MAX_RUNS} runs: remove one first.`;
      return;
    }
    $("add-run").value = "";
    navigate({ runs: [...ids, id].join(",") });
  }

  const first = fetchCompare();
  if (first) first.catch(() => {});
  domReady.then(() => {
    let typing = null;
    $("add-run").addEventListener("input", () => {
      clearTimeout(typing);
      typing = setTimeout(suggest, 200);
    });
    $("compare-add").addEventListener("submit", (ev) => {
      addRun(ev).catch((e) => { $("compare-message").textContent = String(e); });
    });
    $("c-quantity").addEventListener("change", () =>
      navigate({ quantity: $("c-quantity").value, target: "" }));
    $("c-target").addEventListener("change", () => navigate({ target: $("c-target").value }));
    $("c-agg").addEventListener("change", () => navigate({ agg: $("c-agg").value }));
    window.addEventListener("popstate", () => load());
  });
  load(first).catch((e) => { $("compare-message").textContent = "failed: " + e; });
})();
