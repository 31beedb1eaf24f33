// Shared by the dashboard and the job page: the API, the daemon banner, the live stream, charts.
"use strict";
const TOKEN = new URLSearchParams(location.search).get("token");
const ROOT = document.body.dataset.page === "job" ? "../" : "";

function withToken(url) {
  if (!TOKEN) return url;
  return url + (url.includes("?") ? "&" : "?") + "token=" + encodeURIComponent(TOKEN);
}

async function api(path) {
  const r = await fetch(withToken(ROOT + path));
  if (!r.ok) throw new Error(path + ": " + r.status + " " + (await r.text()));
  return r.json();
}

function el(tag, text, cls) {
  const e = document.createElement(tag);
  if (text !== undefined && text !== null) e.textContent = String(text);
  if (cls) e.className = cls;
  return e;
}

function row(tbody, cells) {
  const tr = el("tr");
  for (const c of cells) {
    if (c instanceof Node) { const td = el("td"); td.appendChild(c); tr.appendChild(td); }
    else if (Array.isArray(c)) tr.appendChild(el("td", c[0], c[1]));
    else tr.appendChild(el("td", c));
  }
  tbody.appendChild(tr);
  return tr;
}

function num(x, digits) { return x === null || x === undefined ? "-" : Number(x).toFixed(digits); }
function when(ts) { return ts ? ts.slice(0, 19).replace("T", " ") : "-"; }
function dur(s) {
  if (s === null || s === undefined) return "-";
  s = Math.round(s);
  if (s < 60) return s + "s";
  if (s < 3600) return Math.floor(s / 60) + "m" + String(s % 60).padStart(2, "0") + "s";
  return Math.floor(s / 3600) + "h" + String(Math.floor(s % 3600 / 60)).padStart(2, "0") + "m";
}

// The daemon, exactly as `ftctl status` says it (control/status.py: the lock probe, not the journal's word). Its
// colour says what the text says: a live daemon that is NOT keeping the machine awake is a warning, not green.
function showDaemon(d) {
  const b = document.getElementById("daemon-banner");
  const asleep = d.running && d.power && !d.power.held;
  const state = d.running ? (asleep ? "alive-warn" : "alive") : (d.died ? "dead" : "stopped");
  b.dataset.daemon = state;
  b.textContent = (state === "dead" ? "DAEMON DEAD — " : "daemon: ") + d.summary;
}

// One live stream: calls onPulse({seq, metric_id, alive, died}) whenever the journal moves or the daemon lives
// or dies. It runs in a worker (static/live.js says why); a browser without workers gets a plain EventSource.
function live(onPulse) {
  const badge = document.getElementById("live");
  const url = new URL(withToken(ROOT + "api/events"), location.href).href;
  const pulse = (data) => { const p = JSON.parse(data); badge.textContent = "live · seq " + p.seq; onPulse(p); };
  if (typeof Worker === "undefined") {
    const src = new EventSource(url);
    src.onopen = () => { badge.textContent = "live"; };
    src.onerror = () => { badge.textContent = "reconnecting…"; };
    src.onmessage = (m) => pulse(m.data);
    return src;
  }
  const w = new Worker(withToken(ROOT + "static/live.js"));
  w.onmessage = (e) => {
    if (e.data.open) badge.textContent = "live";
    else if (e.data.error) badge.textContent = "reconnecting…";
    else pulse(e.data.data);
  };
  w.postMessage(url);
  return w;
}

// Memory as people read it: 4.8 MB, not 0.00 GB.
function mem(gb) {
  if (gb === null || gb === undefined) return "-";
  return gb >= 1 ? gb.toFixed(2) + " GB" : (gb * 1000 >= 10 ? (gb * 1000).toFixed(0) : (gb * 1000).toFixed(1)) + " MB";
}
function short(sha) { return sha ? sha.slice(0, 12) : "-"; }
function bytes(n) { return n >= 1e9 ? (n / 1e9).toFixed(2) + " GB" : n >= 1e6 ? (n / 1e6).toFixed(1) + " MB" : (n / 1e3).toFixed(0) + " kB"; }

