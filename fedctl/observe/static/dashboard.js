/* fedctl live dashboard (docs/observability.md).
 *
 * One Server-Sent Events stream, api/stream: each `update` message is {status, rounds, events, reset}. A message
 * with reset=true (the first after every (re)connection) carries the whole round history and the last events and
 * replaces what the page holds; later ones carry only what is new. Everything from the network is inserted as
 * text (textContent, never innerHTML): worker ids and event texts are not trusted.
 */
(() => {
  "use strict";

  const MAX_EVENTS = 200;
  const STALL_MS = 15000;  // the server sends about a message a second: this long without one, the link is dead
  const RETRY_MS = 5000;   // after an HTTP error (EventSource gives up on those), try again this much later
  const DASH = "–";

  // The live state, for debugging and the browser test. Arrays are mutated in place, never replaced.
  // rounds: oldest first, one record per round, in round order. events: newest first, at most MAX_EVENTS.
  const dash = { rounds: [], events: [], status: {} };
  window.fedctlDashboard = dash;

  const $ = (id) => document.getElementById(id);

  // ---- formatting: every helper accepts anything and shows "–" for a missing value ----

  const num = (v) => (typeof v === "number" && Number.isFinite(v) ? v : null);
  const str = (v) => (v === null || v === undefined || v === "" ? DASH : String(v));
  const fixed = (v, digits) => (num(v) === null ? DASH : v.toFixed(digits));
  const int = (v) => (num(v) === null ? DASH : Math.round(v).toLocaleString("en-US"));
  const plural = (n, word) => `${n} ${word}${n === 1 ? "" : "s"}`;

  const UNITS = [[1e12, "TB"], [1e9, "GB"], [1e6, "MB"], [1e3, "kB"]];
  const unitFor = (v) => UNITS.find(([size]) => Math.abs(v) >= size) || [1, "B"];

  function bytes(v) {
    if (num(v) === null) return DASH;
    const [size, unit] = unitFor(v);
    return size === 1 ? `${Math.round(v)} B` : `${(v / size).toFixed(1)} ${unit}`;
  }

  // "3.1 of 10.4 MB": both figures in the unit of the total.
  function bytesOf(part, total) {
    if (num(total) === null) return bytes(part);
    const [size, unit] = unitFor(total);
    const f = (v) => (num(v) === null ? DASH : size === 1 ? String(Math.round(v)) : (v / size).toFixed(1));
    return `${f(part)} of ${f(total)} ${unit}`;
  }

  function seconds(v) {
    if (num(v) === null) return DASH;
    v = Math.max(0, v);  // clocks of two machines may disagree a little
    if (v < 10) return `${v.toFixed(1)} s`;
    if (v < 60) return `${Math.round(v)} s`;
    const s = Math.round(v), pad = (n) => String(n).padStart(2, "0");
    if (s < 3600) return `${Math.floor(s / 60)} min ${pad(s % 60)} s`;
    return `${Math.floor(s / 3600)} h ${pad(Math.floor((s % 3600) / 60))} min`;
  }

  // The viewer's own convention (24 h or am/pm), with seconds.
  const clock = (unixSeconds) => new Date(unixSeconds * 1000).toLocaleTimeString([], {
    hour: "2-digit", minute: "2-digit", second: "2-digit",
  });

  function node(tag, className, text) {
    const e = document.createElement(tag);
    if (className) e.className = className;
    if (text !== undefined) e.textContent = text;
    return e;
  }

  function setText(id, text) {
    const e = $(id);
    if (e && e.textContent !== text) e.textContent = text;
  }

  // One section's bug must not take the others down with it.
  function safely(what, fn) {
    try { fn(); } catch (err) { console.error(`fedctl dashboard: ${what} failed`, err); }
  }

  // ---- round history: a column per plotted field, kept in step with dash.rounds ----

  // Appending a round is O(1) and uPlot is handed the same arrays each time (it reads them afresh on setData).
  const cols = { round: [], bytes: [], acc: [], fedAcc: [], testLoss: [], trainLoss: [], fedLoss: [] };
  const FIELDS = { acc: "test_accuracy", fedAcc: "fed_eval_accuracy", testLoss: "test_loss",
                   trainLoss: "train_loss", fedLoss: "fed_eval_loss" };
  let hasFedAcc = false, hasFedLoss = false, bytesMissing = 0, latestAccuracy = null;

  function clearColumns() {
    for (const key in cols) cols[key].length = 0;
    hasFedAcc = hasFedLoss = false;
    bytesMissing = 0;
    latestAccuracy = null;
  }

  function pushColumns(r) {
    cols.round.push(r.round);
    const b = num(r.bytes_total);
    cols.bytes.push(b);
    if (b === null) bytesMissing++;
    for (const key in FIELDS) cols[key].push(num(r[FIELDS[key]]));
    if (num(r.fed_eval_accuracy) !== null) hasFedAcc = true;
    if (num(r.fed_eval_loss) !== null) hasFedLoss = true;
    if (num(r.test_accuracy) !== null) latestAccuracy = r.test_accuracy;  // evaluation may skip rounds
  }

  // Returns whether the history changed. Records without a round number cannot be placed and are dropped.
  function addRounds(list, reset) {
    if (reset) { dash.rounds.length = 0; clearColumns(); }
    if (!Array.isArray(list)) return reset;
    let inOrder = true, added = false;
    for (const r of list) {
      if (!r || typeof r !== "object" || num(r.round) === null) continue;
      const last = dash.rounds[dash.rounds.length - 1];
      if (last && r.round <= last.round) inOrder = false;
      dash.rounds.push(r);
      if (inOrder) pushColumns(r);
      added = true;
    }
    if (!inOrder) {
      // A round sent again or out of order (not expected, but cheap to survive): one record per round, the
      // latest received, in round order, and the columns rebuilt from scratch.
      const byRound = new Map(dash.rounds.map((r) => [r.round, r]));
      const sorted = [...byRound.values()].sort((a, b) => a.round - b.round);
      dash.rounds.length = 0;
      clearColumns();
      for (const r of sorted) { dash.rounds.push(r); pushColumns(r); }
    }
    return reset || added;
  }

  // ---- charts ----

  let xMode = "round";  // or "bytes": cumulative bytes in + out (bytes_total)
  const charts = {};    // name -> {u: uPlot, zoomed: bool}
  let chartKey = "";    // what the charts were built for; a change rebuilds them

  const cssVar = (name) => getComputedStyle(document.documentElement).getPropertyValue(name).trim();

  function chartSpecs() {
    const acc = [["test accuracy", "acc", "--series-1"]];
    if (hasFedAcc) acc.push(["federated eval accuracy", "fedAcc", "--series-3", [6, 4]]);
    const loss = [["test loss", "testLoss", "--series-1"], ["train loss", "trainLoss", "--series-2"]];
    if (hasFedLoss) loss.push(["federated eval loss", "fedLoss", "--series-3", [6, 4]]);
    return {
      accuracy: { box: $("accuracy-chart"), series: acc, fmt: (v) => v.toFixed(4) },
      loss: { box: $("loss-chart"), series: loss, fmt: (v) => (Math.abs(v) >= 100 ? v.toFixed(1) : v.toFixed(4)) },
    };
  }

  function chartData(series) {
    let xs = xMode === "bytes" ? cols.bytes : cols.round;
    let ys = series.map(([, key]) => cols[key]);
    if (xMode === "bytes" && bytesMissing > 0) {
      // A round without a byte count has no place on that axis (uPlot needs every x): leave it out.
      const keep = [];
      xs.forEach((x, i) => { if (x !== null) keep.push(i); });
      xs = keep.map((i) => cols.bytes[i]);
      ys = ys.map((col) => keep.map((i) => col[i]));
    }
    return [xs, ...ys];
  }

  const chartWidth = (box) => Math.max(200, Math.floor(box.clientWidth));
  const chartHeight = (box) => (box.clientWidth < 500 ? 200 : 250);
  const xLabel = (v) => (v === null || v === undefined ? DASH : xMode === "bytes" ? bytes(v) : `round ${v}`);

  function makeChart(spec, data) {
    const grid = cssVar("--grid"), muted = cssVar("--muted");
    const axis = { stroke: muted, grid: { stroke: grid, width: 1 }, ticks: { stroke: grid, width: 1 },
                   font: "11px system-ui, sans-serif", labelFont: "11px system-ui, sans-serif" };
    const state = { u: null, zoomed: false };
    const opts = {
      width: chartWidth(spec.box),
      height: chartHeight(spec.box),
      scales: { x: { time: false } },
      series: [
        { label: xMode === "bytes" ? "traffic" : "round", value: (u, v) => xLabel(v) },
        ...spec.series.map(([label, , color, dash]) => ({
          label, stroke: cssVar(color), width: 2, dash,
          spanGaps: true,  // evaluation every k rounds leaves nulls in between: draw through them
          points: { size: 5 },
          value: (u, v) => (v === null || v === undefined ? DASH : spec.fmt(v)),
        })),
      ],
      axes: [
        { ...axis, label: xMode === "bytes" ? "bytes sent + received" : "round", labelSize: 18,
          // rounds are whole numbers: ticks at 1, 2, 5, 10... never at 2.5
          ...(xMode === "bytes" ? {} : { incrs: [1, 2, 5, 10, 20, 50, 100, 200, 500, 1e3, 2e3, 5e3, 1e4, 2e4, 5e4] }),
          values: (u, splits) => splits.map((v) => (xMode === "bytes" ? bytes(v) : String(v))) },
        { ...axis, size: 52, values: (u, splits) => splits.map((v) => +v.toPrecision(4) + "") },
      ],
      hooks: {
        // Dragging across the chart zooms; new data must then not reset the view, until a double click does.
        setSelect: [(u) => { if (u.select.width > 0) state.zoomed = true; }],
        ready: [(u) => u.over.addEventListener("dblclick", () => { state.zoomed = false; })],
      },
    };
    spec.box.textContent = "";
    state.u = new uPlot(opts, data, spec.box);
    return state;
  }

  function updateCharts() {
    if (typeof uPlot === "undefined") return;  // the chart library failed to load: the rest still works
    const key = [xMode, hasFedAcc, hasFedLoss].join();
    const specs = chartSpecs();
    for (const name in specs) {
      const spec = specs[name], data = chartData(spec.series);
      if (key !== chartKey || !charts[name]) {
        if (charts[name]) charts[name].u.destroy();
        charts[name] = makeChart(spec, data);
      } else {
        charts[name].u.setData(data, !charts[name].zoomed);
      }
      let points = 0;
      for (const v of data[1]) if (v !== null) points++;
      spec.box.dataset.points = String(points);
    }
    chartKey = key;
  }

  function resizeCharts() {
    const specs = chartSpecs();
    for (const name in charts) {
      const box = specs[name].box, u = charts[name].u;
      const width = chartWidth(box), height = chartHeight(box);
      if (u.width !== width || u.height !== height) u.setSize({ width, height });
    }
  }

  function setXMode(mode) {
    xMode = mode;
    $("x-round").setAttribute("aria-pressed", String(mode === "round"));
    $("x-bytes").setAttribute("aria-pressed", String(mode === "bytes"));
    safely("charts", updateCharts);
  }

  // ---- status: header, progress, workers, traffic, footer ----

  function renderHeader(s) {
    setText("run-id", str(s.run_id));
    setText("model", str(s.model));
    setText("strategy", str(s.strategy));
    setText("policy", str(s.policy));
    const round = `${str(num(s.round))} / ${str(num(s.rounds))}`;
    setText("round", round);
    const last = s.last_round && typeof s.last_round === "object" ? s.last_round : {};
    setText("accuracy", fixed(latestAccuracy ?? num(last.test_accuracy), 4));
    setText("connected", str(num(s.workers_connected)));
    const waiting = num(s.workers_waiting);
    setText("connected-note", waiting === null ? "" : `${waiting} waiting for work`);
    const eps = num(s.dp_epsilon);
    $("epsilon-box").hidden = eps === null;
    if (eps !== null) setText("epsilon", eps.toFixed(3));
    document.title = `fedctl · round ${round}${s.finished === true ? " · finished" : ""}`;
  }

  function renderProgress(s) {
    const open = s.open_round && typeof s.open_round === "object" ? s.open_round : null;
    const bar = $("progress-bar");
    if (open) {
      const got = num(open.received) ?? 0, of = num(open.sampled) ?? 0, left = num(open.seconds_left);
      setText("progress-text", `round ${str(open.round)}: ${got} of ${plural(of, "update")}` +
              (left === null ? "" : `, ${seconds(left)} left`));
      $("progress-fill").style.width = `${of > 0 ? Math.min(100, (100 * got) / of) : 0}%`;
      bar.setAttribute("aria-valuemax", String(of));
      bar.setAttribute("aria-valuenow", String(got));
    } else if (s.finished === true) {
      setText("progress-text", "run finished");
    } else if (typeof s.policy === "string" && s.policy !== "sync") {
      // ssp/async have no rounds to wait for: updates are applied as they come.
      setText("progress-text", `no open round (${s.policy}: updates are applied as they arrive), ` +
              `model version ${str(num(s.version))}`);
    } else {
      setText("progress-text", "between rounds");
    }
    bar.hidden = !open;

    const t = s.transfers && typeof s.transfers === "object" ? s.transfers : {};
    const inbound = num(t.inbound) ?? 0, outbound = num(t.outbound) ?? 0;
    const parts = [];
    if (inbound > 0) {
      parts.push(`${plural(inbound, "upload")} in progress, ${bytesOf(t.inbound_bytes, t.inbound_total_bytes)}`);
    }
    if (outbound > 0) parts.push(`${plural(outbound, "model download")} in progress`);
    $("transfers").hidden = parts.length === 0;
    setText("transfers", parts.join(" · "));

    const applied = num(s.applied_updates);
    setText("totals", `model version ${str(num(s.version))}` +
            (applied === null ? "" : ` · ${int(applied)} updates applied`));
  }

  const STATES = new Set(["uploading", "downloading", "waiting", "training", "idle"]);

  function workerRow(w) {
    const tr = document.createElement("tr");
    const cell = (text, className) => tr.appendChild(node("td", className, text));
    const id = cell(str(w.worker), "id");
    tr.dataset.worker = str(w.worker);
    const details = [`${int(w.num_examples)} examples`, `connected ${seconds(w.connected_s)}`,
                     `holds model version ${str(num(w.holds_version))}`];
    if (w.waiting === true) details.push("waiting for work");
    id.title = `${str(w.worker)}\n${details.join("\n")}`;

    const pill = node("span", "pill", str(w.state));
    pill.dataset.state = STATES.has(w.state) ? w.state : "other";
    tr.appendChild(node("td")).appendChild(pill);
    cell(str(w.backend));
    cell(str(w.device));
    cell(str(w.address));
    cell(num(w.silent_s) === null ? DASH : `${seconds(w.silent_s)} ago`);
    cell(int(w.updates), "num");
    cell(`${bytes(w.bytes_in)} / ${bytes(w.bytes_out)}`, "num");
    cell(str(num(w.staleness)), "num");
    const rtt = num(w.rtt_s);
    cell(rtt === null ? DASH : `${(rtt * 1000).toFixed(rtt < 0.01 ? 1 : 0)} ms`, "num");
    cell(num(w.link_bps) === null ? DASH : `${(w.link_bps / 1e6).toFixed(1)} Mbit/s`, "num");
    return tr;
  }

  function renderWorkers(s) {
    const list = Array.isArray(s.workers) ? s.workers.filter((w) => w && typeof w === "object") : [];
    const total = num(s.workers_total) ?? list.length;
    $("workers-note").hidden = total <= list.length;
    setText("workers-note", `showing ${list.length} of ${total}`);
    $("workers-empty").hidden = list.length > 0;
    $("workers").hidden = list.length === 0;
    const rows = document.createDocumentFragment();
    for (const w of list) rows.appendChild(workerRow(w));
    $("workers").tBodies[0].replaceChildren(rows);  // one rebuild per message
  }

  // A two-column table from a {name: number} map, largest first; rebuilt only when the map changes.
  const tableKeys = {};
  function renderCounts(id, map, format) {
    const entries = map && typeof map === "object"
      ? Object.entries(map).filter(([, v]) => num(v) !== null).sort((a, b) => b[1] - a[1]) : [];
    const key = JSON.stringify(entries);
    if (tableKeys[id] === key) return;
    tableKeys[id] = key;
    const rows = document.createDocumentFragment();
    for (const [name, value] of entries) {
      const tr = rows.appendChild(document.createElement("tr"));
      tr.append(node("td", "", name), node("td", "num", format(value)));
    }
    $(id).tBodies[0].replaceChildren(rows);
    $(id).hidden = entries.length === 0;
    $(`${id}-empty`).hidden = entries.length > 0;
  }

  function renderFooter(s) {
    const parts = [["endpoint", "endpoint", "footer-endpoint"], ["state_dir", "state-dir", "footer-state"]];
    for (const [field, id, box] of parts) {
      const value = typeof s[field] === "string" ? s[field] : "";
      $(box).hidden = value === "";
      setText(id, value);
    }
  }

  // ---- events ----

  // Returns whether the list changed.
  function addEvents(list, reset) {
    if (reset) dash.events.length = 0;
    if (!Array.isArray(list) || list.length === 0) return reset;
    const now = Date.now() / 1000;
    const incoming = list.filter((e) => e && typeof e === "object")
      .sort((a, b) => (num(a.seq) ?? 0) - (num(b.seq) ?? 0));
    for (const e of incoming) {
      const top = dash.events[0];
      if (top && num(e.seq) !== null && num(top.seq) !== null && e.seq <= top.seq) continue;  // already held
      const event = { ...e, at: now - (num(e.age_s) ?? 0) };  // `at`: unix seconds, by this browser's clock
      // A burst of refusals is coalesced by the server: it re-sends the event with a new seq and a higher count.
      if (top && e.kind === "refused" && top.kind === "refused" && (num(e.count) ?? 1) > 1 &&
          e.worker === top.worker && e.code === top.code) {
        dash.events[0] = event;
      } else {
        dash.events.unshift(event);
      }
    }
    if (dash.events.length > MAX_EVENTS) dash.events.length = MAX_EVENTS;
    return true;
  }

  function renderEvents() {
    const items = document.createDocumentFragment();
    for (const e of dash.events) {
      const li = items.appendChild(document.createElement("li"));
      const time = node("time", "", clock(e.at));
      time.dateTime = new Date(e.at * 1000).toISOString();
      const tag = node("span", "tag", str(e.kind));
      tag.dataset.kind = typeof e.kind === "string" ? e.kind : "other";
      li.append(time, tag, node("span", "text", str(e.text)));
      if ((num(e.count) ?? 1) > 1) li.append(node("span", "count", `×${e.count}`));
      const about = [e.worker && `worker ${e.worker}`, e.code && `code ${e.code}`].filter(Boolean);
      if (about.length) li.title = about.join(", ");
    }
    $("events").replaceChildren(items);
    $("events-empty").hidden = dash.events.length > 0;
  }

  // ---- the stream ----

  let source = null, lastMessage = 0, finished = false, retry = null;
  const CONN_TEXT = { connecting: "connecting…", live: "live", reconnecting: "reconnecting…", finished: "finished" };

  function setConn(state) {
    $("conn").dataset.state = state;
    setText("conn", CONN_TEXT[state]);
  }

  function ingest(msg) {
    if (!msg || typeof msg !== "object") return;
    const reset = msg.reset === true;
    let roundsChanged = false, eventsChanged = false;
    safely("rounds", () => { roundsChanged = addRounds(msg.rounds, reset); });
    safely("events", () => { eventsChanged = addEvents(msg.events, reset); });
    if (msg.status && typeof msg.status === "object") dash.status = msg.status;
    const s = dash.status;
    finished = s.finished === true;
    setConn(finished ? "finished" : "live");
    safely("header", () => renderHeader(s));
    safely("progress", () => renderProgress(s));
    safely("workers", () => renderWorkers(s));
    safely("traffic", () => {
      renderCounts("bytes-by-type", s.bytes_in_by_type, bytes);
      renderCounts("refused", s.refused, int);
    });
    safely("footer", () => renderFooter(s));
    if (eventsChanged) safely("events", renderEvents);
    if (roundsChanged) safely("charts", updateCharts);
  }
  dash.ingest = ingest;  // lets a test or a console feed a message without a server

  function onMessage(e) {
    lastMessage = Date.now();
    let msg;
    try { msg = JSON.parse(e.data); } catch (err) { console.warn("fedctl dashboard: unreadable message", err); return; }
    ingest(msg);
  }

  function connect() {
    clearTimeout(retry);
    if (source) source.close();
    lastMessage = Date.now();
    source = new EventSource("api/stream");
    source.addEventListener("update", onMessage);
    source.addEventListener("message", onMessage);  // in case a server leaves the event name out
    source.onerror = () => {
      if (finished) { source.close(); return; }  // the run is over and its server gone: keep the final picture
      setConn("reconnecting");
      // EventSource retries a dropped connection by itself, but gives up after an HTTP error: we don't.
      if (source.readyState === EventSource.CLOSED) retry = setTimeout(connect, RETRY_MS);
    };
  }

  // ---- start ----

  $("x-round").addEventListener("click", () => setXMode("round"));
  $("x-bytes").addEventListener("click", () => setXMode("bytes"));
  setXMode("round");  // also draws the (empty) charts: data-points starts at "0"

  // Charts follow their boxes' width (window resize, rotation, the grid going to one column).
  if (typeof ResizeObserver === "function") {
    const observer = new ResizeObserver(() => safely("resize", resizeCharts));
    observer.observe($("accuracy-chart"));
    observer.observe($("loss-chart"));
  } else {
    window.addEventListener("resize", () => safely("resize", resizeCharts));
  }
  // Chart colours come from CSS variables: rebuild the charts when the colour scheme flips.
  window.matchMedia("(prefers-color-scheme: dark)").addEventListener?.("change", () => {
    chartKey = "";
    safely("charts", updateCharts);
  });

  // A silently dead TCP connection can go unnoticed for minutes: reopen the stream when it goes quiet.
  setInterval(() => {
    if (!finished && source && source.readyState !== EventSource.CLOSED && Date.now() - lastMessage > STALL_MS) {
      setConn("reconnecting");
      connect();
    }
  }, 5000);

  if (typeof EventSource === "function") connect();
  else setText("progress-text", "this browser cannot follow the live stream: read api/status");
})();
