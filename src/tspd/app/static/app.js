// tspd dashboard: one page, no dependencies. Talks to the JSON API of `tspd serve` (README, "Dashboard").
"use strict";

const state = {
  run: null, info: null, prompt: "", analysis: null, pos: 0,
  ablations: [],            // [{site, idx, positions: null | [p]}]
  sub: null,                // {site, idx} shown in the subcomponent view
  listSite: null,           // the site whose subcomponents the list shows
  ablationResult: null, ablationPos: 0,
};
// Every user interaction's time from the event to the updated page, read by the browser test.
window.tspdTimings = [];

const $ = (id) => document.getElementById(id);
const COLORS = ["#4f46e5", "#0ea5e9", "#f59e0b", "#10b981", "#ef4444", "#8b5cf6", "#ec4899", "#14b8a6", "#64748b", "#a16207"];

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (v === undefined || v === null || v === false) continue;
    if (k === "class") node.className = v;
    else if (k === "text") node.textContent = v;
    else if (k.startsWith("on")) node.addEventListener(k.slice(2), v);
    else if (k === "style") node.style.cssText = v;
    else node.setAttribute(k, v === true ? "" : v);
  }
  for (const c of children.flat()) if (c !== null && c !== undefined) node.append(c instanceof Node ? c : String(c));
  return node;
}
const svgEl = (tag, attrs = {}) => {
  const node = document.createElementNS("http://www.w3.org/2000/svg", tag);
  for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, v);
  return node;
};
const fmt = (x, d = 3) => x === null || x === undefined ? "–" : (x !== 0 && (Math.abs(x) < 1e-3 || Math.abs(x) >= 1e5) ? x.toExponential(2) : Number(x.toPrecision(d)).toString());
const pct = (x) => (100 * x).toFixed(x < 0.01 ? 2 : 1) + "%";
// An output value: a probability as a percentage (tiny ones in scientific notation), else a number.
function fmtOut(x) {
  if (state.info.output_kind !== "distribution") return fmt(x);
  const v = 100 * x;
  return v === 0 || Math.abs(v) >= 1e-3 ? `${Number(v.toPrecision(3))}%` : `${v.toExponential(1)}%`;
}
function niceTicks(lo, hi, n = 5) {
  const raw = (hi - lo) / n, mag = 10 ** Math.floor(Math.log10(raw));
  const step = [1, 2, 5, 10].map((m) => m * mag).find((s) => s >= raw);
  const out = [];
  for (let t = Math.ceil(lo / step) * step; t <= hi + step * 1e-9; t += step) out.push(Number(t.toPrecision(12)));
  return out;
}
const ciColor = (g) => `rgba(79, 70, 229, ${0.06 + 0.94 * Math.max(0, Math.min(1, g))})`;
const ciInk = (g) => g > 0.55 ? "#fff" : "inherit";
const subName = (site, idx) => `${site}:${idx}`;
// Requests of one view answer out of order when the user clicks fast: each view keeps only the
// answer to its latest request (`const current = ticket("view")`, then `if (!current()) return`).
const tickets = {};
function ticket(view) {
  const t = (tickets[view] = (tickets[view] || 0) + 1);
  return () => tickets[view] === t;
}
// Largest and smallest of an array by a loop: Math.max(...xs) overflows the call stack on long
// arrays (a metrics log of 150k steps).
function maxOf(xs, start = -Infinity) { let m = start; for (const x of xs) if (x > m) m = x; return m; }
function minOf(xs, start = Infinity) { let m = start; for (const x of xs) if (x < m) m = x; return m; }

// ---- API ----------------------------------------------------------------------------------
async function api(path, body, run = state.run) {
  const sep = path.includes("?") ? "&" : "?";
  const url = run ? `${path}${sep}run=${encodeURIComponent(run)}` : path;
  const res = await fetch(url, body === undefined ? {} : {
    method: "POST", headers: {"Content-Type": "application/json"}, body: JSON.stringify(body),
  });
  const data = await res.json();
  if (!res.ok) throw new Error(data.error || `HTTP ${res.status}`);
  return data;
}

async function timed(action, fn) {
  const t0 = performance.now();
  let ok = true;
  try {
    showError(null);
    await fn();
  } catch (err) {
    ok = false;
    showError(err.message);
  } finally {
    const ms = performance.now() - t0;
    window.tspdTimings.push({action, ms: Math.round(ms * 10) / 10, ok});
    $("status").textContent = `${action}: ${ms.toFixed(0)} ms`;
  }
}