// A job (the `ftctl status JOB --json` shape, or `replay --json`'s) as a readable panel: what `ftctl status JOB`
// shows, grouped, wrapped, nothing cut off; every field as JSON in a fold below it.
function statePanel(j) {
  const box = el("div", null, "state-panel");
  const t = el("table", null, "kv");
  const add = (key, value, cls) => {
    if (value === null || value === undefined || value === "" || (Array.isArray(value) && !value.length)) return;
    const tr = el("tr");
    tr.appendChild(el("th", key));
    const td = el("td", null, cls);
    if (Array.isArray(value)) { const ul = el("ul"); for (const v of value) ul.appendChild(v instanceof Node ? v : el("li", v)); td.appendChild(ul); }
    else if (value instanceof Node) td.appendChild(value);
    else td.textContent = String(value);
    tr.appendChild(td);
    t.appendChild(tr);
  };
  add("state", el("span", j.state + (j.stale ? " (daemon dead)" : ""), "state-" + j.state + (j.stale ? " stale" : "")));
  add(j.note !== undefined ? "note" : "reason", j.note !== undefined ? j.note : j.reason);
  const live = j.live_step ?? j.step;
  add("step", live + " / " + j.iters + (live !== j.step ? " (last checkpoint at step " + j.step + ")" : ""));
  add("global step", (j.live_global_step ?? j.global_step) + " (continues across the lineage's warm starts)");
  if (j.eta_s !== undefined) add("ETA", j.eta_s !== null ? dur(j.eta_s) + " (" + j.eta_basis + ")" : (j.eta_basis ? "unknown: " + j.eta_basis : null));
  add("attempt", j.attempt || null);
  add("lineage", j.lineage + (j.parent_job ? " · warm-started from job " + j.parent_job + "'s adapter (global step " + j.global_step_base + ")" : ""));
  const r = j.last_report;
  if (r) add("last report", "step " + r.step + ": loss " + num(r.loss, 4) + ", lr " + (r.lr === null ? "-" : Number(r.lr).toPrecision(3)) +
    ", " + num(r.tokens_per_s, 0) + " tok/s, peak memory " + mem(r.peak_mem_gb) +
    // preference training (dpo, orpo): the report window's pair figures
    (r.accuracy !== null && r.accuracy !== undefined ? ", pairs ranked right " + num(100 * r.accuracy, 0) + "%, reward margin " +
      num(r.reward_margin, 3) + " (chosen " + num(r.chosen_reward, 3) + ", rejected " + num(r.rejected_reward, 3) + ")" : ""));
  if (r && deviceLine(r)) add("device", deviceLine(r));
  if (j.last_val_loss !== null || j.best_val_loss !== null) add("val loss", "last " + num(j.last_val_loss, 4) + ", best " + num(j.best_val_loss, 4));
  add("checkpoints", (j.checkpoints || []).map(c => el("li", "step " + c.step + " (global " + c.global_step + ")" +
    (c.val_loss !== null && c.val_loss !== undefined ? " · val " + num(c.val_loss, 4) : "") + " · " + bytes(c.bytes) +
    (c.corrupt ? " · CORRUPT: " + c.corrupt : ""), c.corrupt ? "bad" : null)));
  if (j.adapter_path) add("adapter", j.adapter_path + " (sha256 " + short(j.adapter_sha256) + ")", "path");
  add("base model", j.base_model + (j.model_repo ? " (" + j.model_repo + "@" + short(j.model_revision) + ")" : ""), "path");
  add("data", j.data_path + " (" + j.examples + " " + j.data_format + " examples, sha256 " + short(j.data_sha256) + ")", "path");
  add("validation", j.valid_path, "path");
  add("crashes", (j.crashes || []).map((c, i) => el("li", "#" + (i + 1) + " " + c.category + " at step " + (c.step ?? "-") + " (" + when(c.ts) + "): " +
    c.suggestion + (c.verdict ? " · replay: " + c.verdict : ""))));
  add("alerts", (j.alerts || []).map(a => el("li", a.kind.replace("_", " ") + " (" + when(a.ts) + "): " + a.text, "warn")));
  add("warnings", j.warnings);
  if (j.env) add("environment", Object.entries(j.env).map(([k, v]) => k + " " + v).join(", "));
  add("environment changed", j.env_changed);
  if (j.world_size > 1) add("ranks", j.world_size + (j.hosts ? " (" + j.hosts.join(", ") + ")" : ""));
  add("submitted", when(j.submitted_at) + " UTC");
  add("updated", when(j.updated_at) + " UTC (event " + j.updated_seq + ")");
  box.appendChild(t);
  const raw = el("details");
  raw.appendChild(el("summary", "every field (JSON)"));
  raw.appendChild(el("pre", JSON.stringify(j, null, 2)));
  box.appendChild(raw);
  return box;
}

