// The job page: every point (superseded ones flagged), markers, the job's events, and replay at any event.
"use strict";
const JOB = decodeURIComponent(location.pathname.split("/").filter(Boolean).pop());
document.getElementById("job-id").textContent = JOB;
document.getElementById("home").href = withToken("../");
document.title = "ftctl job " + JOB;
let chart = null, pairChart = null, lastPulse = null;

async function showReplay(seq) {
  const title = document.getElementById("replay-title"), body = document.getElementById("replay-body");
  if (seq === null) {
    const j = await api("api/jobs/" + encodeURIComponent(JOB));
    title.textContent = "state now (journal seq " + j.seq + ")";
    document.getElementById("job-id").textContent = JOB + " " + j.job.name;
    document.title = "ftctl job " + JOB + " " + j.job.name;
    const cmp = document.getElementById("compare-link");  // the lineage's runs, this one among them
    cmp.href = withToken("../compare?lineage=" + encodeURIComponent(j.job.lineage));
    cmp.textContent = "compare with its lineage (" + j.job.lineage + ")";
    body.replaceChildren(statePanel(j.job));
    return;
  }
  const past = await api("api/jobs/" + encodeURIComponent(JOB) + "/replay?to=" + seq);
  title.textContent = "state right after event " + seq + " (ftctl replay " + JOB + " --to " + seq + ")";
  body.replaceChildren(statePanel(past));
  const back = el("a", "back to the state now");
  back.href = "#";
  back.onclick = (ev) => { ev.preventDefault(); delete document.body.dataset.replay; history.replaceState(null, "", location.pathname + location.search); showReplay(null); };
  body.prepend(back);
  document.body.dataset.replay = String(seq);
}

async function refresh(pulse) {
  lastPulse = pulse || lastPulse;
  const series = await api("api/jobs/" + encodeURIComponent(JOB) + "/metrics?all=1");
  if (chart) chart.replace(series);
  else chart = new LossChart(document.getElementById("charts"), series, { height: 360, superseded: true });
  // a preference job (dpo, orpo): its rewards, margin and accuracy beside the loss
  if (pairChart) pairChart.replace(series);
  else if (hasPairs(series)) pairChart = new PairChart(document.getElementById("charts"), series, { height: 360 });
  const ul = document.getElementById("markers");
  ul.replaceChildren();
  for (const m of series.markers) ul.appendChild(el("li", "global step " + m.global_step + ": " + m.text + " (event " + m.seq + ")"));
  const j = await api("api/jobs/" + encodeURIComponent(JOB));
  const tbody = document.querySelector("#events tbody");
  tbody.replaceChildren();
  for (const e of j.events.slice().reverse()) {
    const a = el("a", "replay");
    a.href = "#seq-" + e.seq;
    a.onclick = (ev) => { ev.preventDefault(); history.replaceState(null, "", "#seq-" + e.seq); showReplay(e.seq); };
    row(tbody, [[when(e.ts), "time"], [e.seq, "num"], e.type, e.details, a]);
  }
  const asked = /^#seq-(\d+)$/.exec(location.hash);
  if (asked && !document.body.dataset.replay) await showReplay(Number(asked[1]));
  else if (!document.body.dataset.replay) await showReplay(null);
  document.body.dataset.ready = "1";
  const badge = document.getElementById("live");
  if (badge.textContent === "connecting…") badge.textContent = "loaded";
}

let chain = Promise.resolve();
function queue(pulse) {
  chain = chain.then(async () => {
    if (pulse) {
      const s = await api("api/status");
      showDaemon(s.daemon);
    }
    await refresh(pulse);
  }).catch((e) => { document.getElementById("live").textContent = String(e); });
}
api("api/status").then(s => showDaemon(s.daemon));
queue(null);
// The stream opens once the page is drawn (in a worker: static/live.js says why).
chain.then(() => live(queue));