function showError(message) {
  const box = $("error");
  box.hidden = !message;
  box.textContent = message || "";
}

// ---- tabs ---------------------------------------------------------------------------------
function showTab(name) {
  if (!document.getElementById(`tab-${name}`)) name = "overview";  // an unknown #hash
  for (const b of document.querySelectorAll("#tabs button")) b.classList.toggle("active", b.dataset.tab === name);
  for (const s of document.querySelectorAll("section.tab")) s.hidden = s.id !== `tab-${name}`;
  if (location.hash !== `#${name}`) history.replaceState(null, "", `#${name}`);
}

// ---- overview -----------------------------------------------------------------------------
function card(k, v, small) { return el("div", {class: "card"}, el("div", {class: "k", text: k}), el("div", {class: small ? "v small" : "v", text: v})); }

function renderSummary(info, metrics, tables) {
  const cards = [card("target", info.target_kind || "Python API", true),
                 card("sites", info.sites.length), card("subcomponents", info.sites.reduce((a, s) => a + s.C, 0))];
  const steps = metrics.train.step;
  if (steps.length) cards.push(card("steps logged", steps[steps.length - 1] + 1));
  const ev = tables.eval;
  if (ev) {
    cards.push(card("L0 (active per token)", fmt(ev.l0_total)));
    cards.push(card("alive subcomponents", ev.alive_total));
    if (ev.ci_masked_recon !== undefined) cards.push(card(`CI-masked ${ev.divergence}`, fmt(ev.ci_masked_recon)));
    cards.push(card("faithfulness", fmt(ev.faithfulness)));
  }
  const h = info.harvest;
  cards.push(card("harvest", !h ? "not yet" : h.error ? "damaged: run tspd harvest again" : `${h.n_examples} examples${h.stale ? " (stale)" : ""}`, true));
  $("summary").replaceChildren(...cards);
}

// The points of a series worth drawing: (x, y) with y shown on this axis, and for a long series at
// most ~2 per pixel column (each column's first, lowest and highest point and its last, in order),
// so a spike survives and a 100k-step log draws as fast as a short one.
function drawnPoints(s, logY, columns) {
  const pts = [];
  for (let i = 0; i < s.x.length; i++) {
    const x = s.x[i], y = s.y[i];
    if (x === null || x === undefined || y === null || y === undefined || (logY && y <= 0)) continue;
    pts.push([x, logY ? Math.log10(y) : y]);
  }
  if (pts.length <= 4 * columns) return pts;
  const out = [], per = pts.length / columns;
  for (let c = 0; c < columns; c++) {
    const lo = Math.floor(c * per), hi = Math.min(pts.length, Math.floor((c + 1) * per));
    if (hi <= lo) continue;
    let a = lo, b = lo;
    for (let i = lo; i < hi; i++) { if (pts[i][1] < pts[a][1]) a = i; if (pts[i][1] > pts[b][1]) b = i; }
    for (const i of [...new Set([lo, Math.min(a, b), Math.max(a, b), hi - 1])]) out.push(pts[i]);
  }
  return out;
}

