// fx dashboard: the page's only script, served by the dashboard itself (its
// Content-Security-Policy allows no other). It reads the JSON API under
// /api/, follows an experiment's Server-Sent Events, and draws its charts
// as SVG. Everything from the director is put into the page as text
// (textContent, attributes), never as HTML.
"use strict";

// ---------------------------------------------------------------- helpers

const SVGNS = "http://www.w3.org/2000/svg";

function build(ns, tag, attrs, children) {
  const el = ns ? document.createElementNS(ns, tag) : document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === null || v === undefined || v === false) continue;
    if (k === "class") el.setAttribute("class", v);
    else if (k.startsWith("on")) el.addEventListener(k.slice(2), v);
    else el.setAttribute(k, v === true ? "" : String(v));
  }
  for (const c of children.flat(Infinity)) {
    if (c === null || c === undefined || c === false) continue;
    el.append(c instanceof Node ? c : String(c));
  }
  return el;
}
const h = (tag, attrs, ...children) => build(null, tag, attrs, children);
const s = (tag, attrs, ...children) => build(SVGNS, tag, attrs, children);

async function api(path) {
  const r = await fetch(path, { headers: { Accept: "application/json" } });
  let body = null;
  try { body = await r.json(); } catch (_) { /* not JSON */ }
  if (!r.ok) throw new Error((body && body.error) || `${r.status} ${r.statusText}`);
  return body;
}

const enc = encodeURIComponent;

function fmt(v) {
  if (typeof v !== "number") return String(v);
  if (!isFinite(v)) return String(v);
  const a = Math.abs(v);
  if (a !== 0 && (a < 1e-3 || a >= 1e6)) return v.toExponential(2);
  if (a >= 100) return v.toFixed(1);
  return String(Number(v.toPrecision(4)));
}

function when(iso) {
  if (!iso) return "–";
  const t = new Date(iso);
  const secs = Math.round((Date.now() - t.getTime()) / 1000);
  if (secs < 5) return "just now";
  if (secs < 60) return `${secs} s ago`;
  if (secs < 3600) return `${Math.round(secs / 60)} min ago`;
  if (secs < 86400) return `${Math.round(secs / 3600)} h ago`;
  return t.toLocaleDateString();
}
const timeEl = (iso) => h("span", { title: iso ? new Date(iso).toLocaleString() : "" }, when(iso));

const STATE_TONE = {
  PENDING: "amber", QUEUED: "amber", OFFERED: "amber", PAUSED: "amber",
  RUNNING: "blue", FINISHED: "green", FAILED: "red", REJECTED: "red", CANCELLED: "grey",
  INVITED: "grey", ACCEPTED: "blue", DECLINED: "grey", TRAINING: "blue",
  DISCONNECTED: "amber", DROPPED: "red", COMPLETED: "green",
};
const badge = (state, attrs) => h("span", Object.assign({ class: `badge s-${STATE_TONE[state] || "grey"}` }, attrs || {}), state);

function progress(e) {
  const frac = e.rounds > 0 ? Math.min(1, Math.max(0, (e.state === "FINISHED" ? e.rounds : e.round) / e.rounds)) : 0;
  const bar = h("span");
  bar.style.width = `${(frac * 100).toFixed(1)}%`;
  const tone = e.state === "FINISHED" ? " done" : (e.state === "FAILED" ? " bad" : "");
  return h("div", { class: "progress" }, h("div", { class: "bar" + tone }, bar), h("span", { class: "label" }, `${e.round} / ${e.rounds}`));
}

function card(title, ...extra) {
  const body = h("div", { class: "body flush" });
  const count = h("span", { class: "count" });
  const el = h("section", { class: "card" }, h("h2", null, title, count, h("span", { class: "spacer" }), extra), body);
  return { el, body, count };
}

function replace(el, ...children) {
  el.replaceChildren(...children.flat(Infinity).filter((c) => c !== null && c !== undefined && c !== false));
}

const expHref = (e) => `/experiments/${enc(e.owner)}/${enc(e.name)}`;
const shape = (a) => `[${(a || []).join("×")}]`;

