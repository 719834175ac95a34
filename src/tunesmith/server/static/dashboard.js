// The dashboard's two pages (jobs list, one job) drawn from the JSON under /dashboard/api/.
// Every piece of user text goes in through textContent (never innerHTML), so a job's suffix, metadata or an
// example's text is shown, never run.
"use strict";

const KEY_STORE = "tunesmith.api_key";
const ACTIVE = new Set(["validating_files", "queued", "running"]);
const POLL_MS = 2000;
const STEP_TICKS = [1, 2, 5, 10, 20, 25, 50, 100, 200, 250, 500, 1000, 2000, 2500, 5000, 10000, 20000, 50000, 100000];

function apiKey() { return window.localStorage.getItem(KEY_STORE); }

function el(tag, props, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(props || {})) {
    if (k === "text") node.textContent = v;
    else if (k === "class") node.className = v;
    else node.setAttribute(k, v);
  }
  for (const child of children) node.append(child);
  return node;
}

class NeedsKey extends Error {}

async function getJSON(path) {
  const key = apiKey();
  const response = await fetch(path, { headers: key ? { Authorization: `Bearer ${key}` } : {} });
  if (response.status === 401) { showKeyForm(); throw new NeedsKey(); }
  const body = await response.json();
  // the API's OpenAI-style envelope, or FastAPI's own {"detail": ...} where no handler rewrote it
  if (!response.ok) throw new Error(body.error ? body.error.message : body.detail);
  return body;
}

function showKeyForm() {
  const section = document.getElementById("key-form");
  section.hidden = false;
  section.querySelector("form").onsubmit = (event) => {
    event.preventDefault();
    window.localStorage.setItem(KEY_STORE, event.target.key.value.trim());
    window.location.reload();
  };
}

function showError(err) {
  if (err instanceof NeedsKey) return;
  const box = document.getElementById("error");
  box.textContent = `Could not load: ${err.message}`;
  box.hidden = false;
}

function when(seconds) {
  return seconds ? new Date(seconds * 1000).toISOString().replace("T", " ").slice(0, 19) + " UTC" : "—";
}

function num(x, digits = 4) { return x === null || x === undefined ? "—" : Number(x).toFixed(digits); }

function statusBadge(status) { return el("span", { class: `status ${status}`, text: status }); }

// --- jobs list --------------------------------------------------------------------------------------------------

async function jobsPage() {
  const body = document.querySelector("#jobs tbody");
  async function refresh() {
    const { data } = await getJSON("/dashboard/api/jobs");
    body.replaceChildren(...data.map((job) => el("tr", { "data-job": job.id },
      el("td", { class: "mono nowrap" }, el("a", { href: `/jobs/${encodeURIComponent(job.id)}`, text: job.id })),
      el("td", {}, statusBadge(job.status)),
      el("td", { class: "mono", text: job.model }),
      el("td", { class: "nowrap", text: when(job.created_at) }),
      el("td", { class: "mono", text: job.fine_tuned_model || "—" }))));
    document.getElementById("empty").hidden = data.length > 0;
    document.body.dataset.loaded = "true";
    return data.some((job) => ACTIVE.has(job.status));
  }
  loop(refresh, 5000);
}

async function loop(refresh, everyMs) {
  // refresh() says whether something is still changing; polling stops once nothing is.
  try {
    if (await refresh()) window.setTimeout(() => loop(refresh, everyMs), everyMs);
  } catch (err) { showError(err); }
}

// --- one job ----------------------------------------------------------------------------------------------------

async function jobPage() {
  const jobId = decodeURIComponent(window.location.pathname.split("/").pop());
  document.getElementById("job-id").textContent = jobId;
  document.title = `tunesmith — ${jobId}`;
  const chart = lossChart(document.getElementById("loss-chart"));
  async function refresh() {
    const view = await getJSON(`/dashboard/api/jobs/${encodeURIComponent(jobId)}`);
    summary(view.job);
    chart.update(view.metrics);
    checkpoints(view.checkpoints);
    events(view.events);
    evaluation(view.eval);
    artefacts(view.artefacts);
    document.body.dataset.loaded = "true";
    return ACTIVE.has(view.job.status);
  }
  loop(refresh, POLL_MS);
}

function summary(job) {
  const cards = [
    ["Status", statusBadge(job.status)], ["Base model", job.model],
    ["Fine-tuned model", job.fine_tuned_model || "—"], ["Created", when(job.created_at)],
    ["Finished", when(job.finished_at)], ["Trained tokens", job.trained_tokens ?? "—"],
    ["Method", job.method.type],
    ...Object.entries(job.hyperparameters).map(([k, v]) => [k.replaceAll("_", " "), String(v)]),
  ];
  if (job.suffix) cards.push(["Suffix", job.suffix]);
  if (job.error) cards.push(["Error", `${job.error.code}: ${job.error.message}`]);
  document.getElementById("summary").replaceChildren(...cards.map(([label, value]) => el("div", { class: "card" },
    el("div", { class: "label", text: label }),
    typeof value === "string" || typeof value === "number" ? el("div", { class: "value", text: String(value) })
      : el("div", { class: "value" }, value))));
}