function lineChart(title, series, {logY = false, yLabel = ""} = {}) {
  const W = 460, H = 220, L = 52, R = 10, T = 10, B = 28;
  const drawn = series.map((s) => drawnPoints(s, logY, W - L - R));
  const box = el("div", {class: "chart"}, el("h3", {text: title}));
  if (!drawn.some((pts) => pts.length)) { box.append(el("div", {class: "none", text: "no data"})); return box; }
  let [x0, x1, y0, y1] = [Infinity, -Infinity, Infinity, -Infinity];
  for (const pts of drawn) for (const [x, y] of pts) { x0 = Math.min(x0, x); x1 = Math.max(x1, x); y0 = Math.min(y0, y); y1 = Math.max(y1, y); }
  if (x1 === x0) x1 = x0 + 1;
  if (y1 === y0) { y0 -= 0.5; y1 += 0.5; }
  if (logY) { y0 = Math.floor(y0); y1 = Math.ceil(y1); } else if (y0 > 0) y0 = 0;
  const sx = (x) => L + (x - x0) / (x1 - x0) * (W - L - R), sy = (y) => T + (1 - (y - y0) / (y1 - y0)) * (H - T - B);
  const svg = svgEl("svg", {viewBox: `0 0 ${W} ${H}`});
  const ticks = logY ? Array.from({length: y1 - y0 + 1}, (_, i) => y0 + i).filter((_, i, a) => a.length <= 7 || i % 2 === 0)
                     : niceTicks(y0, y1, 4);
  for (const t of ticks) {
    svg.append(svgEl("line", {class: "grid", x1: L, x2: W - R, y1: sy(t), y2: sy(t)}));
    const lab = svgEl("text", {x: L - 6, y: sy(t) + 3, "text-anchor": "end"});
    lab.textContent = logY ? `1e${t}` : fmt(t, 2);
    svg.append(lab);
  }
  for (const x of niceTicks(x0, x1, 5)) {
    const lab = svgEl("text", {x: sx(x), y: H - 10, "text-anchor": sx(x) > W - R - 15 ? "end" : "middle"});
    lab.textContent = x;
    svg.append(lab);
  }
  svg.append(svgEl("line", {class: "axis", x1: L, x2: L, y1: T, y2: H - B}), svgEl("line", {class: "axis", x1: L, x2: W - R, y1: H - B, y2: H - B}));
  const legend = el("div", {class: "legend"});
  series.forEach((s, k) => {
    const color = COLORS[k % COLORS.length];
    const d = [];
    for (const [x, y] of drawn[k]) d.push(`${d.length ? "L" : "M"}${sx(x).toFixed(1)},${sy(y).toFixed(1)}`);
    svg.append(svgEl("path", {d: d.join(""), fill: "none", stroke: color, "stroke-width": 1.6}));
    legend.append(el("span", {}, el("i", {style: `background:${color}`}), s.name));
  });
  box.append(svg, legend);
  if (yLabel) box.append(el("div", {class: "note", text: yLabel}));
  return box;
}

function shortSite(name) { return name.replace(/^blocks\./, "b").replace(/attn\./, "").replace(/\.?(q|k|v|o)_proj$/, ".$1"); }

function renderCharts(m) {
  const t = m.train, ev = m.eval, charts = [];
  const losses = Object.entries(t.losses).map(([name, y]) => ({name, x: t.step, y}));
  charts.push(lineChart("Losses", losses, {logY: true}));
  charts.push(lineChart("L0 per site (training batch)", Object.entries(t.l0).map(([name, y]) => ({name: shortSite(name), x: t.step, y}))));
  if (ev.step.length) {
    charts.push(lineChart("Alive subcomponents (evaluation)", Object.entries(ev.alive).map(([name, y]) => ({name: shortSite(name), x: ev.step, y}))));
    charts.push(lineChart("Reconstruction (evaluation)", Object.entries(ev.recon).map(([name, y]) => ({name, x: ev.step, y})), {logY: true}));
  }
  $("charts").replaceChildren(...charts);
}

function dataTable(header, rows, hi = () => false) {
  return el("table", {class: "data"}, el("tr", {}, header.map((h) => el("th", {text: h}))),
    rows.map((r, i) => el("tr", {}, r.map((c, j) => el("td", {class: hi(i, j) ? "hi" : null},
      typeof c === "boolean" ? el("span", {class: c ? "ok" : "fail", text: c ? "pass" : "FAIL"}) : (typeof c === "number" ? fmt(c) : (c ?? "–")))))));
}

// Scalar leaves of a JSON object as (dotted key, value) rows; lists are summarised by their length.
function flatRows(obj, prefix = "", depth = 0) {
  return Object.entries(obj).flatMap(([k, v]) => {
    const key = prefix ? `${prefix}.${k}` : k;
    if (Array.isArray(v)) return [[key, `list of ${v.length}`]];
    if (v !== null && typeof v === "object") return depth < 3 ? flatRows(v, key, depth + 1) : [];
    return [[key, v]];
  });
}