// ------------------------------------------------------------------ pages

async function main() {
  const root = document.getElementById("main");
  root.replaceChildren();
  api("/api/identity").then((id) => {
    replace(document.getElementById("whoami"), "as ", h("b", null, id.name), ` (${id.role}) · director `, h("b", null, id.director));
  }).catch(() => {});
  const m = location.pathname.match(/^\/experiments\/([^/]+)\/([^/]+)\/?$/);
  if (m) experimentPage(root, decodeURIComponent(m[1]), decodeURIComponent(m[2]));
  else overviewPage(root);
}

// overviewPage lists the envoys and the experiments, refreshed every few
// seconds while the page is visible.
function overviewPage(root) {
  document.title = "fx dashboard";
  const banner = h("div");
  const envoys = card("Envoys");
  const exps = card("Experiments");
  root.append(banner, envoys.el, exps.el, h("p", { class: "foot" }, "Read-only view, refreshed every 5 s. The dashboard talks to the director with your certificate."));
  async function load() {
    try {
      const [ev, ex] = await Promise.all([api("/api/envoys"), api("/api/experiments")]);
      renderEnvoys(envoys, ev, ex);
      renderExperiments(exps, ex);
      replace(banner);
    } catch (err) {
      replace(banner, h("div", { class: "banner bad" }, `Cannot read from the director: ${err.message}`));
    }
  }
  load();
  setInterval(() => { if (!document.hidden) load(); }, 5000);
}

function renderEnvoys(c, envoys, exps) {
  const online = envoys.filter((e) => e.online).length;
  c.count.textContent = `${online} of ${envoys.length} online`;
  if (envoys.length === 0) { replace(c.body, h("div", { class: "empty" }, "No envoy has registered with the director yet.")); return; }
  const byId = new Map(exps.map((e) => [e.id, e]));
  const rows = envoys.map((e) => h("tr", { "data-envoy": e.name },
    h("td", null, h("b", null, e.name), e.description ? h("div", { class: "muted" }, e.description) : null),
    h("td", null, h("span", { class: "dot " + (e.online ? "on" : "off") }), e.online ? "online" : "offline"),
    h("td", null, timeEl(e.last_seen)),
    h("td", { class: "mono" }, e.version || "–"),
    h("td", null, e.tags.length ? e.tags.map((t) => h("span", { class: "chip" }, t)) : h("span", { class: "muted" }, "–")),
    h("td", { class: "mono" }, shape(e.sample_shape), e.classes ? h("span", { class: "muted" }, ` · ${e.classes} classes`) : null),
    h("td", { class: "num" }, e.train_samples.toLocaleString()),
    h("td", { class: "num" }, e.valid_samples.toLocaleString()),
    h("td", null, e.experiments.length ? e.experiments.map((id) => {
      const x = byId.get(id);
      return x ? h("a", { class: "chip", href: expHref(x) }, x.name) : h("span", { class: "chip", title: id }, "other");
    }) : h("span", { class: "muted" }, "idle")),
  ));
  replace(c.body, h("table", null,
    h("thead", null, h("tr", null, ["Envoy", "Status", "Last seen", "Version", "Tags", "Sample", "Train", "Valid", "Experiments"].map((t, i) => h("th", { class: i === 6 || i === 7 ? "num" : null }, t)))),
    h("tbody", null, rows)));
}

