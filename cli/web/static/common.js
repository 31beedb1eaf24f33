// Shared by the dashboard and the job page: the API, the daemon banner, the live stream, charts.
"use strict";
const TOKEN = new URLSearchParams(location.search).get("token");
const LIVE_AFTER_MS = 1000;
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

// The daemon, exactly as `ftctl status` says it (control/status.py: the lock probe, not the journal's word).
function showDaemon(d) {
  const b = document.getElementById("daemon-banner");
  const state = d.running ? "alive" : (d.died ? "dead" : "stopped");
  b.dataset.daemon = state;
  b.textContent = (state === "dead" ? "DAEMON DEAD — " : "daemon: ") + d.summary;
}

// One live stream: calls onPulse({seq, metric_id, alive, died}) whenever the journal moves or the daemon lives or dies.
function live(onPulse) {
  const badge = document.getElementById("live");
  const src = new EventSource(withToken(ROOT + "api/events"));
  src.onopen = () => { badge.textContent = "live"; };
  src.onerror = () => { badge.textContent = "reconnecting…"; };
  src.onmessage = (m) => { badge.textContent = "live · seq " + JSON.parse(m.data).seq; onPulse(JSON.parse(m.data)); };
  return src;
}

// A loss chart (uPlot): train loss as a line, val loss as dots, superseded points as grey crosses,
// markers (checkpoint, crash, resume) as ticks on the x axis. The numbers drawn are written into data-*
// attributes, so a test can compare them with the journal.
const MARK_COLOURS = { checkpoint: "#888", crash: "#c62828", resume: "#2e7d32", completed: "#1f4fa0" };

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
    this.box.dataset.lastStep = String(c.global_step.length ? c.global_step[c.global_step.length - 1] : "");
    return this.opts.superseded ? [xs, train, val, gone] : [xs, train, val];
  }

  render() {
    const data = this.data();
    const m = this.meta;
    this.title.textContent = "job " + m.job + " " + m.name + " · " + m.state + " · " + this.box.dataset.train +
      " train / " + this.box.dataset.val + " val points" +
      (Number(this.box.dataset.superseded) ? " · " + this.box.dataset.superseded + " superseded" : "");
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
      }
    };
    const opts = {
      width: this.opts.width || 460, height: this.opts.height || 220,
      scales: { x: { time: false } },
      axes: [{ label: "global step" }, { label: "loss" }],
      series: [
        { label: "step" },
        { label: "train", stroke: "#1f77b4", width: 1.5, spanGaps: true, points: { show: false } },
        { label: "val", stroke: "#ff7f0e", width: 0, spanGaps: true, points: { show: true, size: 6, fill: "#ff7f0e" } },
      ],
      hooks: { draw: [ticks] },
    };
    if (this.opts.superseded)
      opts.series.push({ label: "superseded", stroke: "#9e9e9e", width: 0, points: { show: true, size: 7, fill: "#9e9e9e" } });
    this.plot = new uPlot(opts, data, this.box);
  }
}