function renderTables(tables) {
  const parts = [];
  if (tables.census) {
    const c = tables.census;
    parts.push(el("h3", {text: `Circuit census (active: CI > ${c.threshold}, ${c.n_sequences} held-out sequences)`}));
    parts.push(dataTable(["site", ...c.roles, "distinct"],
      Object.entries(c.sites).map(([s, r]) => [s, ...c.roles.map((k) => r.mean_active[k]), r.distinct_active]),
      (i, j) => { const r = Object.values(c.sites)[i]; return j > 0 && j <= c.roles.length && c.roles[j - 1] === r.expected_role; }));
    parts.push(el("p", {class: "note", text: `total distinct ${c.total_distinct}; accuracy target ${fmt(c.accuracy.target, 4)}, CI-masked ${fmt(c.accuracy.ci_masked, 4)}; CI-masked KL ${fmt(c.recon_kl_ci_masked)}`}));
  }
  if (tables.causal) {
    const c = tables.causal;
    parts.push(el("h3", {text: "Causal check: accuracy after removing a site's active subcomponents"}));
    parts.push(dataTable(["site", "removed", "accuracy (active removed)", "accuracy (control)"],
      Object.entries(c.sites).map(([s, r]) => [s, r.ablated.length, r.active.accuracy, r.control ? r.control.accuracy : null])));
  }
  if (tables.baseline) {
    const b = tables.baseline;
    parts.push(el("h3", {text: "SVD baseline"}), el("p", {class: "note",
      text: `greedy rank-1 SVD needs ${b.pieces_needed ?? "more than all"} of ${b.available_pieces} pieces to reach SPD's KL ${fmt(b.spd_kl)}; SPD activates ${fmt(b.spd_active_per_input)} per sequence`}));
  }
  for (const name of ["facts", "results"]) {
    if (tables[name]) parts.push(el("details", {}, el("summary", {text: `${name}.json`}), dataTable(["key", "value"], flatRows(tables[name]))));
  }
  $("tables-panel").hidden = !parts.length;
  $("tables").replaceChildren(...parts);
}

function renderOverview(info, metrics, tables) {
  renderSummary(info, metrics, tables);
  renderCharts(metrics);
  renderTables(tables);
  $("config").textContent = info.config_yaml;
}

// ---- prompt view --------------------------------------------------------------------------
async function analyse(prompt) {
  const current = ticket("analyse");
  const analysis = await api("/api/prompt", {prompt});
  if (!current()) return;
  // Only now: a prompt the server refused leaves the last good one, its tokens and its text in place.
  state.prompt = prompt;
  $("prompt-input").value = prompt;
  $("ablation-prompt").value = prompt;
  state.analysis = analysis;
  state.pos = analysis.tokens.length - 1;
  renderPrompt();
  renderAblationList();  // positions are this prompt's now
}

function renderPrompt() {
  const a = state.analysis;
  if (!a) return;
  $("tokens").replaceChildren(...a.tokens.map((t, i) => el("span", {class: `tok${i === state.pos ? " sel" : ""}`, "data-pos": i,
    onclick: () => timed("select token", async () => { state.pos = i; renderPrompt(); })}, t, el("span", {class: "n", text: i}))));
  const blocks = a.sites.map((s) => {
    const head = el("div", {class: "site-name"}, s.site, el("span", {class: "sub", text: `${s.rows.length} of ${s.C} active`}));
    if (!s.rows.length) return el("div", {class: "site"}, head, el("div", {class: "none", text: "no subcomponent above the threshold on this prompt"}));
    // Long prompts: columns share the panel's width and their labels turn vertical.
    const table = el("table", {class: a.tokens.length > 24 ? "heat dense" : "heat"},
      el("tr", {}, el("th", {class: "corner"}), a.tokens.map((t, i) => el("th", {class: i === state.pos ? "col sel" : "col", title: `${i}: ${t}`, text: t}))),
      s.rows.map((r) => el("tr", {},
        el("th", {class: "row", title: "open this subcomponent", onclick: () => openSub(s.site, r.idx), text: `#${r.idx}`}),
        r.ci.map((g, i) => el("td", {class: i === state.pos ? "sel" : null, style: `background:${ciColor(g)}`,
          title: `${subName(s.site, r.idx)} at ${i} (${a.tokens[i]}): CI ${g}`,
          onclick: () => timed("select token", async () => { state.pos = i; renderPrompt(); })})))));
    return el("div", {class: "site"}, head, el("div", {class: "heat-wrap"}, table));
  });
  $("heatmaps").replaceChildren(...blocks);
  $("pos-label").textContent = `${state.pos} · ${a.tokens[state.pos]}`;
  const active = a.sites.flatMap((s) => s.rows.filter((r) => r.ci[state.pos] > a.threshold).map((r) => ({site: s.site, idx: r.idx, ci: r.ci[state.pos]})));
  active.sort((x, y) => y.ci - x.ci);
  $("token-active").replaceChildren(active.length ? el("div", {class: "active-list"}, active.map((x) => el("div", {class: "active-item"},
    el("span", {class: "name", title: "open this subcomponent", onclick: () => openSub(x.site, x.idx), text: subName(x.site, x.idx)}),
    el("span", {class: "val", text: x.ci.toFixed(3)}),
    el("button", {class: "small", title: "ablate at this position", onclick: () => addAblation(x.site, x.idx, [state.pos])}, "ablate")))) :
    el("div", {class: "none", text: `nothing above CI ${a.threshold} here`}));
  const preds = a.predictions[state.pos];
  const dist = state.info.output_kind === "distribution";
  $("pred-title").textContent = dist ? `Top next-token predictions at ${state.pos}` : "Outputs";
  $("predictions").replaceChildren(bars(preds.map((p) => ({label: p.label, value: p.value})), dist ? 1 : null, "", fmtOut));
}