// A loss chart (uPlot): train loss as a line, val loss as dots, superseded points as grey crosses,
// markers (checkpoint, crash, resume) as ticks on the x axis. The numbers drawn are written into data-*
// attributes, so a test can compare them with the journal.
const STEP_INCRS = [1, 2, 5, 10, 20, 50, 100, 200, 500, 1e3, 2e3, 5e3, 1e4, 2e4, 5e4, 1e5, 2e5, 5e5, 1e6];  // steps are whole
const MARK_COLOURS = { checkpoint: "#888", crash: "#c62828", resume: "#2e7d32", completed: "#1f4fa0", alert: "#ef6c00" };

class LossChart {
  constructor(parent, series, opts) {
    this.opts = opts || {};
    this.box = el("div", null, "chart");
    this.box.dataset.job = series.job;
    this.title = el("h3");
    this.box.appendChild(this.title);
    parent.appendChild(this.box);
    this.cols = series.columns;
    this.markers = series.markers || [];
    this.meta = series;
    this.plot = null;
    this.render();
  }

  append(series) {  // an increment (after_id): new train reports of the same attempt
    for (const k of Object.keys(this.cols)) this.cols[k] = this.cols[k].concat(series.columns[k]);
    this.meta.last_id = series.last_id;
    this.render();
  }

  // As wide as its box (a grid cell on the dashboard, the section on the job page): the page's width is used.
  size() {
    const width = Math.max(320, Math.floor(this.box.clientWidth - 12));
    this.box.dataset.width = String(width);
    return { width, height: this.opts.height || Math.round(Math.min(320, Math.max(220, width * 0.36))) };
  }

  resize() { if (this.plot) this.plot.setSize(this.size()); }

  replace(series) { this.cols = series.columns; this.markers = series.markers || []; this.meta = series; this.render(); }

  data() {
    const c = this.cols, xs = [], train = [], val = [], gone = [];
    let nTrain = 0, nVal = 0, nGone = 0;
    // x must be increasing for uPlot: points are sorted by global step; a step drawn twice (a superseded point
    // beside its replacement) is nudged by a hair so both stay visible.
    let last = -Infinity;
    for (let i = 0; i < c.global_step.length; i++) {
      let x = c.global_step[i];
      if (x <= last) x = last + 1e-6;
      last = x;
      xs.push(x);
      const sup = c.superseded[i];
      train.push(sup ? null : c.loss[i]);
      val.push(sup ? null : c.val_loss[i]);
      gone.push(sup ? (c.loss[i] ?? c.val_loss[i]) : null);
      if (sup) nGone++; else { if (c.loss[i] !== null) nTrain++; if (c.val_loss[i] !== null) nVal++; }
    }
    this.box.dataset.points = String(c.global_step.length - nGone);
    this.box.dataset.train = String(nTrain);
    this.box.dataset.val = String(nVal);
    this.box.dataset.superseded = String(nGone);
    this.box.dataset.markers = String(this.markers.length);
    this.box.dataset.alerts = String(this.markers.filter(m => m.kind === "alert").length);
    this.box.dataset.lastStep = String(c.global_step.length ? c.global_step[c.global_step.length - 1] : "");
    return this.opts.superseded ? [xs, train, val, gone] : [xs, train, val];
  }

