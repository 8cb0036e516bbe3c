/* The runs list: a page of runs from /api/v1/dashboard/runs, filtered, sorted and paged on
 * the server. The filters live in the URL (history.pushState), so a view can be shared and
 * the back button steps through them; the controls follow the URL, never the other way. */
"use strict";

(() => {
  const POLL_MS = 10000;
  const MAX_COMPARE = 6;
  const FILTERS = ["q", "project", "status", "firing", "tag", "sort"];
  const selected = new Set();
  let timer = null;
  let request = 0; // answers to older requests are dropped
  const $ = (id) => document.getElementById(id);

  function params() {
    return new URLSearchParams(location.search);
  }

  /* The controls show what the URL says. */
  function syncControls() {
    const p = params();
    for (const name of FILTERS) {
      const control = $("f-" + name);
      const value = p.get(name) || (name === "sort" ? "started" : "");
      if (control.tagName === "SELECT" && value &&
          ![...control.options].some((o) => o.value === value)) {
        control.append(RG.el("option", { value, text: value })); // a choice not listed yet
      }
      control.value = value;
    }
  }

  /* A filter changed: a new URL (page 1), then the rows. */
  function navigate(changes) {
    const p = params();
    for (const [k, v] of Object.entries(changes)) {
      if (v === "" || v === null || v === undefined) p.delete(k);
      else p.set(k, v);
    }
    if (!("page" in changes)) p.delete("page");
    const query = p.toString();
    history.pushState(null, "", query ? "?" + query : location.pathname);
    load();
  }

  /* SVG parts cloned from runs.html's template (parsed in the SVG namespace there). */
  function svgPart(selector) {
    return $("spark-template").content.querySelector(selector).cloneNode(false);
  }

  function sparkline(s) {
    const w = 120, h = 26, pad = 2;
    const svg = svgPart("svg");
    const values = s.values.map((v) => (typeof v === "number" ? v : NaN));
    const finite = values.filter((v) => Number.isFinite(v));
    if (!s.steps.length || !finite.length) {
      svg.setAttribute("data-points", "0");
      return svg;
    }
    const x0 = s.steps[0], x1 = s.steps[s.steps.length - 1] || x0 + 1;
    const lo = Math.min(...finite), hi = Math.max(...finite);
    const x = (step) => pad + ((step - x0) / Math.max(1, x1 - x0)) * (w - 2 * pad);
    const y = (v) => h - pad - ((v - lo) / (hi - lo || 1)) * (h - 2 * pad);
    let d = "";
    let pen = false;
    values.forEach((v, i) => {
      if (!Number.isFinite(v)) {
        pen = false; // a gap, and a mark where the value was not a number
        const dot = svgPart("circle");
        dot.setAttribute("cx", x(s.steps[i]).toFixed(1));
        dot.setAttribute("cy", pad + 1);
        svg.append(dot);
        return;
      }
      d += (pen ? "L" : "M") + x(s.steps[i]).toFixed(1) + " " + y(v).toFixed(1);
      pen = true;
    });
    const path = svgPart("path");
    path.setAttribute("d", d);
    svg.append(path);
    svg.setAttribute("data-points", String(values.length));
    const title = svgPart("title");
    title.textContent = `loss, ${values.length} points (min and max per bucket), ` +
      `range ${RG.fmt(lo)} – ${RG.fmt(hi)}`;
    svg.append(title);
    return svg;
  }

  function healthTitle(r) {
    const parts = [`${r.rules_assessed} of ${r.rules_total} rules assessed`];
    if (r.rules_pending) parts.push(`${r.rules_pending} with data not assessable yet`);
    if (r.health === "ok") parts.push("every rule with data is clear of its bound");
    return parts.join("; ");
  }

  function nearestCell(n) {
    if (!n) return RG.el("td", { class: "muted", text: "no rule assessed" });
    const cell = RG.el("td", { class: "nearest", title: n.note || "" },
      RG.el("span", { class: "rule", text: n.rule }));
    if (n.firing) cell.append(RG.el("span", { class: "badge firing", text: "firing" }));
    cell.append(RG.el("div", { class: "small muted", text: n.text }));
    return cell;
  }

  function pickCell(r) {
    const box = RG.el("input", { type: "checkbox", "aria-label": "select " + r.name });
    box.checked = selected.has(r.id);
    box.addEventListener("change", () => {
      if (box.checked && selected.size >= MAX_COMPARE) {
        box.checked = false;
        return;
      }
      if (box.checked) selected.add(r.id);
      else selected.delete(r.id);
      showSelection();
    });
    return RG.el("td", { class: "pick" }, box);
  }

  function showSelection() {
    const button = $("compare-selected");
    button.disabled = selected.size < 1;
    button.textContent = selected.size
      ? `Compare selected (${selected.size})` : "Compare selected";
  }

  function render(body) {
    const table = $("runs-table");
    const tbody = table.querySelector("tbody");
    tbody.replaceChildren();
    for (const r of body.data) {
      const link = RG.el("a", { href: "/runs/" + encodeURIComponent(r.id), text: r.name });
      const name = RG.el("td", {}, link);
      if (r.tags.length) name.append(RG.el("div", { class: "small muted", text: r.tags.join(" · ") }));
      tbody.append(RG.el("tr", { "data-run-id": r.id, "data-health": r.health },
        pickCell(r),
        name,
        RG.el("td", { class: "nowrap", text: r.project }),
        RG.el("td", {}, RG.el("span", { class: "badge " + r.status, text: r.status })),
        RG.el("td", { title: healthTitle(r) },
          RG.el("span", { class: "badge health-" + r.health, text: r.health })),
        nearestCell(r.nearest),
        RG.el("td", { class: "spark-cell" }, sparkline(r.sparkline)),
        RG.el("td", { class: "num", text: RG.fmt(r.last_step) }),
        RG.el("td", { class: "num", text: RG.fmt(r.last_loss) }),
        RG.el("td", { class: "num" + (r.alerts_firing > 0 ? " alerting" : ""),
          text: String(r.alerts_firing) }),
        RG.el("td", { class: "nowrap", text: RG.when(r.created_at) })));
    }
    table.hidden = body.data.length === 0;
    const filtered = FILTERS.some((f) => f !== "sort" && params().get(f));
    $("runs-message").textContent = body.data.length ? "" : filtered
      ? "No run matches these filters."
      : "No runs yet: attach a Probe with server=… to a training script.";
    $("runs-count").textContent = `${body.count} run${body.count === 1 ? "" : "s"}`;
    const pages = Math.max(1, Math.ceil(body.count / body.limit));
    $("pager").hidden = pages <= 1;
    $("page-text").textContent = `page ${body.page} of ${pages}`;
    $("page-prev").disabled = body.page <= 1;
    $("page-next").disabled = body.page >= pages;
    $("page-prev").dataset.page = String(body.page - 1);
    $("page-next").dataset.page = String(body.page + 1);
    for (const th of document.querySelectorAll("#runs-table th[data-sort]")) {
      th.classList.toggle("sorted", th.dataset.sort === body.sort);
    }
    fillChoices($("f-project"), body.projects, "all projects");
    fillChoices($("f-tag"), body.tags, "any tag");
    syncControls();
    document.body.dataset.loaded = "1";
    window.__rankguardRenderedAt = performance.now();
    window.__rankguardRendered = true;
  }

  function fillChoices(select, values, none) {
    const have = [...select.options].map((o) => o.value).slice(1).join("\n");
    if (have === values.join("\n")) return;
    select.replaceChildren(RG.el("option", { value: "", text: none }),
      ...values.map((v) => RG.el("option", { value: v, text: v })));
  }

  async function load() {
    clearTimeout(timer);
    const mine = ++request;
    const message = $("runs-message");
    try {
      const resp = await RG.api("/api/v1/dashboard/runs?" + params().toString());
      if (mine !== request) return;
      if (!resp.ok) message.textContent = await RG.errorText(resp);
      else render(await resp.json());
    } catch (e) {
      if (mine === request) message.textContent = "server unreachable: " + e;
    }
    if (mine === request && !document.hidden) timer = setTimeout(load, POLL_MS);
  }

  document.addEventListener("DOMContentLoaded", () => {
    syncControls();
    let typing = null;
    $("f-q").addEventListener("input", () => {
      clearTimeout(typing);
      typing = setTimeout(() => navigate({ q: $("f-q").value.trim() }), 250);
    });
    for (const name of FILTERS.slice(1)) {
      $("f-" + name).addEventListener("change", () => navigate({ [name]: $("f-" + name).value }));
    }
    $("runs-filters").addEventListener("submit", (ev) => {
      ev.preventDefault();
      navigate({ q: $("f-q").value.trim() });
    });
    $("f-reset").addEventListener("click", () => {
      history.pushState(null, "", location.pathname);
      load();
    });
    for (const th of document.querySelectorAll("#runs-table th[data-sort]")) {
      th.addEventListener("click", () => navigate({ sort: th.dataset.sort }));
    }
    for (const id of ["page-prev", "page-next"]) {
      $(id).addEventListener("click", () => navigate({ page: $(id).dataset.page }));
    }
    $("compare-selected").addEventListener("click", () => {
      location.href = "/compare?runs=" + [...selected].map(encodeURIComponent).join(",");
    });
    document.addEventListener("visibilitychange", () => {
      if (!document.hidden) load();
    });
    window.addEventListener("popstate", () => {
      syncControls();
      load();
    });
    load();
  });
})();