function bars(items, max, cls = "", format = fmt) {
  const top = max ?? maxOf(items.map((x) => Math.abs(x.value)), 1e-9);
  return el("div", {class: "bars"}, items.map((x) => el("div", {class: "bar-row"},
    el("span", {class: "label", title: x.label, text: x.label}),
    el("span", {class: "track"}, el("span", {class: `fill ${cls}`, style: `width:${(100 * Math.min(1, Math.abs(x.value) / top)).toFixed(1)}%`})),
    el("span", {class: "num", text: format(x.value)}))));
}

// ---- subcomponent view --------------------------------------------------------------------
async function loadSubList(site) {
  const current = ticket("sub-list");
  const data = await api(`/api/subcomponents?site=${encodeURIComponent(site)}`);
  if (!current()) return;
  state.listSite = site;
  const maxF = maxOf(data.items.map((x) => x.frequency || 0), 1e-9);
  $("sub-list").replaceChildren(...data.items.map((x) => el("div", {
    class: `sub-item${x.max_ci !== undefined && x.max_ci < 0.1 ? " dead" : ""}${state.sub && state.sub.site === site && state.sub.idx === x.idx ? " sel" : ""}`,
    title: x.frequency === undefined ? "" : `fires on ${pct(x.frequency)} of tokens; max CI ${fmt(x.max_ci)}`,
    onclick: () => openSub(site, x.idx)},
    el("span", {class: "mono", text: `#${x.idx}`}),
    el("span", {class: "track"}, el("span", {class: "fill", style: `width:${100 * (x.frequency || 0) / maxF}%`})),
    el("span", {text: x.frequency === undefined ? "" : pct(x.frequency)}))));
  if (!data.harvested) $("sub-list").prepend(el("p", {class: "note"}, "Run ", el("code", {text: "tspd harvest RUN_DIR"}), " for frequencies."));
}

function openSub(site, idx) {
  showTab("subcomponent");
  return timed("open subcomponent", async () => {
    $("sub-site").value = site;
    $("sub-idx").value = idx;
    const current = ticket("sub-detail");
    const [detail] = await Promise.all([api(`/api/subcomponent?site=${encodeURIComponent(site)}&idx=${idx}`),
                                        state.listSite !== site ? loadSubList(site) : null]);
    if (!current()) return;
    state.sub = {site, idx: detail.idx};
    renderSub(detail);
    for (const item of document.querySelectorAll(".sub-item")) item.classList.toggle("sel", item.querySelector(".mono").textContent === `#${detail.idx}`);
  });
}

function histogram(counts) {
  const W = 420, H = 150, L = 8, B = 22, n = counts.length;
  const logMax = Math.log10(1 + maxOf(counts, 0));
  const svg = svgEl("svg", {viewBox: `0 0 ${W} ${H}`});
  const bw = (W - 2 * L) / n;
  counts.forEach((c, i) => {
    const h = logMax > 0 ? Math.log10(1 + c) / logMax * (H - B - 8) : 0;
    const r = svgEl("rect", {x: L + i * bw + 1, y: H - B - h, width: bw - 2, height: h, rx: 2, fill: ciColor(0.25 + 0.75 * i / (n - 1))});
    const tip = svgEl("title"); tip.textContent = `CI ${(i / n).toFixed(2)}–${((i + 1) / n).toFixed(2)}: ${c} tokens`;
    r.append(tip); svg.append(r);
  });
  for (const x of [0, 0.5, 1]) {
    const t = svgEl("text", {x: L + x * (W - 2 * L), y: H - 6, "text-anchor": x === 0 ? "start" : x === 1 ? "end" : "middle"});
    t.textContent = `CI ${x}`; svg.append(t);
  }
  return el("div", {class: "chart"}, svg, el("div", {class: "note", text: "tokens per CI bin (log scale)"}));
}