  heading() {
    const m = this.meta;
    return "job " + m.job + " " + m.name + " · " + m.state + " · " + this.box.dataset.train +
      " train / " + this.box.dataset.val + " val points" +
      (Number(this.box.dataset.superseded) ? " · " + this.box.dataset.superseded + " superseded" : "");
  }

  // uPlot's scales, axes and series (after x) for what data() returns
  layout() {
    const series = [
      { label: "train", stroke: "#1f77b4", width: 1.5, spanGaps: true, points: { show: false } },
      { label: "val", stroke: "#ff7f0e", width: 0, spanGaps: true, points: { show: true, size: 6, fill: "#ff7f0e" } },
    ];
    if (this.opts.superseded)
      series.push({ label: "superseded", stroke: "#9e9e9e", width: 0, points: { show: true, size: 7, fill: "#9e9e9e" } });
    return { scales: { x: { time: false } }, axes: [{ label: "global step", incrs: STEP_INCRS }, { label: "loss" }], series };
  }

  render() {
    const data = this.data();
    this.title.textContent = this.heading();
    if (this.plot) { this.plot.setData(data); return; }
    const markers = () => this.markers;
    const ticks = (u) => {
      const ctx = u.ctx, top = u.bbox.top + u.bbox.height;
      for (const mk of markers()) {
        const x = u.valToPos(mk.global_step, "x", true);
        if (x < u.bbox.left || x > u.bbox.left + u.bbox.width) continue;
        ctx.strokeStyle = MARK_COLOURS[mk.kind] || "#888";
        ctx.lineWidth = mk.kind === "checkpoint" ? 1 : 3;
        ctx.beginPath(); ctx.moveTo(x, top); ctx.lineTo(x, top - (mk.kind === "checkpoint" ? 8 : 16) * devicePixelRatio);
        ctx.stroke();
        if (mk.kind === "alert") {  // a training-health alert: a triangle on top of its tick, as in `ftctl plot`
          const y = top - 16 * devicePixelRatio, r = 5 * devicePixelRatio;
          ctx.fillStyle = MARK_COLOURS.alert;
          ctx.beginPath(); ctx.moveTo(x, y - r); ctx.lineTo(x - r, y + r * 0.6); ctx.lineTo(x + r, y + r * 0.6); ctx.closePath(); ctx.fill();
        }
      }
    };
    const { scales, axes, series } = this.layout();
    const opts = { ...this.size(), scales, axes, series: [{ label: "step" }, ...series], hooks: { draw: [ticks] } };
    this.plot = new uPlot(opts, data, this.box);
    // the box's width follows the page (a new chart beside it, a resized window): the plot follows the box
    if (typeof ResizeObserver !== "undefined") {
      let last = this.box.clientWidth;
      new ResizeObserver(() => {
        if (this.box.clientWidth !== last) { last = this.box.clientWidth; this.resize(); }
      }).observe(this.box);
    }
  }
}

// Preference training's figures (train_mode dpo, orpo) beside the loss chart, as `ftctl plot` draws them: the
// chosen and rejected rewards and their margin (left axis), the share of pairs ranked right (right axis, 0 to 1);
// each report's window as lines, the validation pairs (`evaluated`) as dots; superseded points left out. The same
// markers on the x axis. data-* attributes say what is drawn (data-pairs: report points, data-val-pairs:
// evaluations, data-last-accuracy / data-last-val-accuracy: the newest of each).
const PAIR_FIGURES = [  // [column, label, colour, dash]
  ["chosen_reward", "chosen reward", "#2e7d32", null],
  ["rejected_reward", "rejected reward", "#c62828", null],
  ["reward_margin", "reward margin", "#1f77b4", [6, 3]],
  ["accuracy", "accuracy", "#6a1b9a", null],
];