function renderExperiments(c, exps) {
  const running = exps.filter((e) => !e.ended).length;
  c.count.textContent = `${exps.length} · ${running} not ended`;
  if (exps.length === 0) { replace(c.body, h("div", { class: "empty" }, "No experiments yet: submit one with fx experiment submit DIR.")); return; }
  const rows = exps.map((e) => h("tr", { "data-experiment": `${e.owner}/${e.name}` },
    h("td", null, h("a", { href: expHref(e) }, h("b", null, e.name)), h("div", { class: "muted" }, e.owner)),
    h("td", null, badge(e.state), e.reason ? h("div", { class: "muted", title: e.reason }, e.reason.length > 70 ? e.reason.slice(0, 70) + "…" : e.reason) : null),
    h("td", null, progress(e)),
    h("td", null, e.participants.length ? e.participants.map((p) => h("span", { class: `chip`, title: p.reason || p.state }, `${p.envoy} `, badge(p.state))) : h("span", { class: "muted" }, "none yet")),
    h("td", null, e.best ? [h("b", null, fmt(e.best.value)), h("span", { class: "muted" }, ` ${e.best.metric} · round ${e.best.round}`)] : h("span", { class: "muted" }, "–")),
    h("td", null, timeEl(e.created_at)),
  ));
  replace(c.body, h("table", null,
    h("thead", null, h("tr", null, ["Experiment", "State", "Round", "Participants", "Best", "Created"].map((t) => h("th", null, t)))),
    h("tbody", null, rows)));
}

// ------------------------------------------------------------ experiment

// The tasks' series, in drawing order. x is the round that made the model
// the value is about: aggregated_model_validation in round r scores the
// global model of round r - 1 (0: the initial model; the final validation
// after the last round scores the last round's).
const TASKS = {
  aggregated_model_validation: { label: "global model · validation", color: "#1d4ed8", shift: -1 },
  locally_tuned_model_validation: { label: "after local training · validation", color: "#059669", shift: 0 },
  train: { label: "training", color: "#d97706", shift: 0 },
};
const OTHER_COLORS = ["#7c3aed", "#db2777", "#0891b2", "#65a30d"];
const SITE_COLORS = ["#7c3aed", "#db2777", "#0891b2", "#65a30d", "#ea580c", "#475569"];
const SITE_TASK = "aggregated_model_validation";

function taskInfo(task, i) {
  return TASKS[task] || { label: task.replaceAll("_", " "), color: OTHER_COLORS[i % OTHER_COLORS.length], shift: 0 };
}

function metricOrder(a, b) {
  const rank = (m) => (m === "accuracy" ? 0 : m === "loss" ? 1 : 2);
  return rank(a) - rank(b) || a.localeCompare(b);
}