function contextRow(c, width) {
  const lo = Math.max(0, c.position - width), hi = Math.min(c.tokens.length, c.position + width + 1);
  const toks = [];
  if (lo > 0) toks.push(el("span", {class: "gap", text: "…"}));
  for (let i = lo; i < hi; i++) {
    const g = c.ci_row[i];
    toks.push(el("span", {class: i === c.position ? "at" : null, title: `${i}: CI ${g}`, style: `background:${g > 0.01 ? ciColor(g) : "transparent"};color:${ciInk(g)}`, text: c.tokens[i]}));
  }
  if (hi < c.tokens.length) toks.push(el("span", {class: "gap", text: "…"}));
  return el("div", {class: "ctx"}, el("span", {class: "val", text: c.ci.toFixed(3)}), el("div", {class: "toks"}, toks));
}

function renderSub(d) {
  const h = d.harvest;
  const head = el("div", {class: "sub-head"}, el("h2", {text: subName(d.site, d.idx)}),
    el("button", {class: "primary", "data-testid": "sub-ablate", onclick: () => addAblation(d.site, d.idx, null)}, "Ablate in playground"));
  const cards = el("div", {class: "cards"},
    card("firing frequency", h ? pct(h.frequency) : "–"), card("mean CI", h ? fmt(h.mean_ci) : "–"),
    card("max CI", h ? fmt(h.max_ci) : "–"), card("norm ‖u‖·‖v‖", fmt(d.norm)), card("‖u‖ / ‖v‖", `${fmt(d.u_norm)} / ${fmt(d.v_norm)}`, true));
  const parts = [head, cards];
  if (h && state.info.harvest && state.info.harvest.stale) {
    parts.push(el("div", {class: "panel warn"}, "The harvest is older than the decomposition: re-run ", el("code", {text: "tspd harvest RUN_DIR"}), "."));
  }
  if (!h) parts.push(el("div", {class: "panel note"}, "No harvest for this run yet: run ", el("code", {text: "tspd harvest RUN_DIR"}), " for top contexts, frequency and the CI histogram."));
  const row = [];
  if (h) row.push(el("div", {class: "panel"}, el("h3", {text: "CI histogram"}), histogram(h.hist)));
  const e = d.effects;
  if (e) {
    row.push(el("div", {class: "panel"}, el("h3", {text: "Outputs its U direction raises / lowers"}),
      el("div", {class: "two"}, bars(e.raises, null, "up"), bars(e.lowers, null, "down")),
      el("p", {class: "note", text: `direct path through the ${state.info.output_kind === "distribution" ? "unembedding" : "output layer"}, scaled by ${e.sign_from_harvest ? "the sign of the inner activation when the subcomponent fires" : "a positive inner activation (no harvest yet)"}`})));
  } else {
    parts.push(el("p", {class: "note", text: "Its output does not reach the model's outputs directly (queries and keys only steer attention), so no output effect is shown."}));
  }
  parts.push(el("div", {class: row.length > 1 ? "two" : ""}, row));
  if (h) {
    const width = state.info.input_kind === "tokens" ? 10 : 0;
    parts.push(el("div", {class: "panel"}, el("h3", {}, "Top-activating contexts", el("span", {class: "sub", text: `over the harvest's dataset sample; the token is outlined, shading is this subcomponent's CI`})),
      h.contexts.length ? h.contexts.map((c) => contextRow(c, width)) : el("div", {class: "none", text: "never above CI 0 in the sample"})));
  }
  $("sub-detail").replaceChildren(...parts);
}

// ---- ablation playground ------------------------------------------------------------------
function addAblation(site, idx, positions) {
  const prompt = positions ? state.prompt : null;  // a position means a token of this prompt
  const same = state.ablations.find((a) => a.site === site && a.idx === idx);
  if (same) Object.assign(same, {positions, prompt});
  else state.ablations.push({site, idx, positions, prompt});
  ablationsChanged();
}

// An item whose position was picked on another prompt: running it would ablate whatever token
// sits there now, so it is flagged and the run refuses until it is picked again.
const staleAblation = (a) => a.positions !== null && a.prompt !== state.prompt;

function ablationsChanged() {
  state.ablationResult = null;  // the shown result was for the previous list
  $("ablation-result").replaceChildren();
  renderAblationList();
}

