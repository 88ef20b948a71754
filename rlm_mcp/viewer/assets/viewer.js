/* rlm-mcp run viewer: renders one run's view-model (format rlm-mcp-view/1).
 *
 * Data comes from one of three places (see rlm_mcp/viewer/__init__.py):
 *   static  - the JSON embedded in #rlm-view-data;
 *   served  - the same, then polling config.data_url with If-None-Match while the run is running;
 *   mcp-app - an MCP Apps host (SEP-1865) over postMessage JSON-RPC: ui/initialize, the tool
 *             result, and tools/call of config.view_tool for the view-model.
 * Every string from the run is data: it reaches the page through textContent only. */
(function () {
  "use strict";

  var FORMAT = "rlm-mcp-view/1";
  var APP_PROTOCOL = "2026-01-26";
  var MAX_BARS = 400;          // chart bars; more iterations are summed into buckets
  var CALLS_PAGE = 50;         // sub-calls rendered per "show more"
  var CLAMP_CHARS = 1200;      // longer text starts collapsed
  var CLAMP_LINES = 16;
  var RESULTS_SHOWN = 200;

  var config = readJson("rlm-view-config") || {};
  var app = document.getElementById("app");
  var state = {
    view: null,
    nodes: {},                 // id -> node
    parents: {},               // id -> parent id
    openIters: {},             // "nodeId#index" -> true
    openNodes: {},             // child node id -> true
    current: null,             // key of the focused row
    search: { q: "", hits: [], pos: -1, index: null },
    etag: null,
    pollTimer: null,
    provisional: null          // what the MCP host told us before the view-model arrived
  };

  // ----- helpers ------------------------------------------------------------------------------

  function readJson(id) {
    var node = document.getElementById(id);
    if (!node) return null;
    var text = node.textContent.trim();
    if (!text || text === "null") return null;
    try { return JSON.parse(text); } catch (e) { showProblem("The embedded data is not valid JSON: " + e.message); return null; }
  }

  function el(tag, cls, text) {
    var node = document.createElement(tag);
    if (cls) node.className = cls;
    if (text !== undefined && text !== null) node.textContent = String(text);
    return node;
  }

  function add(parent) {
    for (var i = 1; i < arguments.length; i++) {
      var child = arguments[i];
      if (child === null || child === undefined || child === false) continue;
      parent.appendChild(typeof child === "string" ? document.createTextNode(child) : child);
    }
    return parent;
  }

  var SVG = "http://www.w3.org/2000/svg";
  function svg(tag, attrs) {
    var node = document.createElementNS(SVG, tag);
    for (var k in attrs) if (Object.prototype.hasOwnProperty.call(attrs, k)) node.setAttribute(k, String(attrs[k]));
    return node;
  }

  function num(n) { return typeof n === "number" && isFinite(n) ? n : 0; }
  function fmtInt(n) { return Math.round(num(n)).toLocaleString("en-US"); }
  function fmtTok(n) {
    n = num(n);
    if (n >= 1e6) return (n / 1e6).toFixed(n >= 1e7 ? 0 : 1) + "M";
    if (n >= 1e3) return (n / 1e3).toFixed(n >= 1e4 ? 0 : 1) + "k";
    return String(Math.round(n));
  }
  function fmtDur(s) {
    if (typeof s !== "number" || !isFinite(s)) return "–";
    if (s < 1) return (s * 1000).toFixed(0) + " ms";
    if (s < 60) return s.toFixed(s < 10 ? 2 : 1) + " s";
    var m = Math.floor(s / 60);
    if (m < 60) return m + " m " + Math.round(s - 60 * m) + " s";
    return Math.floor(m / 60) + " h " + (m % 60) + " m";
  }
  function fmtCost(c) {
    if (typeof c !== "number" || !isFinite(c)) return "–";
    return "$" + (c >= 1 ? c.toFixed(2) : c >= 0.01 ? c.toFixed(3) : c.toFixed(4));
  }
  function fmtTime(iso) {
    // "2026-01-01T12:00:00.123+00:00" -> "2026-01-01 12:00:00 +00:00" (milliseconds dropped).
    if (typeof iso !== "string" || !iso) return null;
    var m = /^(\d{4}-\d\d-\d\d)T(\d\d:\d\d:\d\d)(?:\.\d+)?(.*)$/.exec(iso);
    return m ? m[1] + " " + m[2] + (m[3] ? " " + m[3] : "") : iso;
  }
  function oneLine(text, max) {
    text = String(text || "").replace(/\s+/g, " ").trim();
    return text.length > max ? text.slice(0, max) + "…" : text;
  }
  function iterKey(nodeId, index) { return nodeId + "#" + index; }

  // A <pre> (or prose div) that starts collapsed when long, with a toggle.
  function textBlock(text, cls, tag) {
    var wrap = el("div", "tb");
    var body = el(tag || "pre", cls || "", text);
    add(wrap, body);
    var lines = (String(text).match(/\n/g) || []).length + 1;
    if (String(text).length > CLAMP_CHARS || lines > CLAMP_LINES) {
      body.classList.add("clamped");
      var button = el("button", "more", "Show all (" + fmtInt(lines) + " lines, " + fmtInt(String(text).length) + " chars)");
      button.addEventListener("click", function () {
        var clamped = body.classList.toggle("clamped");
        button.textContent = clamped ? "Show all (" + fmtInt(lines) + " lines, " + fmtInt(String(text).length) + " chars)" : "Show less";
      });
      add(wrap, button);
    }
    return wrap;
  }

  function statusBadge(status) {
    status = String(status || "unknown");
    return el("span", "badge s-" + status.replace(/[^a-z_]/g, ""), status.replace("_", " "));
  }

  function showProblem(message) {
    var box = document.getElementById("problem");
    if (!box) {
      box = el("div", "notice bad");
      box.id = "problem";
      app.insertBefore(box, app.firstChild);
    }
    box.textContent = message;
  }

  function clearProblem() {
    var box = document.getElementById("problem");
    if (box) box.remove();
  }

  // ----- view-model bookkeeping ---------------------------------------------------------------

  function indexNodes(view) {
    state.nodes = {};
    state.parents = {};
    (function walk(node, parent) {
      state.nodes[node.id] = node;
      if (parent) state.parents[node.id] = parent.id;
      (node.children || []).forEach(function (child) { walk(child, node); });
    })(view.root, null);
  }

  function setView(view) {
    if (!view || view.format !== FORMAT || !view.root) {
      showProblem("This viewer reads " + FORMAT + " data; it got " + (view && view.format ? String(view.format) : "something else") + ".");
      return false;
    }
    var scroll = window.scrollY;
    var focusKey = state.current;
    state.view = view;
    state.etag = view.etag || null;
    state.search.index = null;
    indexNodes(view);
    render();
    if (state.search.q) runSearch(state.search.q, true);
    window.scrollTo(0, scroll);
    if (focusKey) {
      var row = findRow(focusKey);
      if (row) markCurrent(row, false);
    }
    document.documentElement.setAttribute("data-status", view.root.status || "unknown");
    if (!document.documentElement.hasAttribute("data-ready")) {
      document.documentElement.setAttribute("data-ready", "1");
      window.__rlmViewer = { readyAt: performance.now() };
    }
    window.__rlmViewer.renders = (window.__rlmViewer.renders || 0) + 1;
    return true;
  }

  // ----- rendering ----------------------------------------------------------------------------

  function render() {
    var view = state.view;
    var root = view.root;
    app.textContent = "";
    document.title = "RLM run " + view.run_id + " (" + root.status + ")";
    add(app, renderHeader(view));
    add(app, renderToolbar());
    var main = el("main");
    main.id = "main";
    add(main, el("h2", "", "Iterations (" + fmtInt(root.iterations.length) + ")"));
    add(main, renderIterations(root));
    add(main, renderChildren(root));
    add(app, main);
  }

  function usageRows(node) {
    // Per-model usage: the metadata's (whole tree) when the run has ended, else summed from records.
    if (node.usage && Object.keys(node.usage).length) return { rows: node.usage, partial: false };
    var rows = {};
    function bump(model, calls, input, output, cost) {
      model = model || "(unknown model)";
      var row = rows[model] || (rows[model] = { calls: 0, input_tokens: 0, output_tokens: 0, cost_usd: null });
      row.calls += calls; row.input_tokens += input; row.output_tokens += output;
      if (typeof cost === "number") row.cost_usd = (row.cost_usd || 0) + cost;
    }
    (function walk(n) {
      n.iterations.forEach(function (it) {
        bump(it.model, 1, it["in"], it.out, it.cost);
        it.blocks.forEach(function (b) {
          b.calls.forEach(function (c) { if (!c.child) bump(c.model || n.call_model, 1, num(c["in"]), num(c.out), c.cost); });
        });
      });
      n.children.forEach(walk);
    })(node);
    return { rows: rows, partial: true };
  }

  function renderHeader(view) {
    var root = view.root;
    var header = el("header");
    add(header, add(el("h1"), el("span", "", "RLM run"), el("span", "mono", view.run_id), statusBadge(root.status),
      root.limit ? el("span", "badge s-limit_reached", "limit: " + root.limit) : null));
    add(header, el("h3", "", "Query"), textBlock(root.query || "(no query recorded)", "query"));
    if (root.answer !== null && root.answer !== undefined) {
      add(header, el("h3", "", root.status === "completed" ? "Answer" : "Partial answer"), textBlock(root.answer, "answer final"));
    }
    if (root.error) add(header, el("h3", "", "Error"), textBlock(root.error, "error"));
    if (root.status === "running") add(header, el("div", "notice", "This run is still going: " + (config.data_url || config.mode === "mcp-app" ? "the page follows it." : "reload for newer data.")));
    header.appendChild(renderFacts(root, view));
    header.appendChild(renderUsage(root));
    var notes = [];
    if (view.excerpts && view.excerpts.shrunk) notes.push("Long texts are cut shorter than usual to keep this page small (sub-call excerpts at " + fmtInt(view.excerpts.caps.call) + " chars); the JSONL files have them in full.");
    if (view.children_omitted) notes.push(fmtInt(view.children_omitted) + " more child RLM trajectories are not shown.");
    var bad = 0; Object.keys(state.nodes).forEach(function (id) { bad += state.nodes[id].bad_lines || 0; });
    if (bad) notes.push(fmtInt(bad) + " unreadable line(s) in the trajectory files were skipped.");
    notes.forEach(function (n) { add(header, el("div", "notice", n)); });
    add(header, el("h2", "", "Where the time and tokens went"), renderCharts(root));
    return header;
  }

  function renderFacts(node, view) {
    var facts = el("div", "facts");
    function fact(label, value) { if (value !== null && value !== undefined && value !== "") add(facts, add(el("div"), el("b", "", label), String(value))); }
    fact("Model", node.model);
    if (node.other_models && node.other_models.length) fact("Sub-model", node.other_models.join(", "));
    fact("Sandbox", node.sandbox);
    var ctx = node.context || {};
    if (ctx.kind) fact("Context", ctx.kind + (ctx.documents ? ", " + fmtInt(ctx.documents) + " documents" : "") + (ctx.characters ? ", " + fmtInt(ctx.characters) + " chars" : "") + (ctx.name ? " (" + ctx.name + ")" : ""));
    fact("Elapsed", node.elapsed_s !== null && node.elapsed_s !== undefined ? fmtDur(node.elapsed_s) : (node.status === "running" ? "running" : null));
    fact("Iterations", fmtInt(node.iterations.length) + (node.limits && node.limits.max_iterations ? " of " + fmtInt(node.limits.max_iterations) : ""));
    fact("Sub-calls", fmtInt(node.totals.subcalls) + (typeof node.subcalls === "number" && node.subcalls !== node.totals.subcalls ? " (" + fmtInt(node.subcalls) + " in the whole tree)" : ""));
    if (node.children.length) fact("Child RLMs", fmtInt(node.children.length));
    fact("Started", fmtTime(node.started_at));
    fact("Finished", fmtTime(node.finished_at));
    if (node.limits) {
      var parts = [];
      Object.keys(node.limits).forEach(function (k) { if (node.limits[k] !== null && node.limits[k] !== undefined) parts.push(k + "=" + node.limits[k]); });
      fact("Limits", parts.join(", "));
    }
    if (view) fact("Data", "read " + fmtTime(view.generated_at));
    return facts;
  }

  function renderUsage(node) {
    var usage = usageRows(node);
    var models = Object.keys(usage.rows);
    var wrap = el("div");
    if (!models.length) return wrap;
    var table = el("table", "usage");
    add(table, add(el("tr"), el("th", "", "Model"), el("th", "", "Calls"), el("th", "", "Input tokens"), el("th", "", "Output tokens"), el("th", "", "Cost")));
    var total = { calls: 0, input: 0, output: 0, cost: null };
    models.forEach(function (m) {
      var u = usage.rows[m];
      total.calls += num(u.calls); total.input += num(u.input_tokens); total.output += num(u.output_tokens);
      if (typeof u.cost_usd === "number") total.cost = (total.cost || 0) + u.cost_usd;
      add(table, add(el("tr"), el("td", "mono", m), el("td", "", fmtInt(u.calls)), el("td", "", fmtInt(u.input_tokens)), el("td", "", fmtInt(u.output_tokens)), el("td", "", fmtCost(u.cost_usd))));
    });
    if (models.length > 1) add(table, add(el("tr"), el("th", "", "Total"), el("th", "", fmtInt(total.calls)), el("th", "", fmtInt(total.input)), el("th", "", fmtInt(total.output)), el("th", "", fmtCost(total.cost))));
    add(wrap, el("h3", "", usage.partial ? "Usage so far (from the records)" : "Usage (whole run tree)"), table);
    if (models.length && total.cost === null) add(wrap, el("div", "muted", "No price is known for these models, so no cost is shown."));
    return wrap;
  }

  // ----- charts -------------------------------------------------------------------------------

  function buckets(iterations) {
    var size = Math.max(1, Math.ceil(iterations.length / MAX_BARS));
    var out = [];
    for (var i = 0; i < iterations.length; i += size) {
      var b = { first: i, last: Math.min(iterations.length, i + size) - 1, model: 0, code: 0, root: 0, sub: 0, calls: 0, cost: 0 };
      for (var j = i; j <= b.last; j++) {
        var it = iterations[j];
        var code = 0;
        it.blocks.forEach(function (bl) {
          code += num(bl.dur);
          bl.calls.forEach(function (c) { b.sub += c.child ? num(c.tokens) : num(c["in"]) + num(c.out); b.calls += 1; b.cost += num(c.cost); });
        });
        b.code += code;
        b.model += Math.max(0, num(it.dur) - code);
        b.root += num(it["in"]) + num(it.out);
        b.cost += num(it.cost);
      }
      out.push(b);
    }
    return out;
  }

  function barChart(nodeId, bars, series, title, unit) {
    var max = 0;
    bars.forEach(function (b) { var t = 0; series.forEach(function (s) { t += b[s.key]; }); max = Math.max(max, t); });
    var chart = el("div", "chart");
    var label = el("div", "label");
    var legend = el("span", "legend");
    series.forEach(function (s) { add(legend, el("i", s.cls), s.name); });
    add(label, add(el("span"), el("b", "", title), legend), el("span", "", "max " + unit(max) + " per bar"));
    var width = Math.max(bars.length, 60);  // a short run keeps thin bars on the left
    var graph = svg("svg", { viewBox: "0 0 " + width + " 100", preserveAspectRatio: "none", role: "img" });
    graph.setAttribute("aria-label", title);
    if (max > 0) {
      bars.forEach(function (b, x) {
        var y = 100;
        var group = svg("g", { "data-first": b.first });
        series.forEach(function (s) {
          var h = b[s.key] / max * 100;
          if (h <= 0) return;
          y -= h;
          add(group, svg("rect", { x: x + 0.1, y: y, width: 0.8, height: h, "class": s.cls }));
        });
        var tip = svg("title", {});
        tip.textContent = "iteration " + (b.first + 1) + (b.last > b.first ? "–" + (b.last + 1) : "") + ": " +
          series.map(function (s) { return s.name + " " + unit(b[s.key]); }).join(", ");
        group.appendChild(tip);
        graph.appendChild(group);
      });
      graph.addEventListener("click", function (event) {
        var group = event.target.closest ? event.target.closest("g[data-first]") : null;
        if (group) openIteration(nodeId, Number(group.getAttribute("data-first")), true);
      });
    }
    add(chart, label, graph);
    return chart;
  }

  function inFlightChart(node) {
    var events = [];
    var missing = 0;
    (function walk(n) {
      n.iterations.forEach(function (it) {
        it.blocks.forEach(function (b) {
          b.calls.forEach(function (c) {
            if (typeof c.start === "number") { events.push([c.start, 1]); events.push([c.start + num(c.dur), -1]); }
            else missing += 1;
          });
        });
      });
      n.children.forEach(walk);
    })(node);
    var chart = el("div", "chart inflight");
    if (!events.length) {
      add(chart, el("div", "label", missing ?
        "Sub-calls in flight over time: not available. This trajectory records each sub-call's duration but not when it started, so concurrency cannot be drawn; the bars above count sub-call tokens per iteration." :
        "Sub-calls in flight over time: this run made no sub-calls."));
      return chart;
    }
    events.sort(function (a, b) { return a[0] - b[0] || a[1] - b[1]; });
    var t0 = events[0][0], t1 = events[events.length - 1][0], span = Math.max(1e-6, t1 - t0);
    var level = 0, peak = 0, points = ["0,100"];
    var W = 1000;
    events.forEach(function (e) {
      var x = ((e[0] - t0) / span * W).toFixed(2);
      points.push(x + "," + level);
      level += e[1];
      peak = Math.max(peak, level);
      points.push(x + "," + level);
    });
    var scaled = points.map(function (p, i) {
      if (i === 0) return p;
      var xy = p.split(",");
      return xy[0] + "," + (100 - Number(xy[1]) / Math.max(1, peak) * 96).toFixed(2);
    });
    var label = el("div", "label");
    add(label, add(el("span"), el("b", "", "Sub-calls in flight"), el("span", "legend", " over " + fmtDur(span))), el("span", "", "peak " + fmtInt(peak) + (missing ? " (" + fmtInt(missing) + " without start time left out)" : "")));
    var graph = svg("svg", { viewBox: "0 0 " + W + " 100", preserveAspectRatio: "none", role: "img" });
    graph.setAttribute("aria-label", "sub-calls in flight over time, peak " + peak);
    graph.appendChild(svg("polyline", { points: scaled.join(" "), "class": "f-run", "vector-effect": "non-scaling-stroke" }));
    add(chart, label, graph);
    chart.setAttribute("data-peak", String(peak));
    return chart;
  }

  function renderCharts(node) {
    var charts = el("div", "charts");
    if (!node.iterations.length) { add(charts, el("div", "muted", "No iterations yet.")); return charts; }
    var bars = buckets(node.iterations);
    add(charts, barChart(node.id, bars, [{ key: "model", name: "root model", cls: "f-model" }, { key: "code", name: "code + sub-calls", cls: "f-code" }], "Time per iteration", fmtDur));
    add(charts, barChart(node.id, bars, [{ key: "root", name: "root tokens", cls: "f-model" }, { key: "sub", name: "sub-call tokens", cls: "f-sub" }], "Tokens per iteration", fmtTok));
    var priced = bars.some(function (b) { return b.cost > 0; });
    if (priced) add(charts, barChart(node.id, bars, [{ key: "cost", name: "root + sub-call cost", cls: "f-code" }], "Cost per iteration", fmtCost));
    add(charts, inFlightChart(node));
    return charts;
  }

  // ----- toolbar and search -------------------------------------------------------------------

  function renderToolbar() {
    var bar = el("div", "toolbar");
    bar.id = "toolbar";
    var input = el("input");
    input.id = "search";
    input.type = "search";
    input.placeholder = "Search code, output, replies, sub-calls  ( / )";
    input.setAttribute("aria-label", "Search the run");
    input.value = state.search.q;
    var timer = null;
    input.addEventListener("input", function () {
      clearTimeout(timer);
      timer = setTimeout(function () { runSearch(input.value, false); }, 120);
    });
    input.addEventListener("keydown", function (event) {
      if (event.key === "Enter") { event.preventDefault(); clearTimeout(timer); if (input.value !== state.search.q) runSearch(input.value, false); step(event.shiftKey ? -1 : 1); }
      else if (event.key === "Escape") { input.blur(); }
    });
    var count = el("span", "muted");
    count.id = "search-count";
    var prev = el("button", "", "↑"); prev.title = "previous match (N)"; prev.addEventListener("click", function () { step(-1); });
    var next = el("button", "", "↓"); next.title = "next match (n)"; next.addEventListener("click", function () { step(1); });
    var collapse = el("button", "", "Collapse all");
    collapse.addEventListener("click", function () { state.openIters = {}; state.openNodes = {}; render(); });
    add(bar, input, prev, next, count, collapse, el("span", "keys muted help", "j/k or ↑/↓ move · Enter open · / search · n/N next match · Esc leave search"));
    var results = el("div", "results");
    results.id = "results";
    results.hidden = true;
    var wrap = el("div");
    add(wrap, bar, results);
    return wrap;
  }

  function buildIndex() {
    var entries = [];
    Object.keys(state.nodes).forEach(function (id) {
      var n = state.nodes[id];
      function push(i, field, text) { if (text) entries.push({ node: id, i: i, field: field, text: String(text), lower: String(text).toLowerCase() }); }
      push(-1, "query", n.query); push(-1, "answer", n.answer); push(-1, "error", n.error);
      n.iterations.forEach(function (it, i) {
        push(i, "reply", it.prose); push(i, "final answer", it.final);
        it.blocks.forEach(function (b, k) {
          var label = "block " + (k + 1);
          push(i, label + " code", b.code); push(i, label + " stdout", b.stdout); push(i, label + " stderr", b.stderr);
          push(i, label + " error", b.error);
          b.calls.forEach(function (c, m) { push(i, "sub-call " + (m + 1) + " prompt", c.prompt); push(i, "sub-call " + (m + 1) + " response", c.response); });
        });
      });
    });
    return entries;
  }

  function runSearch(q, keepPosition) {
    q = String(q || "").trim();
    var s = state.search;
    var oldKey = s.hits[s.pos] ? s.hits[s.pos].key : null;
    s.q = q;
    s.hits = [];
    s.pos = -1;
    document.querySelectorAll(".nav-row.hit").forEach(function (r) { r.classList.remove("hit"); });
    var results = document.getElementById("results");
    var count = document.getElementById("search-count");
    if (q.length < 2) {
      if (results) { results.hidden = true; results.textContent = ""; }
      if (count) count.textContent = "";
      highlightAll();
      return;
    }
    if (!s.index) s.index = buildIndex();
    var lower = q.toLowerCase();
    var seen = {};
    var matches = 0;
    s.index.forEach(function (e) {
      var at = e.lower.indexOf(lower);
      if (at < 0) return;
      var n = 0, from = at;
      while (from >= 0) { n += 1; from = e.lower.indexOf(lower, from + lower.length); }
      matches += n;
      var key = e.i < 0 ? e.node + "#head" : iterKey(e.node, e.i);
      if (seen[key]) { seen[key].fields.push(e.field); return; }
      var hit = { key: key, node: e.node, i: e.i, fields: [e.field], at: at, text: e.text };
      seen[key] = hit;
      s.hits.push(hit);
    });
    if (count) count.textContent = matches ? fmtInt(matches) + " matches in " + fmtInt(s.hits.length) + " places" : "no matches";
    if (results) {
      results.textContent = "";
      results.hidden = !s.hits.length;
      s.hits.slice(0, RESULTS_SHOWN).forEach(function (hit, k) {
        var row = el("div");
        var where = (hit.node === state.view.run_id ? "" : hit.node.slice(state.view.run_id.length) + " ") + (hit.i < 0 ? "header" : "#" + (hit.i + 1));
        var start = Math.max(0, hit.at - 40);
        add(row, el("b", "", where), " · " + hit.fields[0] + ": " + (start ? "…" : "") + oneLine(hit.text.slice(start, hit.at + 100), 140));
        row.addEventListener("click", function () { s.pos = k; goToHit(); });
        results.appendChild(row);
      });
      if (s.hits.length > RESULTS_SHOWN) add(results, el("div", "muted", "… " + fmtInt(s.hits.length - RESULTS_SHOWN) + " more places (n/N steps through all)"));
    }
    s.hits.forEach(function (hit) { var row = findRow(hit.key); if (row) row.classList.add("hit"); });
    if (keepPosition && oldKey) s.pos = s.hits.findIndex(function (h) { return h.key === oldKey; });
    highlightAll();
  }

  function step(direction) {
    var s = state.search;
    if (!s.hits.length) return;
    s.pos = (s.pos + direction + s.hits.length) % s.hits.length;
    goToHit();
  }

  function goToHit() {
    var hit = state.search.hits[state.search.pos];
    if (!hit) return;
    var count = document.getElementById("search-count");
    if (count) count.setAttribute("data-pos", String(state.search.pos + 1));
    if (hit.i < 0) {
      openNode(hit.node);
      var target = hit.node === state.view.run_id ? app.querySelector("header") : findRow(hit.node);
      if (target) target.scrollIntoView({ block: "start" });
      highlightAll();
      return;
    }
    openIteration(hit.node, hit.i, true, true);
  }

  // Wrap every match of the query inside rendered bodies and headers in <mark> (text nodes only).
  function highlightAll() {
    document.querySelectorAll("mark.q").forEach(function (m) {
      var parent = m.parentNode;
      parent.replaceChild(document.createTextNode(m.textContent), m);
      parent.normalize();
    });
    var q = state.search.q.toLowerCase();
    if (q.length < 2) return;
    document.querySelectorAll("header pre, .it-body, .child-head").forEach(function (scope) { highlightIn(scope, q); });
    var hit = state.search.hits[state.search.pos];
    if (hit && hit.i >= 0) {
      var body = findRow(hit.key);
      var first = body && body.parentNode ? body.parentNode.querySelector("mark.q") : null;
      if (first) { first.classList.add("current"); first.scrollIntoView({ block: "center" }); }
    }
  }

  function highlightIn(scope, q) {
    var walker = document.createTreeWalker(scope, NodeFilter.SHOW_TEXT, null);
    var texts = [];
    while (walker.nextNode()) if (walker.currentNode.nodeValue.toLowerCase().indexOf(q) >= 0) texts.push(walker.currentNode);
    texts.forEach(function (node) {
      var text = node.nodeValue, lower = text.toLowerCase(), frag = document.createDocumentFragment(), from = 0, at;
      while ((at = lower.indexOf(q, from)) >= 0) {
        if (at > from) frag.appendChild(document.createTextNode(text.slice(from, at)));
        frag.appendChild(el("mark", "q", text.slice(at, at + q.length)));
        from = at + q.length;
      }
      if (from < text.length) frag.appendChild(document.createTextNode(text.slice(from)));
      var host = node.parentNode;
      host.replaceChild(frag, node);
      if (host.classList && host.classList.contains("clamped")) host.classList.remove("clamped");
    });
  }

  // ----- iterations ---------------------------------------------------------------------------

  function renderIterations(node) {
    var list = el("div", "iters");
    list.setAttribute("data-node", node.id);
    if (!node.iterations.length) { add(list, el("div", "empty", node.status === "running" ? "No iteration has finished yet." : "No iterations recorded.")); return list; }
    var maxDur = 0;
    node.iterations.forEach(function (it) { maxDur = Math.max(maxDur, num(it.dur)); });
    var frag = document.createDocumentFragment();
    node.iterations.forEach(function (it, index) { frag.appendChild(iterationRow(node, it, index, maxDur)); });
    list.appendChild(frag);
    return list;
  }

  function iterationRow(node, it, index, maxDur) {
    var key = iterKey(node.id, index);
    var wrap = el("div", "it");
    var row = el("div", "nav-row it-row");
    row.tabIndex = 0;
    row.setAttribute("role", "button");
    row.setAttribute("data-key", key);
    var calls = 0, children = 0, errors = 0, lost = false, timedOut = false;
    it.blocks.forEach(function (b) {
      calls += b.calls.length;
      b.calls.forEach(function (c) { if (c.child) children += 1; });
      if (b.stderr || b.error) errors += 1;
      if (b.state_lost) lost = true;
      if (b.timed_out) timedOut = true;
    });
    var bar = el("span", "bar");
    var fill = el("span");
    fill.style.width = (maxDur > 0 ? Math.max(2, num(it.dur) / maxDur * 100) : 0).toFixed(1) + "%";
    bar.appendChild(fill);
    add(row, el("span", "caret", "▸"), el("span", "num", it.answer_now ? "#" + it.n + "+" : "#" + it.n),
      el("span", "dur", fmtDur(it.dur)), bar,
      el("span", "tok", fmtTok(it["in"]) + " in · " + fmtTok(it.out) + " out" + (typeof it.cost === "number" ? " · " + fmtCost(it.cost) : "")),
      el("span", "cnt", it.blocks.length + (it.blocks.length === 1 ? " block" : " blocks") + (calls ? " · " + fmtInt(calls) + " sub-calls" : "") + (children ? " · " + children + " child" : "")),
      it.final !== null && it.final !== undefined ? el("span", "flag final", "FINAL") : null,
      it.answer_now ? el("span", "flag warn", "answer now") : null,
      errors ? el("span", "flag err", errors === 1 ? "stderr" : errors + " stderr") : null,
      timedOut ? el("span", "flag err", "timed out") : null,
      lost ? el("span", "flag warn", "state lost") : null,
      el("span", "snip", oneLine(it.prose, 160)));
    row.addEventListener("click", function () { markCurrent(row, false); toggleIteration(node.id, index); });
    wrap.appendChild(row);
    if (state.openIters[key]) { wrap.classList.add("open"); wrap.appendChild(iterationBody(node, it, index)); }
    return wrap;
  }

  function toggleIteration(nodeId, index) {
    var key = iterKey(nodeId, index);
    var row = findRow(key);
    if (!row) return;
    var wrap = row.parentNode;
    var node = state.nodes[nodeId];
    if (state.openIters[key]) {
      delete state.openIters[key];
      wrap.classList.remove("open");
      var body = wrap.querySelector(".it-body");
      if (body) body.remove();
      row.setAttribute("aria-expanded", "false");
    } else {
      state.openIters[key] = true;
      wrap.classList.add("open");
      wrap.appendChild(iterationBody(node, node.iterations[index], index));
      row.setAttribute("aria-expanded", "true");
      if (state.search.q.length >= 2) highlightIn(wrap.querySelector(".it-body"), state.search.q.toLowerCase());
    }
    notifySize();
  }

  function openIteration(nodeId, index, scroll, keepFocus) {
    openNode(nodeId);
    var key = iterKey(nodeId, index);
    if (!state.openIters[key]) toggleIteration(nodeId, index);
    var row = findRow(key);
    if (row) {
      markCurrent(row, !keepFocus);  // from the search box, focus stays there (Enter again = next)
      if (state.search.q.length >= 2) highlightAll();
      if (scroll && !(row.parentNode.querySelector("mark.current"))) row.scrollIntoView({ block: "start" });
    }
  }

  function iterationBody(node, it, index) {
    var body = el("div", "it-body");
    var meta = el("div", "block-head");
    add(meta, el("span", "", "iteration " + it.n + (it.answer_now ? " (the out-of-iterations answer call)" : "")),
      it.end ? el("span", "", "ended " + fmtTime(it.end)) : null, el("span", "", "model " + (it.model || "?")),
      el("span", "", fmtInt(it["in"]) + " input + " + fmtInt(it.out) + " output tokens"), typeof it.cost === "number" ? el("span", "", fmtCost(it.cost)) : null);
    add(body, meta);
    if (it.prose) add(body, el("h3", "", "Reply"), textBlock(it.prose, "prose", "div"));
    it.blocks.forEach(function (b, k) { add(body, renderBlock(node, b, k)); });
    if (!it.blocks.length && !it.prose) add(body, el("div", "muted", "The reply had neither prose nor code."));
    if (it.final !== null && it.final !== undefined) add(body, el("h3", "", "Final answer"), textBlock(it.final, "final"));
    return body;
  }

  function renderBlock(node, b, k) {
    var block = el("div", "block" + (b.skipped ? " skipped" : ""));
    var head = el("div", "block-head");
    add(head, el("b", "", "Code block " + (k + 1)));
    if (b.skipped) add(head, el("span", "flag warn", "not run: the run ended first"));
    else {
      add(head, el("span", "", fmtDur(b.dur)));
      if (b.calls.length) add(head, el("span", "", fmtInt(b.calls.length) + " sub-calls"));
      if (b.timed_out) add(head, el("span", "flag err", "timed out"));
      if (b.state_lost) add(head, el("span", "flag warn", "state lost"));
    }
    add(block, head, textBlock(b.code || "", "code"));
    if (b.skipped) return block;
    if (b.stdout) add(block, el("h3", "", "stdout"), textBlock(b.stdout, "stdout"));
    if (b.stdout_dropped) add(block, el("div", "notice", "Output truncated for the model: " + fmtInt(b.stdout_dropped) + " more characters were not shown to it."));
    if (b.stderr) add(block, el("h3", "", "stderr"), textBlock(b.stderr, "stderr"));
    if (b.stderr_dropped) add(block, el("div", "notice", "stderr truncated: " + fmtInt(b.stderr_dropped) + " more characters."));
    if (b.error) add(block, el("h3", "", "error"), textBlock(b.error, "error"));
    (b.notices || []).forEach(function (n) { add(block, el("div", "notice", n)); });
    if (b.state_lost) add(block, el("div", "notice bad", "The REPL was restarted after this block: variables from earlier blocks were lost."));
    if (b.timed_out) add(block, el("div", "notice bad", "This block hit the cell time limit and was stopped."));
    if (!b.stdout && !b.stderr && !b.error) add(block, el("div", "muted", "(no output)"));
    if (b.final !== null && b.final !== undefined) add(block, el("h3", "", "Answer submitted by this block"), textBlock(b.final, "final"));
    if (b.locals && b.locals.length) {
      var toggle = el("button", "", "Variables (" + b.locals.length + ")");
      var table = null;
      toggle.addEventListener("click", function () {
        if (table) { table.remove(); table = null; notifySize(); return; }
        table = el("table", "locals");
        b.locals.forEach(function (pair) { add(table, add(el("tr"), el("td", "", pair[0]), el("td", "", pair[1]))); });
        toggle.after(table);
        notifySize();
      });
      add(block, toggle);
    }
    if (b.calls.length) add(block, renderCalls(node, b.calls));
    return block;
  }

  function renderCalls(node, calls) {
    var wrap = el("div", "calls");
    var total = 0, tokens = 0, cost = null;
    calls.forEach(function (c) { total += num(c.dur); tokens += c.child ? num(c.tokens) : num(c["in"]) + num(c.out); if (typeof c.cost === "number") cost = (cost || 0) + c.cost; });
    add(wrap, el("h3", "", "Sub-calls (" + fmtInt(calls.length) + " · " + fmtDur(total) + " summed · " + fmtTok(tokens) + " tokens" + (cost !== null ? " · " + fmtCost(cost) : "") + ")"));
    var shown = 0;
    var more = el("button", "more");
    function page() {
      var end = Math.min(calls.length, shown + (shown ? CALLS_PAGE * 4 : CALLS_PAGE));
      var frag = document.createDocumentFragment();
      for (; shown < end; shown++) frag.appendChild(renderCall(node, calls[shown], shown));
      wrap.insertBefore(frag, more);
      more.textContent = "Show " + fmtInt(Math.min(CALLS_PAGE * 4, calls.length - shown)) + " more of " + fmtInt(calls.length - shown);
      more.hidden = shown >= calls.length;
      if (state.search.q.length >= 2) highlightIn(wrap, state.search.q.toLowerCase());
      notifySize();
    }
    more.addEventListener("click", page);
    wrap.appendChild(more);
    page();
    return wrap;
  }

  function renderCall(node, c, m) {
    var call = el("div", "call");
    var head = el("div", "call-head");
    add(head, el("b", "", (c.child ? "rlm_query " : "llm_query ") + (m + 1)), el("span", "mono", c.model || node.call_model || ""), el("span", "", fmtDur(c.dur)),
      el("span", "", c.child ? fmtTok(c.tokens) + " tokens in the child run" : fmtInt(c["in"]) + " in · " + fmtInt(c.out) + " out"),
      typeof c.cost === "number" ? el("span", "", fmtCost(c.cost)) : null);
    if (c.child) {
      var link = el("button", "", "open child " + c.child.slice(state.view.run_id.length));
      link.addEventListener("click", function () { openNode(c.child); var r = findRow(c.child); if (r) { markCurrent(r, true); r.scrollIntoView({ block: "start" }); } });
      add(head, link);
    }
    var io = el("div", "call-io");
    add(io, add(el("div"), el("div", "muted", "prompt"), el("pre", "", c.prompt)), add(el("div"), el("div", "muted", "response"), el("pre", "", c.response)));
    add(call, head, io);
    return call;
  }

  // ----- child RLMs ---------------------------------------------------------------------------

  function renderChildren(node) {
    var wrap = el("div", "children");
    if (!node.children.length) return wrap;
    add(wrap, el("h2", "", "Child RLMs (" + fmtInt(node.children.length) + ")"));
    node.children.forEach(function (child) { wrap.appendChild(childRow(child)); });
    return wrap;
  }

  function childRow(child) {
    var wrap = el("div", "child");
    wrap.setAttribute("data-node", child.id);
    var row = el("div", "nav-row child-row");
    row.tabIndex = 0;
    row.setAttribute("role", "button");
    row.setAttribute("data-key", child.id);
    var rel = child.id.slice(state.view.run_id.length) || child.id;
    add(row, el("span", "caret", "▸"), el("span", "child-id", rel), statusBadge(child.status),
      el("span", "dur", fmtDur(child.elapsed_s)),
      el("span", "cnt", fmtInt(child.iterations.length) + " iterations · " + fmtInt(child.totals.subcalls) + " sub-calls"),
      el("span", "tok", fmtTok(child.totals.tokens) + " tokens"),
      child.answer !== null && child.answer !== undefined ? el("span", "snip", "→ " + oneLine(child.answer, 80)) : null,
      el("span", "snip", oneLine(child.query, 160)));
    row.addEventListener("click", function () { markCurrent(row, false); toggleNode(child.id); });
    wrap.appendChild(row);
    if (state.openNodes[child.id]) { wrap.classList.add("open"); wrap.appendChild(childBody(child)); }
    return wrap;
  }

  function childBody(child) {
    var body = el("div", "child-body node");
    var head = el("div", "child-head");
    add(head, el("h3", "", "Query"), textBlock(child.query || "", "query"));
    if (child.answer !== null && child.answer !== undefined) add(head, el("h3", "", "Answer"), textBlock(child.answer, "answer final"));
    if (child.error) add(head, el("h3", "", "Error" + (child.limit ? " (limit " + child.limit + ")" : "")), textBlock(child.error, "error"));
    add(head, renderFacts(child, null));
    add(body, head, renderCharts(child), el("h3", "", "Iterations"), renderIterations(child), renderChildren(child));
    if (state.search.q.length >= 2) highlightIn(head, state.search.q.toLowerCase());
    return body;
  }

  function toggleNode(id) {
    var row = findRow(id);
    if (!row) return;
    var wrap = row.parentNode;
    if (state.openNodes[id]) {
      delete state.openNodes[id];
      wrap.classList.remove("open");
      var body = wrap.querySelector(".child-body");
      if (body) body.remove();
      row.setAttribute("aria-expanded", "false");
    } else {
      state.openNodes[id] = true;
      wrap.classList.add("open");
      wrap.appendChild(childBody(state.nodes[id]));
      row.setAttribute("aria-expanded", "true");
      state.search.hits.forEach(function (hit) { var r = findRow(hit.key); if (r) r.classList.add("hit"); });
    }
    notifySize();
  }

  function openNode(id) {
    // Open every ancestor first: a grandchild's row exists only inside its parent's body.
    var chain = [];
    for (var cur = id; cur && state.parents[cur]; cur = state.parents[cur]) chain.unshift(cur);
    chain.forEach(function (nodeId) { if (!state.openNodes[nodeId]) toggleNode(nodeId); });
  }

  // ----- keyboard -----------------------------------------------------------------------------

  function findRow(key) {
    return document.querySelector('.nav-row[data-key="' + CSS.escape(key) + '"]');
  }

  function markCurrent(row, focus) {
    var old = document.querySelector(".nav-row.current");
    if (old && old !== row) old.classList.remove("current");
    row.classList.add("current");
    state.current = row.getAttribute("data-key");
    if (focus) row.focus({ preventScroll: true });
  }

  function move(direction) {
    var rows = Array.prototype.slice.call(document.querySelectorAll(".nav-row"));
    if (!rows.length) return;
    var at = rows.indexOf(document.querySelector(".nav-row.current"));
    var next = at < 0 ? (direction > 0 ? 0 : rows.length - 1) : Math.min(rows.length - 1, Math.max(0, at + direction));
    markCurrent(rows[next], true);
    rows[next].scrollIntoView({ block: "nearest" });
  }

  function toggleCurrent() {
    var row = document.querySelector(".nav-row.current");
    if (!row) return;
    var key = row.getAttribute("data-key");
    var hash = key.lastIndexOf("#");
    if (row.classList.contains("it-row")) toggleIteration(key.slice(0, hash), Number(key.slice(hash + 1)));
    else toggleNode(key);
  }

  document.addEventListener("keydown", function (event) {
    if (!state.view || event.ctrlKey || event.metaKey || event.altKey) return;
    var target = event.target;
    var typing = target && (target.tagName === "INPUT" || target.tagName === "TEXTAREA" || target.isContentEditable);
    if (typing) return;
    var onButton = target && target.tagName === "BUTTON";
    switch (event.key) {
      case "/": event.preventDefault(); var s = document.getElementById("search"); if (s) { s.focus(); s.select(); } break;
      case "j": case "ArrowDown": event.preventDefault(); move(1); break;
      case "k": case "ArrowUp": event.preventDefault(); move(-1); break;
      case "Enter": case "o": case " ": if (onButton) return; event.preventDefault(); toggleCurrent(); break;
      case "n": step(1); break;
      case "N": step(-1); break;
      case "Escape": var input = document.getElementById("search"); if (input && input.value) { input.value = ""; runSearch("", false); } break;
      default: return;
    }
  });

  // ----- served mode: poll the data URL while the run is running ------------------------------

  function schedulePoll(delay) {
    clearTimeout(state.pollTimer);
    document.documentElement.setAttribute("data-polling", "on");
    state.pollTimer = setTimeout(poll, delay);
  }

  function stopPolling() {
    clearTimeout(state.pollTimer);
    state.pollTimer = null;
    document.documentElement.setAttribute("data-polling", "off");
  }

  var failures = 0;
  function poll() {
    var headers = {};
    if (state.etag) headers["If-None-Match"] = '"' + state.etag + '"';
    fetch(config.data_url, { headers: headers, cache: "no-store", credentials: "same-origin" }).then(function (response) {
      if (response.status === 304) return null;
      if (!response.ok) throw new Error("HTTP " + response.status);
      return response.json();
    }).then(function (view) {
      failures = 0;
      clearProblem();
      if (view) setView(view);
      if (state.view && state.view.running) schedulePoll(config.poll_ms || 1000);
      else stopPolling();
    }).catch(function (error) {
      failures += 1;
      showProblem("Could not refresh the run from " + config.data_url + " (" + error.message + "); retrying.");
      schedulePoll(Math.min(15000, (config.poll_ms || 1000) * Math.pow(2, failures)));
    });
  }

  // ----- MCP App mode (SEP-1865, io.modelcontextprotocol/ui) ----------------------------------

  var rpc = { next: 1, pending: {} };

  function post(message) { window.parent.postMessage(message, "*"); }

  function request(method, params, timeoutMs) {
    var id = rpc.next++;
    return new Promise(function (resolve, reject) {
      var timer = setTimeout(function () { delete rpc.pending[id]; reject(new Error(method + ": the host did not answer")); }, timeoutMs || 30000);
      rpc.pending[id] = { resolve: resolve, reject: reject, timer: timer };
      post({ jsonrpc: "2.0", id: id, method: method, params: params });
    });
  }

  function notify(method, params) { post({ jsonrpc: "2.0", method: method, params: params || {} }); }

  var lastSize = "";
  var sizeQueued = false;
  function notifySize() {
    if (config.mode !== "mcp-app" || !rpc.initialized || sizeQueued) return;
    sizeQueued = true;
    requestAnimationFrame(function () {
      sizeQueued = false;
      // The body's own box: the document's scroll size never shrinks below the frame the host gave us.
      var box = document.body.getBoundingClientRect();
      var width = Math.ceil(box.width);
      var height = Math.ceil(box.height);
      var key = width + "x" + height;
      if (key === lastSize) return;
      lastSize = key;
      notify("ui/notifications/size-changed", { width: width, height: height });
    });
  }

  function applyHostContext(context) {
    if (!context || typeof context !== "object") return;
    var root = document.documentElement;
    if (context.theme === "dark" || context.theme === "light") root.setAttribute("data-theme", context.theme);
    var vars = context.styles && context.styles.variables;
    if (vars && typeof vars === "object") {
      Object.keys(vars).forEach(function (name) {
        if (/^--[a-z0-9-]+$/.test(name) && typeof vars[name] === "string") root.style.setProperty(name, vars[name]);
      });
    }
    var dims = context.containerDimensions;
    if (dims && typeof dims === "object") {
      root.classList.toggle("fixed-height", typeof dims.height === "number");
      if (typeof dims.maxHeight === "number") root.style.maxHeight = dims.maxHeight + "px";
    }
  }

  function showWaiting(text) {
    if (state.view) return;
    var box = document.getElementById("loading") || el("p", "empty");
    box.id = "loading";
    box.textContent = text;
    if (!box.parentNode) app.appendChild(box);
  }

  function onToolResult(result) {
    if (!result || typeof result !== "object") return;
    var data = result.structuredContent;
    if (data && data.format === FORMAT) { setView(data); scheduleAppPoll(); return; }
    if (result.isError) {
      var text = (result.content || []).map(function (c) { return c && c.type === "text" ? c.text : ""; }).join("\n");
      showProblem("The tool reported an error: " + (text || "no details"));
      return;
    }
    if (data && typeof data.run_id === "string") {
      state.provisional = data;
      state.runId = data.run_id;
      showWaiting("Run " + data.run_id + " is " + (data.status || "known") + "; loading its trajectory…");
      loadAppView();
    } else {
      showWaiting("This tool result names no run (no structuredContent.run_id), so there is nothing to show.");
    }
  }

  function loadAppView() {
    if (!state.runId) return;
    var args = { run_id: state.runId };
    if (state.etag) args.etag = state.etag;
    request("tools/call", { name: config.view_tool || "rlm_get_run_view", arguments: args }).then(function (result) {
      if (result && result.isError) {
        var text = (result.content || []).map(function (c) { return c && c.type === "text" ? c.text : ""; }).join("\n");
        throw new Error(text || "the tool failed");
      }
      var data = result && result.structuredContent;
      if (data && data.format === FORMAT) setView(data);
      else if (!(data && data.unchanged)) throw new Error("the tool result has no view (structuredContent.format " + FORMAT + ")");
      clearProblem();
      scheduleAppPoll();
    }).catch(function (error) {
      showProblem("Could not load the run through the host: " + error.message);
      if (state.view && state.view.running) scheduleAppPoll();
    });
  }

  function scheduleAppPoll() {
    clearTimeout(state.pollTimer);
    if (state.view && state.view.running && state.runId && !rpc.tornDown) {
      document.documentElement.setAttribute("data-polling", "on");
      state.pollTimer = setTimeout(loadAppView, config.poll_ms || 2000);
    } else {
      document.documentElement.setAttribute("data-polling", "off");
    }
  }

  function onHostMessage(event) {
    if (event.source !== window.parent) return;  // only the host that embeds us
    var msg = event.data;
    if (!msg || typeof msg !== "object" || msg.jsonrpc !== "2.0") return;
    if (msg.method === undefined && (msg.result !== undefined || msg.error !== undefined)) {
      var pending = rpc.pending[msg.id];
      if (!pending) return;
      delete rpc.pending[msg.id];
      clearTimeout(pending.timer);
      if (msg.error) pending.reject(new Error(String(msg.error.message || "error " + msg.error.code)));
      else pending.resolve(msg.result);
      return;
    }
    var params = msg.params || {};
    if (msg.id !== undefined && msg.id !== null) {  // a request from the host
      if (msg.method === "ping") post({ jsonrpc: "2.0", id: msg.id, result: {} });
      else if (msg.method === "ui/resource-teardown") { rpc.tornDown = true; stopPolling(); post({ jsonrpc: "2.0", id: msg.id, result: {} }); }
      else post({ jsonrpc: "2.0", id: msg.id, error: { code: -32601, message: "method not found: " + String(msg.method) } });
      return;
    }
    switch (msg.method) {
      case "ui/notifications/tool-input":
        var input = params.arguments || {};
        if (typeof input.run_id === "string") state.runId = input.run_id;
        showWaiting(typeof input.query === "string" ? "Running: " + oneLine(input.query, 300) : "Waiting for the tool result…");
        break;
      case "ui/notifications/tool-result": onToolResult(params); break;
      case "ui/notifications/tool-cancelled": showProblem("The tool call was cancelled" + (params.reason ? ": " + String(params.reason) : ".")); break;
      case "ui/notifications/host-context-changed": applyHostContext(params); break;
      default: break;  // tool-input-partial and others: nothing to do
    }
  }

  function startApp() {
    window.addEventListener("message", onHostMessage);
    showWaiting("Connecting to the host…");
    request("ui/initialize", {
      appInfo: { name: "rlm-mcp run viewer", version: String(config.version || "0") },
      appCapabilities: { availableDisplayModes: ["inline", "fullscreen"] },
      protocolVersion: APP_PROTOCOL
    }, 15000).then(function (result) {
      applyHostContext(result && result.hostContext);
      notify("ui/notifications/initialized", {});
      rpc.initialized = true;
      showWaiting("Waiting for the tool result…");
      if (typeof ResizeObserver === "function") new ResizeObserver(notifySize).observe(document.documentElement);
      notifySize();
    }).catch(function (error) {
      showProblem("This page is the rlm-mcp MCP App; the host did not complete ui/initialize (" + error.message + ").");
    });
  }

  // ----- start --------------------------------------------------------------------------------

  window.addEventListener("error", function (event) { showProblem("Viewer error: " + event.message); });
  var embedded = readJson("rlm-view-data");
  if (embedded) setView(embedded);
  if (config.mode === "mcp-app") startApp();
  else if (config.data_url && (!embedded || embedded.running)) {
    if (!embedded) showWaiting("Loading the run…");
    schedulePoll(embedded ? (config.poll_ms || 1000) : 0);
  } else if (!embedded) {
    showWaiting("No run data in this page.");
  } else {
    document.documentElement.setAttribute("data-polling", "off");
  }
})();