function experimentPage(root, owner, name) {
  document.title = `${name} · fx dashboard`;
  const base = `/api/experiments/${enc(owner)}/${enc(name)}`;
  const st = {
    exp: null, plan: "", lastSeq: 0, perSite: false, ended: false,
    // series: "task|site|metric" -> Map(x -> value); site "" is the aggregate.
    series: new Map(), metrics: new Set(), sites: new Set(), tasks: [],
  };

  const crumbs = h("div", { class: "crumbs" }, h("a", { href: "/" }, "Overview"), " / ", owner, " / ", name);
  const stateSlot = h("span");
  const live = h("span", { class: "live wait" }, h("span", { class: "pulse" }), h("span", null, "connecting…"));
  const title = h("div", { class: "title" }, h("h1", null, name), stateSlot, live);
  const banner = h("div");
  const stats = h("div", { class: "stats" });
  const siteToggle = h("input", { type: "checkbox", id: "per-site" });
  siteToggle.addEventListener("change", () => { st.perSite = siteToggle.checked; drawCharts(); });
  const charts = h("div", { class: "charts", id: "charts" });
  const parts = card("Participants");
  const downloads = card("Models");
  const plan = h("details", { class: "card" }, h("summary", null, "Plan"), h("pre"));
  root.append(crumbs, title, banner, stats,
    h("div", { class: "card" },
      h("h2", null, "Metrics per round", h("span", { class: "spacer" }),
        h("label", { class: "toggle", for: "per-site" }, siteToggle, "each site's global-model validation")),
      h("div", { class: "body" }, charts,
        h("p", { class: "note" }, "Aggregated over the sites, weighted by their samples. x is the round that made the model: the global model's validation at round r scores the model of round r − 1, so its curve starts at 0, the initial model."))),
    parts.el, downloads.el, plan);

  function setLive(kind, text) {
    live.className = `live ${kind}`;
    live.lastChild.textContent = text;
  }

  function showExperiment(e) {
    st.exp = e;
    st.ended = e.ended;
    replace(stateSlot, badge(e.state, { id: "exp-state", "data-state": e.state }));
    const best = e.best
      ? h("div", { class: "stat" }, h("div", { class: "k" }, `Best ${e.best.metric}`), h("div", { class: "v" }, fmt(e.best.value)), h("div", { class: "sub" }, `model of round ${e.best.round}`))
      : h("div", { class: "stat" }, h("div", { class: "k" }, "Best model"), h("div", { class: "v muted" }, "–"), h("div", { class: "sub" }, "none yet"));
    const active = e.participants.filter((p) => p.state === "TRAINING" || p.state === "COMPLETED").length;
    replace(stats,
      h("div", { class: "stat" }, h("div", { class: "k" }, "Round"), h("div", { class: "v" }, `${e.round} / ${e.rounds}`), progress(e).firstChild),
      best,
      h("div", { class: "stat" }, h("div", { class: "k" }, "Participants"), h("div", { class: "v" }, String(e.participants.length)), h("div", { class: "sub" }, `${active} training or completed`)),
      h("div", { class: "stat" }, h("div", { class: "k" }, "Owner · created"), h("div", { class: "v", title: e.id }, e.owner), h("div", { class: "sub" }, timeEl(e.created_at), " · updated ", timeEl(e.updated_at))));
    if (e.reason) {
      const tone = e.state === "FAILED" || e.state === "REJECTED" ? "bad" : e.state === "FINISHED" ? "info" : "warn";
      replace(banner, h("div", { class: `banner ${tone}` }, e.reason));
    } else replace(banner);
    renderParticipants();
    renderDownloads();
    drawCharts();
  }

  function renderParticipants() {
    const e = st.exp;
    parts.count.textContent = String(e.participants.length);
    if (!e.participants.length) { replace(parts.body, h("div", { class: "empty" }, "No envoy has been offered the experiment yet.")); return; }
    replace(parts.body, h("table", null,
      h("thead", null, h("tr", null, ["Envoy", "State", "Last round", "Next task", "Updated", "Reason"].map((t, i) => h("th", { class: i === 2 ? "num" : null }, t)))),
      h("tbody", null, e.participants.map((p) => h("tr", { "data-envoy": p.envoy },
        h("td", null, h("b", null, p.envoy)), h("td", null, badge(p.state)),
        h("td", { class: "num" }, p.last_round >= 0 ? String(p.last_round) : "–"),
        h("td", { class: "mono" }, p.task || "–"), h("td", null, timeEl(p.updated_at)),
        h("td", { class: "muted" }, p.reason || ""))))));
  }

  function renderDownloads() {
    const e = st.exp;
    const hasBest = !!e.best;
    const hasLast = e.ended ? e.round >= 1 : e.round >= 2;
    const link = (which, label, sub, ok) => h("a", {
      class: "dl" + (ok ? "" : " disabled"), id: `download-${which}`, href: ok ? `${base}/model/${which}` : null,
      download: ok ? "" : null, "aria-disabled": ok ? null : "true",
    }, h("b", null, label), h("span", null, sub));
    replace(downloads.body, h("div", { class: "body" }, h("div", { class: "downloads" },
      link("best", "Best model", hasBest ? `round ${e.best.round} · ${e.best.metric} ${fmt(e.best.value)} · safetensors` : "after the first validated round", hasBest),
      link("last", "Latest model", hasLast ? `last completed round · safetensors` : "after the first completed round", hasLast)),
    h("p", { class: "note" }, "Streamed from the director with your certificate; the size and sha256 are checked before the download completes.")));
  }

  function addMetric(ev) {
    if (ev.sequence <= st.lastSeq) return;
    st.lastSeq = ev.sequence;
    if (!st.tasks.includes(ev.task)) st.tasks.push(ev.task);
    if (ev.collaborator) st.sites.add(ev.collaborator);
    const x = ev.round + taskInfo(ev.task, 0).shift;
    for (const [metric, raw] of Object.entries(ev.metrics)) {
      const v = typeof raw === "number" ? raw : Number(raw);
      st.metrics.add(metric);
      const key = `${ev.task}|${ev.collaborator}|${metric}`;
      if (!st.series.has(key)) st.series.set(key, new Map());
      st.series.get(key).set(x, v);
    }
  }

  let drawPending = false;
  function drawCharts() {
    if (drawPending) return;
    drawPending = true;
    requestAnimationFrame(() => { drawPending = false; renderCharts(); });
  }

  function renderCharts() {
    const metrics = [...st.metrics].sort(metricOrder);
    if (!metrics.includes("accuracy")) metrics.unshift("accuracy");
    if (!metrics.includes("loss")) metrics.splice(1, 0, "loss");
    const tasks = [...st.tasks].sort((a, b) => {
      const ka = Object.keys(TASKS), ia = ka.indexOf(a), ib = ka.indexOf(b);
      return (ia < 0 ? 99 : ia) - (ib < 0 ? 99 : ib) || a.localeCompare(b);
    });
    const sites = [...st.sites].sort();
    replace(charts, metrics.map((metric) => {
      const lines = [];
      tasks.forEach((task, i) => {
        const pts = st.series.get(`${task}||${metric}`);
        if (pts && pts.size) lines.push({ label: taskInfo(task, i).label, color: taskInfo(task, i).color, pts, site: false });
      });
      if (st.perSite) {
        sites.forEach((site, i) => {
          const pts = st.series.get(`${SITE_TASK}|${site}|${metric}`);
          if (pts && pts.size) lines.push({ label: `${site} · global model`, color: SITE_COLORS[i % SITE_COLORS.length], pts, site: true });
        });
      }
      return chartCard(metric, lines, st.exp ? st.exp.rounds : 1);
    }));
  }

  function connect() {
    const es = new EventSource(`${base}/events${st.lastSeq ? `?after=${st.lastSeq}` : ""}`);
    es.addEventListener("open", () => setLive("on", "live"));
    es.addEventListener("experiment", (m) => showExperiment(JSON.parse(m.data)));
    es.addEventListener("metric", (m) => { addMetric(JSON.parse(m.data)); drawCharts(); });
    es.addEventListener("end", (m) => {
      es.close();
      showExperiment(JSON.parse(m.data));
      setLive("", "experiment ended");
    });
    es.addEventListener("problem", (m) => {
      replace(banner, h("div", { class: "banner bad" }, `Following the experiment failed: ${JSON.parse(m.data).error}`));
    });
    es.addEventListener("error", () => {
      if (es.readyState === EventSource.CLOSED) {
        setLive("wait", "disconnected · retrying");
        setTimeout(connect, 5000);
      } else setLive("wait", "reconnecting…");
    });
  }

  api(base).then((e) => {
    plan.querySelector("pre").textContent = e.plan_yaml || "";
    showExperiment(e);
    connect();
  }).catch((err) => {
    replace(banner, h("div", { class: "banner bad" }, `Cannot read experiment ${owner}/${name}: ${err.message}`));
    setLive("", "not found");
  });
  drawCharts();
}