function renderAblationList() {
  $("ablation-count").textContent = state.ablations.length;
  $("ablation-count").classList.toggle("on", state.ablations.length > 0);
  const n = state.analysis ? state.analysis.tokens.length : 0;
  const tokens = state.analysis ? state.analysis.tokens : [];
  $("ablation-list").replaceChildren(state.ablations.length ? el("div", {}, state.ablations.map((a, k) => {
    const stale = staleAblation(a);
    const where = el("select", {onchange: (ev) => {
      a.positions = ev.target.value === "all" ? null : [Number(ev.target.value)];
      a.prompt = a.positions ? state.prompt : null;
      ablationsChanged();
    }},
      el("option", {value: "all", text: "every position"}),
      Array.from({length: n}, (_, i) => el("option", {value: i, text: `position ${i} (${tokens[i]})`})),
      stale ? el("option", {value: "stale", text: `position ${a.positions[0]} of an earlier prompt`}) : null);
    where.value = stale ? "stale" : a.positions ? String(a.positions[0]) : "all";
    return el("div", {class: "abl-item"}, el("span", {class: "name", text: subName(a.site, a.idx)}), where,
      stale ? el("span", {class: "warn", text: "picked on another prompt: pick the position again"}) : null,
      el("button", {class: "small", onclick: () => { state.ablations.splice(k, 1); ablationsChanged(); }}, "remove"));
  })) : el("div", {class: "none", text: "nothing chosen: use “ablate” in the prompt view or “Ablate in playground” on a subcomponent"}));
}

async function runAblation(prompt) {
  if (prompt !== state.prompt || !state.analysis) await analyse(prompt);
  const stale = state.ablations.filter(staleAblation);
  if (stale.length) {
    throw new Error(`${stale.map((a) => subName(a.site, a.idx)).join(", ")}: the position was picked on another prompt; ` +
      "pick it again for this one (or choose every position)");
  }
  const ablations = state.ablations.map(({site, idx, positions}) => ({site, idx, positions}));
  const current = ticket("ablate");
  const result = await api("/api/ablate", {prompt, ablations, base: $("ablation-base").value});
  if (!current()) return;
  state.ablationResult = result;
  state.ablationPos = state.ablationResult.tokens.length - 1;
  renderAblation();
}

function renderAblation() {
  const r = state.ablationResult;
  if (!r) return;
  const kl = r.divergence.per_position, kind = r.divergence.kind.toUpperCase(), p = state.ablationPos;
  const maxKl = maxOf(kl, 1e-9);
  const strip = el("div", {class: "tokens kl-strip"}, r.tokens.map((t, i) => el("span", {
    class: `tok${i === p ? " sel" : ""}`, title: `${kind} ${kl[i]}`,
    style: i === p ? null : `background:rgba(217,48,37,${(0.05 + 0.8 * kl[i] / maxKl).toFixed(3)})`,
    onclick: () => timed("select ablation position", async () => { state.ablationPos = i; renderAblation(); })}, t)));
  const rows = r.changes[p].map((c) => {
    const delta = c.after - c.before;
    const scale = maxOf(r.changes[p].flatMap((x) => [Math.abs(x.before), Math.abs(x.after)]), 1e-9);
    return el("tr", {}, el("td", {text: c.label}), el("td", {text: fmtOut(c.before)}),
      el("td", {class: "bar"}, el("div", {class: "mini"}, el("i", {style: `width:${100 * Math.abs(c.before) / scale}%`}))),
      el("td", {text: fmtOut(c.after)}),
      el("td", {class: "bar"}, el("div", {class: "mini after"}, el("i", {style: `width:${100 * Math.abs(c.after) / scale}%`}))),
      el("td", {}, el("span", {class: `delta ${delta > 0 ? "up" : delta < 0 ? "down" : ""}`, text: `${delta > 0 ? "+" : ""}${fmtOut(delta)}`})));
  });
  const what = state.info.output_kind === "distribution" ? "next-token probabilities" : "output values";
  $("ablation-result").replaceChildren(
    el("div", {class: "panel"},
      el("div", {}, el("span", {class: "metric"}, el("span", {class: "k", text: `${kind} at position ${p} (${r.tokens[p]})`}), el("span", {class: "v", "data-testid": "ablation-kl", text: fmt(kl[p])})),
        el("span", {class: "metric"}, el("span", {class: "k", text: `max ${kind} over positions`}), el("span", {class: "v", text: fmt(maxOf(kl))})),
        el("span", {class: "metric"}, el("span", {class: "k", text: `unablated vs target ${kind} here`}), el("span", {class: "v", text: fmt(r.target_vs_unablated[p])}))),
      el("h3", {}, `${kind} to the unablated output per position`, el("span", {class: "sub", text: "click a token"})), strip),
    el("div", {class: "panel"}, el("h3", {}, `Top ${what} at position ${p} `, el("span", {class: "tok-inline", text: `(${r.tokens[p]})`}), ": before → after"),
      el("table", {class: "data change", "data-testid": "ablation-changes"},
        el("tr", {}, ["output", "before", "", "after", "", "change"].map((x) => el("th", {text: x}))), rows)));
}

