// The dashboard: daemon, jobs, one loss chart per job, crashes, history tail; kept live by the event stream.
"use strict";
const charts = new Map();   // job -> LossChart
document.getElementById("compare-link").href = withToken("compare");
let lastPulse = null;

// A crash's latest replay (`ftctl reproduce`): its verdict, linked to the job page at that event.
function reproduction(c) {
  if (!c.verdict) {
    const cell = el("span", null, "dim");
    cell.appendChild(el("span", "not replayed: "));
    cell.appendChild(el("code", "ftctl reproduce " + c.job + " --crash " + c.number));
    return cell;
  }
  const a = el("a", c.verdict, "verdict");
  a.href = withToken("job/" + encodeURIComponent(c.job)) + "#seq-" + c.reproduction_seq;
  a.title = c.reproduction;
  a.dataset.verdict = c.verdict;
  return a;
}

// A data-parallel job's world size, with each rank's tokens/s as a tooltip; "1" for one process.
function ranks(j) {
  const cell = el("span", String(j.world_size || 1));
  if (j.rank_tokens_per_s) cell.title = j.rank_tokens_per_s.map((r, i) => "rank " + i + ": " + Math.round(r) + " tok/s").join(", ");
  if (j.hosts) cell.title = (cell.title ? cell.title + " · " : "") + "hosts " + j.hosts.join(", ");
  return cell;
}

function jobLink(job) {
  const a = el("a", job);
  a.href = withToken("job/" + encodeURIComponent(job));
  return a;
}

function showStatus(s) {
  document.getElementById("workspace").textContent = s.workspace + " · journal seq " + s.seq;
  showDaemon(s.daemon);
  const jobs = document.querySelector("#jobs tbody");
  jobs.replaceChildren();
  for (const j of s.jobs) {
    const state = el("span", j.state + (j.stale ? " (daemon dead)" : ""), "state-" + j.state + (j.stale ? " stale" : ""));
    row(jobs, [jobLink(j.job), j.name, state, [(j.iters ? j.step + "/" + j.iters + (j.epoch ? " (epoch " + j.epoch + ")" : "") : "-"), "num"], [j.global_step, "num"],
      [num(j.loss, 4), "num"], [num(j.val_loss, 4), "num"], [dur(j.eta_s), "num"], [j.checkpoints, "num"],
      [j.attempt, "num"], ranks(j), j.note || ""]).dataset.job = j.job;
  }
  const hidden = Object.entries(s.hidden || {});
  document.getElementById("hidden").textContent = hidden.length ?
    hidden.map(([k, n]) => n + " " + k).join(", ") + " job(s) not shown (as `ftctl status`)" : "";
  // Each lineage's head (the adapter later jobs warm-start from) and its branches, as the journal has them.
  document.getElementById("lineages").textContent = (s.lineages || []).filter(l => l.head_job || l.branches.length).map(l =>
    "lineage " + l.name + (l.base_version ? " (base v" + l.base_version + ")" : "") + ": head job " + (l.head_job || "-") +
    (l.branches.length ? " · branches: job " + l.branches.join(", ") + " (`ftctl lineage set-head JOB` makes one the head)" : "")
  ).join(" · ");
  const crashes = document.querySelector("#crashes tbody");
  crashes.replaceChildren();
  for (const c of s.crashes.slice().reverse()) {
    const where = c.rank === null || c.rank === undefined ? "" : " (rank " + c.rank + ", " + c.host + ")";
    row(crashes, [[when(c.ts), "time"], [c.seq, "num"], jobLink(c.job), [c.category + where, "cat"], [c.step ?? "-", "num"],
      [(c.exit_code ?? "-") + (c.signal && c.signal !== "-" ? " " + c.signal : ""), "num"], [c.evidence, "evidence"],
      c.fix, reproduction(c)]).title = c.evidence_full;
  }
  if (!s.crashes.length) row(crashes, [["no crashes recorded", "dim"]]);
  const hist = document.querySelector("#history tbody");
  hist.replaceChildren();
  for (const e of s.history.slice().reverse()) row(hist, [[when(e.ts), "time"], [e.seq, "num"], e.stream, e.type, e.details]);
}

async function loadCharts(jobs) {
  const parent = document.getElementById("charts");
  // every job's curve requested at once (the browser keeps several connections), drawn in job order
  const all = await Promise.all(jobs.map(j => api("api/jobs/" + encodeURIComponent(j.job) + "/metrics")));
  for (const [i, j] of jobs.entries()) {
    const series = all[i];
    if (!series.columns.global_step.length && !charts.has(j.job)) continue;
    if (charts.has(j.job)) charts.get(j.job).replace(series);
    else charts.set(j.job, new LossChart(parent, series));
  }
  document.body.dataset.charts = String(charts.size);
}

async function appendPoints(jobs) {
  for (const j of jobs) {
    const c = charts.get(j.job);
    if (!c) { await loadCharts([j]); continue; }
    const inc = await api("api/jobs/" + encodeURIComponent(j.job) + "/metrics?after_id=" + c.meta.last_id);
    if (inc.columns.global_step.length) c.append(inc);
  }
}

let current = null;
async function refresh(pulse) {
  const prev = lastPulse;
  lastPulse = pulse;
  if (prev && pulse && prev.seq === pulse.seq && prev.alive === pulse.alive && prev.died === pulse.died) {
    // only new reports: fetch what came after the last row each active chart has
    await appendPoints((current?.jobs || []).filter(j => j.state === "training" || j.state === "checkpointing"));
  } else {
    current = await api("api/status");
    showStatus(current);
    await loadCharts(current.jobs.filter(j => j.state !== "rejected" && (j.state !== "queued" || j.attempt > 0)));
  }
  document.body.dataset.seq = String(pulse ? pulse.seq : current.seq);
  document.body.dataset.ready = "1";
  const badge = document.getElementById("live");
  if (badge.textContent === "connecting…") badge.textContent = "loaded";
}

let chain = Promise.resolve();
function queue(pulse) { chain = chain.then(() => refresh(pulse)).catch((e) => { document.getElementById("live").textContent = String(e); }); }
queue(null);
// The stream opens once the page is drawn (in a worker: static/live.js says why).
chain.then(() => live(queue));
