// The compare view: the runs table (`ftctl compare`'s columns, sortable, differing keys highlighted), the selected
// runs' train and val curves overlaid on one chart (by step, global step, tokens seen or epoch), their system metrics
// below. Everything the view shows is in its URL (?lineage= &jobs= &x= &sort= &desc= &all=): a link restores it.
"use strict";
const COLOURS = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#17becf", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22"];
const XS = { step: "step", global_step: "global step", tokens: "tokens seen", epoch: "epoch" };
const Q = new URLSearchParams(location.search);
const S = {
  lineage: Q.get("lineage") || null,
  sel: Q.has("jobs") ? Q.get("jobs").split(",").filter(Boolean) : null,  // null: not given (a default is chosen)
  x: XS[Q.get("x")] ? Q.get("x") : "step",
  sort: Q.get("sort") || null,
  desc: Q.get("desc") === "1",
  all: Q.get("all") === "1",
};
let table = null;
const curves = new Map();  // job -> its /metrics answer
const plots = [];

function writeUrl() {
  const q = new URLSearchParams();
  if (TOKEN) q.set("token", TOKEN);
  if (S.lineage) q.set("lineage", S.lineage);
  q.set("jobs", S.sel.join(","));
  if (S.x !== "step") q.set("x", S.x);
  if (S.sort) { q.set("sort", S.sort); if (S.desc) q.set("desc", "1"); }
  if (S.all) q.set("all", "1");
  history.replaceState(null, "", location.pathname + "?" + q.toString());
  document.body.dataset.x = S.x;
  document.getElementById("cli").textContent = "in a terminal: ftctl compare " +
    (S.sel.length ? S.sel.join(" ") : S.lineage ? "--lineage " + S.lineage : "JOB…") +
    (S.all ? " --all" : "") + (S.sort ? " --sort " + S.sort + (S.desc ? " --reverse" : "") : "");
}

function cell(col, v) {
  if (v === null || v === undefined) return "";
  if (col === "wall_s") return dur(v);
  if (col === "peak_mem_gb") return mem(v);
  if (typeof v === "number") return Number.isInteger(v) ? String(v) : (Math.abs(v) >= 1e5 ? v.toFixed(0) : String(Number(v.toPrecision(4))));
  if (typeof v === "object") return JSON.stringify(v);
  return String(v);
}

function cmp(a, b) {  // numbers by value, text by text; a missing value last either way (as `ftctl compare --sort`)
  if (a === null || a === undefined) return (b === null || b === undefined) ? 0 : 1;
  if (b === null || b === undefined) return -1;
  const d = (typeof a === "number" && typeof b === "number") ? a - b : String(a).localeCompare(String(b));
  return S.desc ? -d : d;
}

function colourOf(job) { return COLOURS[S.sel.indexOf(job) % COLOURS.length]; }

// `ftctl compare`'s columns, the config keys moved up beside the run's name: what differs is seen first.
function shown() {
  const keys = new Set(table.keys), figs = table.columns.filter(c => !keys.has(c));
  const at = figs.indexOf("state") + 1;
  return [...figs.slice(0, at), ...table.keys, ...figs.slice(at)];
}

function showTable() {
  const head = document.querySelector("#runs thead tr"), body = document.querySelector("#runs tbody");
  const keys = new Set(table.keys);
  const picked = table.rows.filter(r => S.sel.includes(r.job));
  // a key is highlighted when the selected runs do not all hold the same value for it
  const differs = new Set(table.keys.filter(k => new Set(picked.map(r => JSON.stringify(r[k] ?? null))).size > 1));
  head.replaceChildren(el("th", "✓"));
  for (const c of shown()) {
    const th = el("th", c, (keys.has(c) ? "cfg" : "") + (differs.has(c) ? " diff" : ""));
    th.dataset.col = c;
    if (S.sort === c) th.dataset.sorted = S.desc ? "desc" : "asc";
    th.title = keys.has(c) ? "config key" + (table.differing.includes(c) ? " (differs between these jobs)" : "") : "from the journal";
    th.onclick = () => { S.desc = S.sort === c ? !S.desc : false; S.sort = c; writeUrl(); showTable(); };
    head.appendChild(th);
  }
  const rows = S.sort && table.columns.includes(S.sort) ? table.rows.slice().sort((a, b) => cmp(a[S.sort], b[S.sort])) : table.rows;
  body.replaceChildren();
  for (const r of rows) {
    const box = el("input");
    box.type = "checkbox";
    box.checked = S.sel.includes(r.job);
    box.onchange = () => {
      S.sel = box.checked ? S.sel.concat([r.job]) : S.sel.filter(j => j !== r.job);
      writeUrl(); showTable(); drawCharts();
    };
    const link = el("a", r.job);
    link.href = withToken("job/" + encodeURIComponent(r.job));
    const cells = [box];
    for (const c of shown()) {
      if (c === "job") { cells.push(link); continue; }
      if (c === "data_file" && r[c]) { const f = el("span", r[c].split("/").pop()); f.title = r[c]; cells.push(f); continue; }
      const cls = (keys.has(c) && differs.has(c) && box.checked ? "diff " : "") + (typeof r[c] === "number" ? "num" : "");
      cells.push([cell(c, r[c]), cls]);
    }
    const tr = row(body, cells);
    tr.dataset.job = r.job;
    if (box.checked) { tr.className = "selected"; tr.style.setProperty("--run-colour", colourOf(r.job)); }
  }
  document.body.dataset.differs = [...differs].join(",");
  document.body.dataset.selection = S.sel.join(",");
}