// ---- start-up -----------------------------------------------------------------------------
async function loadRun(run) {
  // Nothing changes until the run's info and overview have all arrived: a run that fails to load
  // leaves the page (header, picker, views) on the previous one, and an answer for a run picked
  // before the latest is dropped.
  const current = ticket("run");
  let info, metrics, tables;
  try {
    [info, metrics, tables] = await Promise.all([api("/api/run", undefined, run), api("/api/metrics", undefined, run),
                                                 api("/api/tables", undefined, run)]);
  } catch (err) {
    if (!current()) return;  // a run picked since supersedes this one
    $("run-select").value = state.run ?? "";  // stay on the run that works, and say so in the picker too
    throw err;
  }
  if (!current()) return;
  for (const view of ["analyse", "sub-list", "sub-detail", "ablate"]) ticket(view);  // drop the previous run's answers in flight
  state.run = run;
  state.info = info;
  const i = state.info;
  $("run-select").value = run;
  $("run-meta").textContent = `${i.run} · ${i.target_kind || "custom"} · ${i.sites.length} sites`;
  document.title = `${i.run} · tspd dashboard`;
  $("prompt-help").textContent = `Prompt: ${i.prompt_help}.`;
  $("tokens-title").textContent = i.input_kind === "tokens" ? "Tokens" : "Input (one feature vector)";
  $("prompt-input").placeholder = i.example_prompt;
  $("sub-site").replaceChildren(...i.sites.map((s) => el("option", {value: s.name, text: `${s.name} (C=${s.C})`})));
  state.sub = null; state.listSite = null; state.analysis = null; state.prompt = ""; state.ablations = []; state.ablationResult = null;
  for (const id of ["tokens", "heatmaps", "token-active", "predictions", "sub-list"]) $(id).replaceChildren();
  $("pos-label").textContent = "";
  $("sub-detail").replaceChildren(el("div", {class: "panel empty", text: "Pick a subcomponent: click one in the prompt view, or in the list."}));
  $("sub-idx").value = "";
  $("prompt-input").value = "";
  $("ablation-prompt").value = "";
  $("ablation-result").replaceChildren();
  renderAblationList();
  renderOverview(i, metrics, tables);
  await Promise.all([analyse(i.example_prompt), loadSubList(i.sites[0].name)]);
}

function wire() {
  for (const b of document.querySelectorAll("#tabs button")) b.addEventListener("click", () => showTab(b.dataset.tab));
  $("prompt-form").addEventListener("submit", (ev) => { ev.preventDefault(); timed("analyse prompt", () => analyse($("prompt-input").value)); });
  $("ablation-form").addEventListener("submit", (ev) => { ev.preventDefault(); timed("run ablation", () => runAblation($("ablation-prompt").value)); });
  $("prompt-sample").addEventListener("click", () => timed("random example", async () => {
    const {prompt} = await api(`/api/sample?seed=${Math.floor(Math.random() * 1e9)}`);
    await analyse(prompt);
  }));
  $("sub-form").addEventListener("submit", (ev) => { ev.preventDefault(); openSub($("sub-site").value, Number($("sub-idx").value)); });
  $("sub-site").addEventListener("change", () => timed("list subcomponents", () => loadSubList($("sub-site").value)));
  $("run-select").addEventListener("change", (ev) => timed("load run", () => loadRun(ev.target.value)));
}

async function main() {
  wire();
  showTab((location.hash || "#overview").slice(1));
  await timed("load run", async () => {
    const {runs} = await api("/api/runs");
    const select = $("run-select");
    select.replaceChildren(...runs.map((r) => el("option", {value: r, text: r})));
    select.hidden = runs.length < 2;
    await loadRun(runs[0]);
  });
  document.body.dataset.ready = "1";
}
main();
