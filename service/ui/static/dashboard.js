// gpuyard's dashboard: live curves (uPlot, fed by the job's Server-Sent Events), the gradient-flow view,
// the compare page, the upload with progress, and the submit page's dry run. No build step.
(function () {
  "use strict";

  var COLORS = ["#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf"];
  var charts = [];

  function csrfToken() {
    var meta = document.querySelector('meta[name="csrf-token"]');
    return meta ? meta.content : "";
  }

  function clear(node) { while (node.firstChild) node.removeChild(node.firstChild); }

  function el(tag, text, className) {
    var node = document.createElement(tag);
    if (text !== undefined && text !== null) node.textContent = String(text);
    if (className) node.className = className;
    return node;
  }

  function fmt(v) {
    if (v === null || v === undefined) return "—";
    if (typeof v === "number" && Number.isInteger(v)) return v.toLocaleString("en-US");
    if (typeof v === "number") return Math.abs(v) >= 1e4 || (v !== 0 && Math.abs(v) < 1e-3) ? v.toExponential(3) : String(+v.toPrecision(4));
    return String(v);
  }

  function bytes(n) {
    if (n === null || n === undefined) return "—";
    var units = ["B", "KiB", "MiB", "GiB", "TiB"], i = 0;
    while (n >= 1024 && i < units.length - 1) { n /= 1024; i++; }
    return (i ? n.toFixed(1) : n) + " " + units[i];
  }

  // One uPlot line chart in `container`: x = epochs, one series per label; replaced when labels change.
  function lineChart(container, labels, data, logY) {
    // How many values it draws (not counting gaps): what the browser test reads.
    container.dataset.values = String(data.slice(1).reduce(function (n, ys) {
      return n + ys.filter(function (y) { return y !== null && y !== undefined; }).length;
    }, 0));
    if (container._chart) {
      if (container._labels === labels.join("\u0000")) { container._chart.setData(data); return container._chart; }
      container._chart.destroy();
      charts = charts.filter(function (c) { return c !== container._chart; });
    }
    clear(container);
    var series = [{ label: "epoch" }];
    labels.forEach(function (label, i) {
      series.push({ label: label, stroke: COLORS[i % COLORS.length], width: 2, spanGaps: true, points: { show: true, size: 5 } });
    });
    var opts = {
      width: Math.max(260, container.clientWidth || 600),
      height: 240,
      series: series,
      scales: { x: { time: false }, y: logY ? { distr: 3 } : {} },
      axes: [{ label: "epoch" }, {}],
      legend: { live: false },
    };
    var chart = new uPlot(opts, data, container);
    container._chart = chart;
    container._labels = labels.join("\u0000");
    charts.push(chart);
    return chart;
  }

  window.addEventListener("resize", function () {
    charts.forEach(function (chart) {
      var parent = chart.root.parentNode;
      if (parent) chart.setSize({ width: Math.max(260, parent.clientWidth), height: 240 });
    });
  });

  // ── one job: curves from the event stream ──
  function jobCurves(section) {
    var terminal = JSON.parse(section.dataset.terminalStates || "[]");
    var rows = [];
    var lossBox = document.getElementById("loss-chart");
    var metricBox = document.getElementById("metric-chart");

    function redraw() {
      rows.sort(function (a, b) { return a.epoch - b.epoch; });
      var epochs = rows.map(function (r) { return r.epoch; });
      var lossKeys = ["loss"];
      var metricKeys = [];
      rows.forEach(function (r) {
        Object.keys(r.metrics).forEach(function (k) {
          if (k === "val_loss") { if (lossKeys.indexOf(k) < 0) lossKeys.push(k); }
          else if (metricKeys.indexOf(k) < 0) metricKeys.push(k);
        });
      });
      metricKeys.sort(function (a, b) { return a.replace(/^val_/, "").localeCompare(b.replace(/^val_/, "")) || a.length - b.length; });
      var value = function (r, k) { return k === "loss" ? r.loss : (r.metrics[k] === undefined ? null : r.metrics[k]); };
      lineChart(lossBox, lossKeys, [epochs].concat(lossKeys.map(function (k) { return rows.map(function (r) { return value(r, k); }); })));
      if (metricKeys.length) {
        lineChart(metricBox, metricKeys, [epochs].concat(metricKeys.map(function (k) { return rows.map(function (r) { return value(r, k); }); })));
      }
      section.dataset.points = String(rows.length);
    }

    // Per-epoch gradient-flow records, from the trainer's "diagnostics" events (redrawn once per frame).
    var flowRecords = [];
    var flowPending = false;
    function drawFlowSoon() {
      if (flowPending) return;
      flowPending = true;
      window.requestAnimationFrame(function () {
        flowPending = false;
        flowRecords.sort(function (a, b) { return a.epoch - b.epoch; });
        var flow = document.getElementById("gradient-flow");
        if (flow) flow.dataset.loaded = "events";
        var note = document.getElementById("gradient-note");
        if (note) note.textContent = "Per block, measured on a fixed probe batch after every epoch (epoch 0: before training).";
        drawGradientFlow(flowRecords);
      });
    }

    var source = new EventSource(section.dataset.eventsUrl);
    source.addEventListener("diagnostics", function (e) {
      var d = JSON.parse(e.data);
      flowRecords = flowRecords.filter(function (r) { return r.epoch !== d.epoch; });
      flowRecords.push({ epoch: d.epoch, blocks: d.blocks || {} });
      drawFlowSoon();
    });
    source.addEventListener("epoch_end", function (e) {
      var d = JSON.parse(e.data);
      rows = rows.filter(function (r) { return r.epoch !== d.epoch; });  // a resumed job repeats an epoch
      rows.push({ epoch: d.epoch, loss: d.loss, metrics: d.metrics || {} });
      redraw();
    });
    source.addEventListener("state", function (e) {
      var d = JSON.parse(e.data);
      var badge = document.getElementById("job-state");
      if (badge) { badge.textContent = d.state; badge.className = "state state-" + d.state; }
      if (terminal.indexOf(d.state) >= 0) {
        source.close();
        section.dataset.ended = d.state;
        var status = document.getElementById("job-status");
        if (status && window.htmx) window.htmx.trigger(status, "refresh");
        // A job trained before diagnostics events existed: draw from its diagnostics.json instead.
        var flow = document.getElementById("gradient-flow");
        if (flow && !flowRecords.length) setTimeout(function () { gradientFlow(flow, true); }, 500);
      }
    });
    source.onerror = function () {
      if (section.dataset.ended) source.close();
    };
  }

  // ── one job: gradient flow from diagnostics.json ──
  function gradientFlow(section, retry) {
    if (section.dataset.loaded) return;
    fetch(section.dataset.diagnosticsUrl, { credentials: "same-origin" }).then(function (response) {
      if (!response.ok) {
        if (retry) setTimeout(function () { gradientFlow(section, false); }, 2000);
        return null;
      }
      return response.json();
    }).then(function (records) {
      if (!records || !records.length || section.dataset.loaded) return;
      section.dataset.loaded = "yes";
      var note = document.getElementById("gradient-note");
      if (note) note.textContent = "Per block, measured on a fixed probe batch after every epoch (epoch 0: before training).";
      drawGradientFlow(records);
    }).catch(function () { /* no diagnostics (yet) */ });
  }

  function blockNames(records) {
    var names = [];
    records.forEach(function (r) {
      Object.keys(r.blocks || {}).forEach(function (b) { if (names.indexOf(b) < 0) names.push(b); });
    });
    return names;
  }

  function drawGradientFlow(records) {
    var blocks = blockNames(records);
    var epochs = records.map(function (r) { return r.epoch; });
    var norm = function (r, b) { var e = (r.blocks || {})[b]; return e && e.gradient_norm > 0 ? e.gradient_norm : null; };
    drawHeatmap(document.getElementById("gradient-heatmap"), document.getElementById("heatmap-legend"), blocks, records, norm);
    // The ratio's ends: the first and last block that has a gradient (an input block has none).
    var learning = blocks.filter(function (b) { return records.some(function (r) { return norm(r, b); }); });
    var first = learning[0], last = learning[learning.length - 1];
    var ratios = records.map(function (r) { var a = norm(r, first), z = norm(r, last); return a && z ? a / z : null; });
    lineChart(document.getElementById("ratio-chart"), [first + " / " + last], [epochs, ratios], true);
    var stat = function (key) {
      return [epochs].concat(blocks.map(function (b) {
        return records.map(function (r) { var e = (r.blocks || {})[b]; return e && typeof e[key] === "number" ? e[key] : null; });
      }));
    };
    lineChart(document.getElementById("activation-mean-chart"), blocks, stat("activation_mean"), false);
    lineChart(document.getElementById("activation-std-chart"), blocks, stat("activation_std"), false);
  }

  // Viridis-like ramp: dark purple (small gradient) → yellow (large).
  var RAMP = [[68, 1, 84], [59, 82, 139], [33, 145, 140], [94, 201, 98], [253, 231, 37]];
  function rampColor(t) {
    t = Math.max(0, Math.min(1, t)) * (RAMP.length - 1);
    var i = Math.min(RAMP.length - 2, Math.floor(t)), f = t - i, a = RAMP[i], b = RAMP[i + 1];
    return "rgb(" + [0, 1, 2].map(function (k) { return Math.round(a[k] + (b[k] - a[k]) * f); }).join(",") + ")";
  }

  // Where each sampled epoch's column sits: at its true epoch on a linear axis from the first to the last
  // epoch, as wide as the gap to the next sample (epochs 0, 1, 17, 28 are not four equal steps).
  function heatmapColumns(epochs, left, width) {
    if (!epochs.length) return [];
    var first = epochs[0], span = epochs[epochs.length - 1] - first + 1;
    var unit = width / Math.max(1, span);
    return epochs.map(function (e, i) {
      var next = i + 1 < epochs.length ? epochs[i + 1] : e + 1;
      return { x: left + (e - first) * unit, w: Math.max(1, next - e) * unit, unit: unit };
    });
  }

  function drawHeatmap(canvas, legend, blocks, records, norm) {
    if (!canvas) return;
    var ratio = window.devicePixelRatio || 1;
    var cssWidth = Math.max(260, canvas.parentNode.clientWidth || 640);
    var labelWidth = Math.min(140, cssWidth * 0.3), axisHeight = 22;
    var rowHeight = Math.max(10, Math.min(28, 240 / Math.max(1, blocks.length)));
    var cssHeight = blocks.length * rowHeight + axisHeight;
    canvas.width = cssWidth * ratio; canvas.height = cssHeight * ratio;
    canvas.style.width = cssWidth + "px"; canvas.style.height = cssHeight + "px";
    var ctx = canvas.getContext("2d");
    ctx.setTransform(ratio, 0, 0, ratio, 0, 0);
    ctx.clearRect(0, 0, cssWidth, cssHeight);
    var logs = [];
    records.forEach(function (r) { blocks.forEach(function (b) { var v = norm(r, b); if (v) logs.push(Math.log10(v)); }); });
    var lo = Math.min.apply(null, logs), hi = Math.max.apply(null, logs);
    if (!isFinite(lo)) { lo = 0; hi = 1; }
    if (hi - lo < 1e-9) hi = lo + 1;
    var columns = heatmapColumns(records.map(function (r) { return r.epoch; }), labelWidth, cssWidth - labelWidth);
    ctx.font = "11px system-ui, sans-serif";
    ctx.textBaseline = "middle";
    blocks.forEach(function (b, row) {
      ctx.fillStyle = "#222";
      ctx.textAlign = "right";
      var label = b.length > 20 ? b.slice(0, 19) + "…" : b;
      ctx.fillText(label, labelWidth - 4, row * rowHeight + rowHeight / 2);
      records.forEach(function (r, col) {
        var v = norm(r, b);
        ctx.fillStyle = v ? rampColor((Math.log10(v) - lo) / (hi - lo)) : "#ddd";
        ctx.fillRect(columns[col].x, row * rowHeight, Math.ceil(columns[col].w), rowHeight - 1);
      });
    });
    ctx.fillStyle = "#222";
    ctx.textAlign = "center";
    var lastLabel = -Infinity;
    records.forEach(function (r, col) {
      var at = columns[col].x + Math.min(columns[col].w, columns[col].unit) / 2;
      if (at - lastLabel < 28) return;  // no overlapping labels
      ctx.fillText(String(r.epoch), at, blocks.length * rowHeight + axisHeight / 2);
      lastLabel = at;
    });
    canvas.dataset.cells = String(blocks.length * records.length);
    canvas.dataset.columns = JSON.stringify(columns.map(function (c) { return Math.round(c.x); }));
    if (legend) legend.textContent = "colour: log10(gradient norm) from " + lo.toFixed(2) + " (dark) to " + hi.toFixed(2) + " (yellow); x: epoch, y: block (input side on top)";
  }

  // ── compare ──
  function compare(dataNode) {
    var jobs = JSON.parse(dataNode.textContent);
    var epochSet = {};
    jobs.forEach(function (j) { (j.columns.epoch || []).forEach(function (e) { epochSet[e] = true; }); (j.ratio.epoch || []).forEach(function (e) { epochSet[e] = true; }); });
    var epochs = Object.keys(epochSet).map(Number).sort(function (a, b) { return a - b; });
    var align = function (xs, ys) {
      var byEpoch = {};
      (xs || []).forEach(function (e, i) { byEpoch[e] = ys ? ys[i] : null; });
      return epochs.map(function (e) { return byEpoch[e] === undefined ? null : byEpoch[e]; });
    };
    var labels = jobs.map(function (j) { return j.label; });
    lineChart(document.getElementById("compare-loss"), labels, [epochs].concat(jobs.map(function (j) { return align(j.columns.epoch, j.columns.loss); })), false);
    var metric = null;
    jobs.forEach(function (j) {
      Object.keys(j.columns).forEach(function (k) { if (!metric && k.indexOf("val_") === 0 && k !== "val_loss") metric = k; });
    });
    metric = metric || "val_loss";
    var caption = document.getElementById("compare-metric-caption");
    if (caption) caption.textContent = "Validation metric: " + metric;
    lineChart(document.getElementById("compare-metric"), labels, [epochs].concat(jobs.map(function (j) { return align(j.columns.epoch, j.columns[metric]); })), false);
    lineChart(document.getElementById("compare-ratio"), labels, [epochs].concat(jobs.map(function (j) { return align(j.ratio.epoch, j.ratio.ratio); })), true);
    dataNode.dataset.drawn = String(jobs.length);
  }

  // ── problems of a refusal ──
  function showProblems(box, body, status) {
    clear(box);
    var p = el("p", (body && body.detail) || ("the server answered " + status), "flash error");
    p.setAttribute("role", "alert");
    box.appendChild(p);
    if (body && body.problems && body.problems.length) {
      var list = el("ul", null, "problems");
      body.problems.forEach(function (problem) {
        var item = el("li");
        if (problem.field) { item.appendChild(el("code", problem.field)); item.appendChild(document.createTextNode(": ")); }
        item.appendChild(document.createTextNode(problem.detail));
        list.appendChild(item);
      });
      box.appendChild(list);
    }
  }

  function parseJson(text) { try { return JSON.parse(text); } catch (e) { return null; } }

  // ── upload with progress ──
  function upload(form) {
    var fileInput = document.getElementById("upload-file");
    var bar = document.getElementById("upload-progress");
    var percent = document.getElementById("upload-percent");
    var result = document.getElementById("upload-result");
    form.addEventListener("submit", function (event) {
      event.preventDefault();
      if (!fileInput.files.length) return;
      var file = fileInput.files[0];
      var data = new FormData();
      data.append("file", file);
      var xhr = new XMLHttpRequest();
      xhr.open("POST", form.action + "?name=" + encodeURIComponent(file.name));
      xhr.setRequestHeader("X-CSRFToken", csrfToken());
      bar.hidden = false; bar.value = 0; clear(result);
      xhr.upload.addEventListener("progress", function (e) {
        if (e.lengthComputable) { bar.value = 100 * e.loaded / e.total; percent.textContent = Math.round(bar.value) + " %"; }
      });
      xhr.addEventListener("load", function () {
        var body = parseJson(xhr.responseText);
        if (xhr.status === 200 || xhr.status === 201) {
          bar.value = 100; percent.textContent = "checked";
          var ok = el("p", "Uploaded " + file.name + " as " + body.id + " (" + bytes(body.size_bytes) + ").", "flash ok");
          ok.setAttribute("role", "status");
          result.appendChild(ok);
          setTimeout(function () { window.location.assign(form.getAttribute("data-list-url")); }, 800);
        } else {
          percent.textContent = "refused";
          showProblems(result, body, xhr.status);
        }
      });
      xhr.addEventListener("error", function () { showProblems(result, { detail: "the upload was interrupted" }, 0); });
      xhr.send(data);
    });
  }

  // ── submit: the spec as a form (specform.js) or as JSON, kept in sync; the dry run reruns as it changes ──
  function submitPage(form) {
    var examples = parseJson(document.getElementById("example-specs").textContent) || {};
    var schema = parseJson(document.getElementById("spec-schema").textContent) || {};
    var dataset = document.getElementById("submit-dataset");
    var example = document.getElementById("submit-example");
    var specBox = document.getElementById("submit-spec");
    var dryButton = document.getElementById("dry-run-button");
    var submitButton = document.getElementById("submit-button");
    var report = document.getElementById("dry-run-report");
    var formView = document.getElementById("spec-form");
    var jsonView = document.getElementById("spec-json");
    var passed = null;
    var running = false, again = false;
    var timer = null;

    var signature = function () { return dataset.value + "\u0000" + specBox.value; };
    var invalidate = function () { if (passed !== signature()) submitButton.disabled = true; };
    var specForm = window.GpuyardSpecForm(formView, schema, function (value) {
      specBox.value = JSON.stringify(value, null, 2);
      changed();
    });
    specForm.render(parseJson(specBox.value) || {});

    function changed() {
      invalidate();
      clearTimeout(timer);
      var spec = parseJson(specBox.value);
      if (dataset.value && spec && typeof spec === "object" && spec.architecture) timer = setTimeout(dryRun, 600);
    }

    function show(view) {
      var json = view === "json";
      jsonView.hidden = !json;
      formView.hidden = json;
      document.getElementById("view-json").setAttribute("aria-pressed", String(json));
      document.getElementById("view-form").setAttribute("aria-pressed", String(!json));
    }
    document.getElementById("view-form").addEventListener("click", function () { show("form"); });
    document.getElementById("view-json").addEventListener("click", function () { show("json"); });

    example.addEventListener("change", function () {
      if (!examples[example.value]) return;
      specBox.value = examples[example.value];
      specForm.render(parseJson(specBox.value) || {});
      changed();
    });
    specBox.addEventListener("input", function () {
      var spec = parseJson(specBox.value);
      if (spec && typeof spec === "object" && !Array.isArray(spec)) specForm.render(spec);
      changed();
    });
    dataset.addEventListener("change", changed);

    function body() {
      var spec = parseJson(specBox.value);
      if (!spec || typeof spec !== "object") {
        showProblems(report, { detail: "The spec is not a JSON object: check its brackets, quotes and commas." }, 0);
        return null;
      }
      return JSON.stringify({ dataset: dataset.value, spec: spec });
    }

    function post(url, payload) {
      return fetch(url, {
        method: "POST",
        credentials: "same-origin",
        headers: { "Content-Type": "application/json", "X-CSRFToken": csrfToken() },
        body: payload,
      }).then(function (response) {
        return response.text().then(function (text) { return { status: response.status, body: parseJson(text) }; });
      });
    }

    // One dry run at a time (the API caps them): a change while one runs asks for one more after it.
    function dryRun() {
      clearTimeout(timer);
      if (running) { again = true; return; }
      var payload = body();
      if (!payload) return;
      var sig = signature();
      running = true;
      report.appendChild(el("p", "Dry run…", "hint"));
      post(form.getAttribute("data-jobs-url") + "?dry_run=1", payload).then(function (answer) {
        running = false;
        if (again || sig !== signature()) { again = false; dryRun(); return; }
        if (answer.status !== 200) { showProblems(report, answer.body, answer.status); return; }
        showReport(report, answer.body.report || {}, answer.body.placement);
        passed = sig;
        submitButton.disabled = signature() !== passed;
      });
    }
    dryButton.addEventListener("click", dryRun);

    form.addEventListener("submit", function (event) {
      event.preventDefault();
      var payload = body();
      if (!payload) return;
      submitButton.disabled = true;
      post(form.getAttribute("data-jobs-url"), payload).then(function (answer) {
        if (answer.status !== 201) { showProblems(report, answer.body, answer.status); submitButton.disabled = false; return; }
        window.location.assign(form.getAttribute("data-job-page").replace("JOB_ID", encodeURIComponent(answer.body.id)));
      });
    });
  }

  function showReport(box, r, placement) {
    clear(box);
    box.appendChild(el("h2", "Dry run"));
    var facts = el("dl", null, "facts");
    var add = function (k, v) { facts.appendChild(el("dt", k)); facts.appendChild(el("dd", v)); };
    if (placement) {
      add("Would start", placement.gpu ? "now, on " + placement.gpu
        : "later" + (placement.queue_position ? ", place " + placement.queue_position + " in the queue" : "")
          + (placement.waiting_reason ? " (" + placement.waiting_reason.replace(/_/g, " ") + ")" : "")
          + (placement.estimated_start_at ? ", estimated " + placement.estimated_start_at : ""));
    }
    var params = r.parameters || {};
    add("Parameters", fmt(params.total) + " (trainable " + fmt(params.trainable) + ", non-trainable " + fmt(params.non_trainable) + ")");
    var memory = r.memory_estimate_bytes;
    if (memory && typeof memory === "object") {
      var parts = ["weights", "gradients", "optimizer_state", "input_batch", "activations_per_batch"]
        .filter(function (k) { return typeof memory[k] === "number"; })
        .map(function (k) { return k.replace(/_/g, " ") + " " + bytes(memory[k]); });
      add("Memory estimate", bytes(memory.total) + " per training step at batch size " + fmt(memory.batch_size) + " (" + parts.join(", ") + ")");
      if (memory.note) add("", memory.note);
    } else {
      add("Memory estimate", bytes(memory));
    }
    box.appendChild(facts);
    (r.warnings || []).forEach(function (w) {
      var text = typeof w === "string" ? w : ((w.field ? w.field + ": " : "") + (w.detail || JSON.stringify(w)));
      box.appendChild(el("p", "warning: " + text, "flash warn"));
    });
    var wrap = el("div", null, "table-wrap");
    var table = el("table");
    table.id = "layer-table";
    var head = el("tr");
    ["Layer", "Class", "Output shape", "Parameters"].forEach(function (h) { var th = el("th", h); th.scope = "col"; head.appendChild(th); });
    var thead = el("thead"); thead.appendChild(head); table.appendChild(thead);
    var tbody = el("tbody");
    (r.layers || []).forEach(function (layer) {
      var tr = el("tr");
      [layer.name, layer["class"], JSON.stringify(layer.output_shape), fmt(layer.parameters)].forEach(function (v) { tr.appendChild(el("td", v)); });
      tbody.appendChild(tr);
    });
    table.appendChild(tbody); wrap.appendChild(table); box.appendChild(wrap);
  }

  // ── one study: each trial's objective and the best so far by trial number; a sortable trials table ──
  function studyChart(dataNode) {
    var data = JSON.parse(dataNode.textContent || "{}");
    var box = document.getElementById("study-best");
    if (!box || !data.number || !data.number.length) return;
    var series = [
      { label: "trial" },
      { label: data.metric, stroke: COLORS[0], width: 0, points: { show: true, size: 7 } },
      { label: "best so far", stroke: COLORS[2], width: 2, spanGaps: true, points: { show: false } },
      { label: "pruned", stroke: COLORS[1], width: 0, points: { show: true, size: 9, fill: COLORS[1] } },
    ];
    box.dataset.values = String(data.value.filter(function (v) { return v !== null; }).length);
    var chart = new uPlot({
      width: Math.max(260, box.clientWidth || 600), height: 260, series: series,
      scales: { x: { time: false } }, axes: [{ label: "trial" }, {}], legend: { live: false },
    }, [data.number, data.value, data.best, data.pruned], box);
    charts.push(chart);
  }

  function sortableTable(table) {
    var heads = table.querySelectorAll("th[data-sort]");
    heads.forEach(function (th) {
      th.addEventListener("click", function () {
        var index = Array.prototype.indexOf.call(th.parentNode.children, th);
        var ascending = th.getAttribute("aria-sort") !== "ascending";
        heads.forEach(function (other) { other.removeAttribute("aria-sort"); });
        th.setAttribute("aria-sort", ascending ? "ascending" : "descending");
        var body = table.tBodies[0];
        var rows = Array.prototype.slice.call(body.rows);
        rows.sort(function (a, b) {
          var x = a.cells[index].dataset.value || "", y = b.cells[index].dataset.value || "";
          if (x === "" || y === "") return x === y ? 0 : (x === "" ? 1 : -1);  // empty cells last
          var nx = parseFloat(x), ny = parseFloat(y);
          var order = !isNaN(nx) && !isNaN(ny) ? nx - ny : x.localeCompare(y);
          return ascending ? order : -order;
        });
        rows.forEach(function (row) { body.appendChild(row); });
      });
    });
  }

  // GPU-hours by user and day as stacked bars: each user's series is the running sum up to it, drawn as
  // bars from the largest sum down, so every band shows one user's hours.
  function usageChart(dataNode, container) {
    var d = JSON.parse(dataNode.textContent);
    container.dataset.users = String(d.users.length);
    if (!d.users.length) return;
    var xs = d.days.map(function (_, i) { return i; });
    var sums = [], running = d.days.map(function () { return 0; });
    d.hours.forEach(function (ys) { running = running.map(function (v, i) { return v + ys[i]; }); sums.push(running.slice()); });
    var bars = uPlot.paths.bars({ size: [0.7, 40] });
    var series = [{ label: "day", value: function (u, v) { return v === null ? "" : d.days[v]; } }];
    var data = [xs];
    for (var k = d.users.length - 1; k >= 0; k--) {
      series.push({ label: d.users[k], fill: COLORS[k % COLORS.length], stroke: COLORS[k % COLORS.length], paths: bars, points: { show: false },
                    value: (function (k) { return function (u, v, s, i) { return i === null ? "" : d.hours[k][i].toFixed(3); }; })(k) });
      data.push(sums[k]);
    }
    var chart = new uPlot({
      width: Math.max(260, container.clientWidth || 600), height: 260, series: series,
      scales: { x: { time: false } },
      axes: [{ values: function (u, ticks) { return ticks.map(function (t) { return d.days[t] ? d.days[t].slice(5) : ""; }); } }, { label: "GPU-hours" }],
    }, data, container);
    charts.push(chart);
  }

  document.addEventListener("DOMContentLoaded", function () {
    var studyData = document.getElementById("study-data");
    if (studyData) studyChart(studyData);
    var trials = document.getElementById("trials-table");
    if (trials) sortableTable(trials);
    var usageData = document.getElementById("usage-data");
    if (usageData) usageChart(usageData, document.getElementById("usage-chart"));
    var curves = document.getElementById("curves");
    if (curves) jobCurves(curves);
    var compareData = document.getElementById("compare-data");
    if (compareData) compare(compareData);
    var uploadForm = document.getElementById("upload-form");
    if (uploadForm) upload(uploadForm);
    var submitForm = document.getElementById("submit-form");
    if (submitForm) submitPage(submitForm);
  });

  if (typeof module === "object" && module.exports) module.exports.heatmapColumns = heatmapColumns;  // tests (node)
})();