function lossChart(container) {
  let plot = null;
  let firstDrawn = false;
  function size() { return { width: Math.max(320, container.clientWidth - 16), height: 300 }; }
  function aligned(metrics) {
    const train = [metrics.train.step, metrics.train.loss];
    if (metrics.eval.step.length === 0) return [train[0], train[1], train[0].map(() => null)];
    if (metrics.train.step.length === 0) return [metrics.eval.step, metrics.eval.step.map(() => null), metrics.eval.eval_loss];
    return uPlot.join([train, [metrics.eval.step, metrics.eval.eval_loss]]);
  }
  function drawn(u) {
    // What tests and the render benchmark read: the points drawn and when the first draw ended.
    const points = u.data.slice(1).reduce((n, ys) => n + ys.filter((y) => y !== null && y !== undefined).length, 0);
    container.dataset.points = String(points);
    container.dataset.trainPoints = String(u.data[1].filter((y) => y != null).length);
    container.dataset.evalPoints = String(u.data[2].filter((y) => y != null).length);
    if (!firstDrawn) {
      firstDrawn = true;
      container.dataset.firstDrawnMs = performance.now().toFixed(1);  // since navigation started
      container.dataset.firstDrawnEpochMs = (performance.timeOrigin + performance.now()).toFixed(1);
    }
  }
  return {
    update(metrics) {
      const empty = metrics.train.step.length === 0 && metrics.eval.step.length === 0;
      document.getElementById("no-metrics").hidden = !empty;
      if (empty) return;
      const data = aligned(metrics);
      if (plot) { plot.setData(data); return; }
      plot = new uPlot({
        ...size(),
        scales: { x: { time: false } },
        // steps are whole numbers: tick only at whole increments
        axes: [{ label: "step", incrs: STEP_TICKS }, { label: "loss" }],
        series: [
          { label: "step" },
          { label: "train loss", stroke: "#2f6fde", width: 1.5, spanGaps: true, points: { show: false } },
          { label: "eval loss", stroke: "#e8710a", width: 2, spanGaps: true, points: { show: true, size: 6 } },
        ],
        hooks: { draw: [drawn] },
      }, data, container);
      window.addEventListener("resize", () => plot.setSize(size()));
    },
  };
}

function checkpoints(rows) {
  document.querySelector("#checkpoints tbody").replaceChildren(...rows.map((c) => el("tr", {},
    el("td", { text: String(c.step_number) }), el("td", { text: num(c.metrics.train_loss) }),
    el("td", { text: num(c.metrics.valid_loss) }), el("td", { class: "mono", text: c.fine_tuned_model_checkpoint }))));
  document.getElementById("no-checkpoints").hidden = rows.length > 0;
}

function events(rows) {
  document.getElementById("events").replaceChildren(...rows.map((e) => el("li", { class: e.level },
    el("span", { class: "time", text: when(e.created_at).slice(11) }), e.message)));
}

function evaluation(view) {
  const section = document.getElementById("eval-section");
  section.hidden = !view;
  if (!view) return;
  document.querySelector("#eval-metrics tbody").replaceChildren(...view.metrics.map((m) => el("tr", {},
    el("td", { text: m.name }), el("td", { text: interval(m.base, m.base_ci) }),
    el("td", { text: interval(m.tuned, m.tuned_ci) }),
    el("td", { text: m.base !== null && m.tuned !== null ? signed(m.tuned - m.base) : "—" }))));
  const counts = view.flip_counts;
  document.getElementById("flips-title").textContent =
    `Examples that flipped: ${counts.fixed} wrong → right, ${counts.broken} right → wrong` +
    (view.num_eval ? ` (of ${view.num_eval})` : "");
  const cell = (label, text) => el("div", {}, el("div", { class: "k", text: label }), el("pre", { text }));
  document.getElementById("flips").replaceChildren(...view.flips.map((f) => el("div", { class: "flip" },
    el("div", { class: `dir ${f.direction}`, text: f.direction === "fixed" ? "wrong → right" : "right → wrong" }),
    el("div", { class: "grid" }, cell("prompt", f.prompt), cell("expected", f.expected), cell("base", f.base),
      cell("tuned", f.tuned)))));
}

function interval(mean, ci) {
  if (mean === null) return "—";
  return ci ? `${mean.toFixed(3)} [${ci[0].toFixed(3)}, ${ci[1].toFixed(3)}]` : mean.toFixed(3);
}

function signed(x) { return (x >= 0 ? "+" : "") + x.toFixed(3); }

function artefacts(rows) {
  document.getElementById("artefacts-section").hidden = rows.length === 0;
  document.getElementById("artefacts").replaceChildren(...rows.map((a) => {
    const link = el("a", { href: a.href, text: a.name, download: a.filename });
    link.onclick = (event) => { if (apiKey()) { event.preventDefault(); downloadWithKey(a); } };
    return el("li", {}, link, el("span", { class: "muted", text: ` — ${a.filename}` }));
  }));
}

async function downloadWithKey(artefact) {
  // A plain link cannot carry the Authorization header, so with a key the file comes through fetch.
  const response = await fetch(artefact.href, { headers: { Authorization: `Bearer ${apiKey()}` } });
  if (!response.ok) { showError(new Error(`HTTP ${response.status} for ${artefact.filename}`)); return; }
  const url = URL.createObjectURL(await response.blob());
  const link = el("a", { href: url, download: artefact.filename });
  document.body.append(link);
  link.click();
  link.remove();
  URL.revokeObjectURL(url);
}

if (document.body.dataset.page === "jobs") jobsPage();
else jobPage();