// --------------------------------------------------------------- charts

const W = 560, H = 250, M = { l: 50, r: 16, t: 14, b: 34 };

function niceStep(span, count) {
  const raw = span / Math.max(1, count);
  const mag = Math.pow(10, Math.floor(Math.log10(raw)));
  const n = raw / mag;
  return (n < 1.5 ? 1 : n < 3 ? 2 : n < 7 ? 5 : 10) * mag;
}

// chartCard draws one metric's lines. The SVG carries data-metric and
// data-points: the number of rounds (x ≥ 1) with an aggregated value, which
// tests wait on.
function chartCard(metric, lines, rounds) {
  const agg = lines.filter((l) => !l.site);
  const xs = new Set();
  for (const l of agg) for (const x of l.pts.keys()) if (x >= 1) xs.add(x);
  const values = [];
  let xmax = Math.max(1, rounds);
  for (const l of lines) for (const [x, v] of l.pts) { if (isFinite(v)) values.push(v); xmax = Math.max(xmax, x); }

  const svg = s("svg", {
    class: "chart", viewBox: `0 0 ${W} ${H}`, role: "img", "aria-label": `${metric} per round`,
    "data-metric": metric, "data-points": xs.size,
  });
  const pw = W - M.l - M.r, ph = H - M.t - M.b;
  let lo = values.length ? Math.min(...values) : 0, hi = values.length ? Math.max(...values) : 1;
  if (hi - lo < 1e-9) { lo -= 0.5 * (Math.abs(lo) || 1) * 0.1; hi += 0.5 * (Math.abs(hi) || 1) * 0.1; }
  const min = lo, max = hi, pad = (hi - lo) * 0.08;
  lo -= pad; hi += pad;
  // Non-negative metrics (loss) start at 0 when they come near it; an
  // accuracy never goes past 1.
  if (values.every((v) => v >= 0)) lo = min < (max - min) * 0.5 ? 0 : Math.max(0, lo);
  if (/acc/i.test(metric) && values.every((v) => v <= 1)) hi = Math.min(1, hi);
  const step = niceStep(hi - lo, 4);
  lo = Math.floor(lo / step) * step;
  hi = Math.ceil(hi / step) * step;
  const X = (x) => M.l + (x / xmax) * pw;
  const Y = (v) => M.t + ph - ((v - lo) / (hi - lo)) * ph;

  for (let v = lo; v <= hi + step / 2; v += step) {
    svg.append(s("line", { class: "grid", x1: M.l, x2: W - M.r, y1: Y(v), y2: Y(v) }));
    svg.append(s("text", { x: M.l - 8, y: Y(v) + 4, "text-anchor": "end" }, fmt(Number(v.toPrecision(6)))));
  }
  const xstep = Math.max(1, Math.ceil(niceStep(xmax, 8)));
  for (let x = 0; x <= xmax; x += xstep) {
    svg.append(s("line", { class: "axis", x1: X(x), x2: X(x), y1: M.t + ph, y2: M.t + ph + 4 }));
    svg.append(s("text", { x: X(x), y: M.t + ph + 17, "text-anchor": "middle" }, String(x)));
  }
  svg.append(s("line", { class: "axis", x1: M.l, x2: W - M.r, y1: M.t + ph, y2: M.t + ph }));
  svg.append(s("text", { x: M.l + pw / 2, y: H - 3, "text-anchor": "middle" }, "round"));

  if (!lines.length) {
    svg.append(s("text", { class: "waiting", x: M.l + pw / 2, y: M.t + ph / 2, "text-anchor": "middle" }, "waiting for the first round…"));
  }
  // Sites first, so the aggregates are drawn over them.
  for (const l of [...lines.filter((l) => l.site), ...agg]) {
    const pts = [...l.pts].filter(([, v]) => isFinite(v)).sort((a, b) => a[0] - b[0]);
    if (!pts.length) continue;
    svg.append(s("path", {
      class: "line" + (l.site ? " site" : ""), stroke: l.color,
      d: pts.map(([x, v], i) => `${i ? "L" : "M"}${X(x).toFixed(1)},${Y(v).toFixed(1)}`).join(""),
    }));
    for (const [x, v] of pts) {
      svg.append(s("circle", { cx: X(x).toFixed(1), cy: Y(v).toFixed(1), r: l.site ? 2 : 3.2, fill: l.site ? l.color : "#fff", stroke: l.color, "stroke-width": l.site ? 0 : 2 },
        s("title", null, `${l.label}, model of round ${x}: ${fmt(v)}`)));
    }
  }

  const legend = h("div", { class: "legend" }, lines.map((l) => {
    const sw = h("span", { class: "sw" + (l.site ? " site" : "") });
    if (l.site) sw.style.borderColor = l.color; else sw.style.background = l.color;
    const last = [...l.pts].sort((a, b) => b[0] - a[0])[0];
    return h("span", null, sw, l.label, last ? h("span", { class: "last" }, fmt(last[1])) : null);
  }));
  const titleText = metric.charAt(0).toUpperCase() + metric.slice(1).replaceAll("_", " ");
  return h("section", { class: "card", "data-chart": metric }, h("h2", null, titleText), h("div", { class: "body" }, svg), legend);
}

main();