// A step as an epoch of that run: passes over its training data (the server's batches_per_epoch, from
// core/config.py; null when the journal does not say how many examples it trained on).
function epochOf(s, step) { return s.batches_per_epoch ? step / s.batches_per_epoch : null; }

// One run's points on the chosen x axis: {x, train, val, tps, mem} per distinct x, in x order.
function points(s) {
  const c = s.columns, out = new Map();
  if (S.x === "epoch" && !s.batches_per_epoch) return [];
  let tokens = 0;
  for (let i = 0; i < c.step.length; i++) {
    if (c.trained_tokens[i] !== null) tokens = c.trained_tokens[i];
    const x = S.x === "global_step" ? c.global_step[i] : S.x === "tokens" ? tokens : S.x === "epoch" ? epochOf(s, c.step[i]) : c.step[i];
    const p = out.get(x) || { x, train: null, val: null, tps: null, mem: null };
    for (const [k, col] of [["train", "loss"], ["val", "val_loss"], ["tps", "tokens_per_s"], ["mem", "peak_mem_gb"]])
      if (c[col][i] !== null) p[k] = c[col][i];
    out.set(x, p);
  }
  return [...out.values()].sort((a, b) => a.x - b.x);
}

function markerX(s, m) {
  if (S.x === "global_step") return m.global_step;
  if (S.x === "step") return m.step;
  if (S.x === "epoch") return epochOf(s, m.step);
  const c = s.columns;  // tokens seen by the marker's step: the last report at or before it
  let t = 0;
  for (let i = 0; i < c.step.length && c.step[i] <= m.step; i++) if (c.trained_tokens[i] !== null) t = c.trained_tokens[i];
  return t;
}

// One chart of the selected runs: for each run, one uPlot series per field (its colour; a field drawn as dots
// when fields[k].dots). data-* attributes say what was drawn, for tests.
function overlay(parent, title, ylabel, runs, fields, withAlerts) {
  const box = el("div", null, "chart");
  box.appendChild(el("h3", title));
  parent.appendChild(box);
  const tables = runs.map(({ pts }) => [pts.map(p => p.x), ...fields.map(f => pts.map(p => p[f.key]))]);
  const data = tables.length ? uPlot.join(tables) : [[]];
  const series = [{ label: XS[S.x] }];
  for (const { job, s } of runs) {
    for (const f of fields) {
      const colour = colourOf(job);
      series.push(f.dots
        ? { label: job + " " + f.label, stroke: colour, width: 0, spanGaps: true, points: { show: true, size: 6, fill: colour } }
        : { label: job + " " + f.label, stroke: colour, width: 1.5, spanGaps: true, points: { show: false } });
    }
  }
  box.dataset.jobs = runs.map(r => r.job).join(",");
  box.dataset.runs = String(runs.length);
  box.dataset.series = String(series.length - 1);
  box.dataset.xs = runs.map(({ job, pts }) => job + ":" + (pts.length ? pts[0].x + ".." + pts[pts.length - 1].x : "")).join(" ");
  box.dataset.counts = runs.map(({ job, pts }) => job + ":" + fields.map(f => pts.filter(p => p[f.key] !== null).length).join("/")).join(" ");
  const alerts = withAlerts ? runs.flatMap(({ job, s }) => s.markers.filter(m => m.kind === "alert").map(m => ({ job, x: markerX(s, m), text: m.text })).filter(a => a.x !== null)) : [];
  box.dataset.alerts = String(alerts.length);
  const draw = (u) => {
    const ctx = u.ctx, bottom = u.bbox.top + u.bbox.height, r = 5 * devicePixelRatio;
    for (const a of alerts) {
      const x = u.valToPos(a.x, "x", true);
      if (x < u.bbox.left || x > u.bbox.left + u.bbox.width) continue;
      ctx.fillStyle = colourOf(a.job);
      ctx.beginPath(); ctx.moveTo(x, bottom - 2 * r); ctx.lineTo(x - r, bottom); ctx.lineTo(x + r, bottom); ctx.closePath(); ctx.fill();
    }
  };
  // drawn once every box is in place: a box's width is its share of the row only then
  box.make = () => {
    const width = Math.max(320, Math.floor(box.clientWidth - 12));
    plots.push(new uPlot({
      width, height: ylabel === "loss" ? 360 : 240,
      scales: { x: { time: false } },
      axes: [{ label: XS[S.x] }, { label: ylabel }],
      series, hooks: { draw: [draw] },
    }, data, box));
  };
  return box;
}