function hasPairs(series) {
  const c = series.columns;
  return PAIR_FIGURES.some(([k]) => (c[k] || []).some(v => v !== null) || (c["val_" + k] || []).some(v => v !== null));
}

class PairChart extends LossChart {
  constructor(parent, series, opts) {
    super(parent, series, opts);
    this.box.classList.add("pairs");
  }

  data() {
    const c = this.cols, xs = [], cols = PAIR_FIGURES.flatMap(([k]) => [k, "val_" + k]);
    const out = cols.map(() => []);
    let nPairs = 0, nVal = 0, lastAcc = null, lastVal = null, last = -Infinity;
    for (let i = 0; i < c.global_step.length; i++) {
      if (c.superseded[i]) continue;
      let x = c.global_step[i];
      if (x <= last) x = last + 1e-6;
      last = x;
      xs.push(x);
      cols.forEach((k, j) => out[j].push(c[k] ? c[k][i] : null));
      if (PAIR_FIGURES.some(([k]) => c[k][i] !== null)) nPairs++;
      if (PAIR_FIGURES.some(([k]) => c["val_" + k][i] !== null)) nVal++;
      if (c.accuracy[i] !== null) lastAcc = c.accuracy[i];
      if (c.val_accuracy[i] !== null) lastVal = c.val_accuracy[i];
    }
    Object.assign(this.box.dataset, {
      pairs: String(nPairs), valPairs: String(nVal),
      lastAccuracy: lastAcc === null ? "" : String(lastAcc), lastValAccuracy: lastVal === null ? "" : String(lastVal),
    });
    return [xs, ...out];
  }

  heading() {
    const d = this.box.dataset;
    return "job " + this.meta.job + " · preference pairs · " + d.pairs + " reports / " + d.valPairs + " evaluations" +
      (d.lastValAccuracy ? " · val accuracy " + num(100 * Number(d.lastValAccuracy), 0) + "%" : "");
  }

  layout() {
    const series = PAIR_FIGURES.flatMap(([, label, colour, dash]) => {
      const scale = label === "accuracy" ? "acc" : "r";
      return [
        { label, scale, stroke: colour, width: 1.4, dash: dash || undefined, spanGaps: true, points: { show: false } },
        { label: "val " + label, scale, stroke: colour, width: 0, spanGaps: true, points: { show: true, size: 6, fill: colour } },
      ];
    });
    return {
      scales: { x: { time: false }, r: {}, acc: { range: [0, 1] } },
      axes: [{ label: "global step", incrs: STEP_INCRS }, { scale: "r", label: "reward" },
        { scale: "acc", side: 1, label: "accuracy", grid: { show: false } }],
      series,
    };
  }
}

// The device of a report and its readings in one line, as `ftctl status JOB` shows them (cli/render.py
// device_line): which device trains, its memory, temperature, utilisation and power where reported.
function deviceLine(r) {
  const gpu = [];
  if (r.device_mem_used_gb != null && r.device_mem_total_gb)
    gpu.push("memory " + mem(r.device_mem_used_gb) + " / " + mem(r.device_mem_total_gb) + " (" + Math.round(100 * r.device_mem_used_gb / r.device_mem_total_gb) + " %)");
  if (r.device_temp_c != null) gpu.push(Math.round(r.device_temp_c) + " °C");
  if (r.device_util_pct != null) gpu.push("util " + Math.round(r.device_util_pct) + " %");
  if (r.device_power_w != null) gpu.push(Math.round(r.device_power_w) + " W");
  const parts = [];
  const head = [r.device || "", ...gpu].join("  ").trim();
  if (head) parts.push(head);
  if (r.mem_active_gb != null) parts.push("MLX " + mem(r.mem_active_gb) + " active + " + mem(r.mem_cache_gb || 0) + " cache");
  if (r.rss_gb != null) parts.push("worker RSS " + mem(r.rss_gb) + (r.swap_gb != null ? ", swap " + mem(r.swap_gb) : ""));
  return parts.join("  ·  ");
}