async function drawCharts() {
  const missing = S.sel.filter(j => !curves.has(j) && table.rows.some(r => r.job === j));
  const got = await Promise.all(missing.map(j => api("api/jobs/" + encodeURIComponent(j) + "/metrics")));
  missing.forEach((j, i) => curves.set(j, got[i]));
  for (const p of plots.splice(0)) p.destroy();
  const runs = S.sel.filter(j => curves.has(j)).map(job => ({ job, s: curves.get(job), pts: points(curves.get(job)) }));
  const o = document.getElementById("overlay"), sys = document.getElementById("system");
  o.replaceChildren(); sys.replaceChildren();
  if (!runs.length) { o.appendChild(el("p", "tick runs in the table to draw their curves", "dim")); document.body.dataset.ready = "1"; return; }
  // memory in the unit it is read in: MB below a gigabyte
  const small = runs.every(r => r.pts.every(p => p.mem === null || p.mem < 1));
  if (small) for (const r of runs) for (const p of r.pts) if (p.mem !== null) p.mem = p.mem * 1000;
  const boxes = [
    overlay(o, "loss: " + runs.map(r => "job " + r.job + " " + r.s.name).join(" · "), "loss", runs,
      [{ key: "train", label: "train" }, { key: "val", label: "val", dots: true }], true),
    overlay(sys, "tokens/s", "tokens/s", runs, [{ key: "tps", label: "tokens/s" }]),
    overlay(sys, "peak memory (" + (small ? "MB" : "GB") + ")", small ? "MB" : "GB", runs, [{ key: "mem", label: "peak memory" }]),
  ];
  ["loss-chart", "tps-chart", "mem-chart"].forEach((id, i) => { boxes[i].id = id; });
  for (const b of boxes) b.make();
  const unknown = S.x === "epoch" ? runs.filter(r => !r.s.batches_per_epoch).map(r => r.job) : [];
  if (unknown.length) o.appendChild(el("p", "not drawn by epoch: job " + unknown.join(", ") + " (its journal does not say " +
    "how many examples it trained on: it was submitted before ftctl recorded that; step, global step and tokens seen draw it)", "dim"));
  document.body.dataset.ready = "1";
}

async function refresh(pulse) {
  const q = new URLSearchParams();
  if (S.lineage) q.set("lineage", S.lineage);
  if (S.all) q.set("all", "1");
  table = await api("api/compare" + (q.toString() ? "?" + q.toString() : ""));
  document.getElementById("scope").textContent = (S.lineage ? "lineage " + S.lineage : "every job") + " · " + table.rows.length + " run(s)";
  const ids = table.rows.map(r => r.job);
  // "7" in a link means job 0007, as on the command line
  const norm = (j) => ids.includes(j) ? j : (ids.find(x => x === j.padStart(x.length, "0")) || j);
  if (S.sel === null) S.sel = S.lineage ? ids.slice() : ids.slice(-3);
  S.sel = [...new Set(S.sel.map(norm))];
  if (pulse) curves.clear();  // the journal moved: curves are read again
  writeUrl();
  showTable();
  await drawCharts();
  if (pulse !== false) {
    const s = await api("api/status");
    showDaemon(s.daemon);
  }
  document.getElementById("live").textContent = document.getElementById("live").textContent.replace("connecting…", "loaded");
}

// A live page follows the journal, but not every report of a training job: a new event redraws at once, new
// reports at most every 5 s (the table and the curves are read again: a few requests, not one per report).
let lastSeq = null, lastDrawn = 0;
function onPulse(p) {
  const now = Date.now();
  if (p.seq === lastSeq && now - lastDrawn < 5000) return;
  lastSeq = p.seq; lastDrawn = now;
  queue(p);
}

document.getElementById("home").href = withToken("./");
document.getElementById("all-keys").checked = S.all;
document.getElementById("all-keys").onchange = (e) => { S.all = e.target.checked; queue(false); };
for (const r of document.querySelectorAll('input[name="x"]')) {
  r.checked = r.value === S.x;
  r.onchange = () => { S.x = r.value; writeUrl(); drawCharts(); };
}
let chain = Promise.resolve();
function queue(pulse) { chain = chain.then(() => refresh(pulse)).catch((e) => { document.getElementById("live").textContent = String(e); }); }
queue(null);
chain.then(() => live(onPulse));
