// picoiot dashboard: one page over the operators' API (session cookie) and its event stream.
// Everything from the server is put into the page as text (textContent), never as HTML: a device name or an alarm
// message is shown, never run. The API checks every role; this page only hides what the role cannot do.
"use strict";
(() => {
  const RANK = { viewer: 1, operator: 2, admin: 3 };
  const S = { me: null, ns: "default", es: null, view: null, refreshTimer: null,
              fleet: { sort: "device_id", dir: 1, q: "", group: "", type: "", state: "" },
              chart: null, chartField: null, chartRange: 3600e3, chartData: null };
  const $ = (id) => document.getElementById(id);

  function h(tag, attrs, ...kids) {
    const el = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) {
      if (v === null || v === undefined || v === false) continue;
      if (k.startsWith("on")) el.addEventListener(k.slice(2), v);
      else if (k === "text") el.textContent = v;
      else el.setAttribute(k, v === true ? "" : v);
    }
    for (const k of kids.flat()) if (k !== null && k !== undefined) el.append(k instanceof Node ? k : String(k));
    return el;
  }
  const can = (role) => S.me && RANK[S.me.role] >= RANK[role];
  const fmtTime = (ms) => (ms ? new Date(ms).toLocaleString() : "—");
  const ago = (ms) => {
    if (!ms) return "never";
    const s = Math.max(0, Math.round((Date.now() - ms) / 1000));
    return s < 60 ? `${s} s ago` : s < 3600 ? `${Math.round(s / 60)} min ago` : `${Math.round(s / 3600)} h ago`;
  };
  const dur = (s) => (s == null ? "—" : s < 3600 ? `${Math.round(s / 60)} min` : s < 86400 ? `${(s / 3600).toFixed(1)} h` : `${(s / 86400).toFixed(1)} d`);
  const kb = (b) => (b == null ? "—" : `${(b / 1024).toFixed(1)}K`);

  async function api(method, path, body) {
    const opt = { method, credentials: "same-origin", headers: {} };
    if (body !== undefined) { opt.headers["Content-Type"] = "application/json"; opt.body = JSON.stringify(body); }
    const r = await fetch(path, opt);
    let data = null;
    try { data = await r.json(); } catch (e) { data = null; }
    if (!r.ok) { const err = new Error((data && data.error) || `HTTP ${r.status}`); err.status = r.status; err.body = data; throw err; }
    return data;
  }
  const nsPath = (p) => `/api/v1/namespaces/${encodeURIComponent(S.ns)}${p}`;

  function flash(msg) {
    const v = $("view");
    const p = h("p", { class: "error", role: "alert", text: msg });
    v.prepend(p);
    setTimeout(() => p.remove(), 8000);
  }

  // ------------------------------------------------------------------ sign-in
  async function start() {
    try { S.me = await api("GET", "/ui/me"); } catch (e) { S.me = null; }
    if (!S.me) return showLogin();
    $("login").hidden = true;
    $("nav").hidden = false; $("logout").hidden = false;
    $("who").textContent = `${S.me.sub} · ${S.me.role}`;
    document.body.dataset.role = S.me.role;
    if (S.me.namespace === "*") {
      const { namespaces } = await api("GET", "/api/v1/namespaces");
      const sel = $("ns"); sel.replaceChildren(...namespaces.map((n) => h("option", { value: n, text: n })));
      S.ns = namespaces.includes(S.ns) ? S.ns : namespaces[0];
      sel.value = S.ns; $("ns-wrap").hidden = false;
      sel.onchange = () => { S.ns = sel.value; connect(); route(); };
    } else S.ns = S.me.namespace;
    connect();
    route();
  }

  function showLogin(msg) {
    $("login").hidden = false; $("nav").hidden = true; $("logout").hidden = true; $("ns-wrap").hidden = true;
    $("who").textContent = ""; $("view").replaceChildren();
    $("login-error").textContent = msg || "";
    if (S.es) { S.es.close(); S.es = null; }
    $("token").focus();
  }

  $("login-form").addEventListener("submit", async (ev) => {
    ev.preventDefault();
    try {
      await api("POST", "/ui/login", { token: $("token").value.trim() });
      $("token").value = "";
      await start();
    } catch (e) { $("login-error").textContent = `Sign-in refused: ${e.message}`; }
  });
  $("logout").addEventListener("click", async () => {
    await api("POST", "/ui/logout").catch(() => null);
    S.me = null; showLogin("Signed out.");
  });

  // ------------------------------------------------------------------ live updates
  function connect() {
    if (S.es) S.es.close();
    const es = new EventSource(nsPath("/events"));
    S.es = es;
    es.onopen = () => $("live").classList.add("on");
    es.onerror = () => $("live").classList.remove("on");
    es.onmessage = (m) => { let e; try { e = JSON.parse(m.data); } catch (x) { return; } onEvent(e); };
  }

  function onEvent(e) {
    const v = S.view;
    if (!v) return;
    if (v.name === "device" && e.kind === "telemetry") { if (e.dev === v.id) v.onTelemetry(e.values); return; }
    if (e.kind === "telemetry") return;
    if (v.name === "device" && e.dev !== v.id && e.kind !== "resync" && e.kind !== "tick") return;
    if (v.name === "alarms" && !["alarm", "offline", "online", "resync", "deleted"].includes(e.kind)) return;
    if (v.name === "audit" && e.kind === "tick") return;
    scheduleRefresh();
  }

  function scheduleRefresh() {
    if (S.refreshTimer) return;
    S.refreshTimer = setTimeout(async () => {
      S.refreshTimer = null;
      try { if (S.view && S.view.refresh) await S.view.refresh(); } catch (e) { handle(e); }
    }, 250);
  }

  function handle(e) {
    if (e.status === 401) return showLogin("Your session ended: sign in again.");
    flash(e.status === 403 ? `Not allowed: ${e.message}` : `Error: ${e.message}`);
  }

  // ------------------------------------------------------------------ routing
  function route() {
    if (!S.me) return;
    const parts = (location.hash || "#/fleet").slice(2).split("/").map(decodeURIComponent);
    for (const a of document.querySelectorAll("#nav a")) a.toggleAttribute("aria-current", false);
    const cur = document.querySelector(`#nav a[href="#/${parts[0]}"]`);
    if (cur) cur.setAttribute("aria-current", "page");
    const views = { fleet: fleetView, device: deviceView, alarms: alarmsView, audit: auditView };
    (views[parts[0]] || fleetView)(...parts.slice(1)).catch(handle);
  }
  window.addEventListener("hashchange", route);
  let resizeTimer = null;
  window.addEventListener("resize", () => {
    clearTimeout(resizeTimer);
    resizeTimer = setTimeout(() => S.view && S.view.resize && S.view.resize(), 150);
  });

  // ------------------------------------------------------------------ fleet
  function deviceState(d, open) {
    if (!d.online) return "offline";
    const bad = (open[d.device_id] || []).some((a) => a.severity !== "info");
    return bad || (d.config_report && d.config_report.status === "rejected") ? "degraded" : "online";
  }

  async function fleetView() {
    const view = $("view");
    const body = h("tbody");
    const count = h("p", { class: "muted", id: "fleet-count" });
    const f = S.fleet;
    const opts = (name, values) => h("select", { name, "aria-label": name, onchange: (ev) => { f[name] = ev.target.value; draw(); } },
      h("option", { value: "", text: `any ${name}` }), ...values.map((x) => h("option", { value: x, text: x, selected: f[name] === x })));
    const cols = [["device_id", "device"], ["state", "state"], ["device_type", "type"], ["group", "group"],
      ["last_seen", "last seen"], ["firmware", "firmware"], ["uptime", "uptime"], ["mem_free", "heap free"],
      ["mem_min", "lowest heap"], ["rssi", "RSSI"], ["alarms", "open alarms"]];
    const head = h("tr", {}, cols.map(([k, label]) => h("th", { scope: "col", "aria-sort": f.sort === k ? (f.dir > 0 ? "ascending" : "descending") : null },
      h("button", { type: "button", "data-sort": k, onclick: () => { f.dir = f.sort === k ? -f.dir : 1; f.sort = k; draw(); fleetHead(); }, text: label }))));
    const fleetHead = () => { for (const th of head.children) { const k = th.firstChild.dataset.sort; if (k === f.sort) th.setAttribute("aria-sort", f.dir > 0 ? "ascending" : "descending"); else th.removeAttribute("aria-sort"); } };
    const filters = h("div", { class: "filters", id: "fleet-filters" });
    view.replaceChildren(h("h1", { text: `Fleet · ${S.ns}` }), filters, count,
      h("div", { class: "table-wrap" }, h("table", { id: "fleet" }, h("thead", {}, head), body)));
    let rows = [];
    function draw() {
      const q = f.q.toLowerCase();
      const shown = rows.filter((r) => (!q || r.device_id.toLowerCase().includes(q)) && (!f.group || r.group === f.group)
        && (!f.type || r.device_type === f.type) && (!f.state || r.state === f.state));
      shown.sort((a, b) => { const x = a[f.sort], y = b[f.sort]; return (x === y ? 0 : x == null ? 1 : y == null ? -1 : x < y ? -1 : 1) * (x == null || y == null ? 1 : f.dir); });
      const frag = document.createDocumentFragment();
      for (const r of shown) {
        frag.append(h("tr", { "data-device": r.device_id },
          h("td", {}, h("a", { href: `#/device/${encodeURIComponent(r.device_id)}`, text: r.device_id })),
          h("td", { class: `state st-${r.state}`, text: r.state }), h("td", { text: r.device_type || "—" }),
          h("td", { text: r.group || "—" }), h("td", { title: fmtTime(r.last_seen), text: ago(r.last_seen) }),
          h("td", { text: r.firmware || "—" }), h("td", { text: dur(r.uptime) }), h("td", { text: kb(r.mem_free) }),
          h("td", { text: kb(r.mem_min) }), h("td", { text: r.rssi == null ? "—" : `${r.rssi} dBm` }),
          h("td", { text: String(r.alarms) })));
      }
      body.replaceChildren(frag);
      count.textContent = `${shown.length} of ${rows.length} devices`;
    }
    async function refresh() {
      const [devs, alarms] = await Promise.all([api("GET", nsPath("/devices?limit=5000")),
        api("GET", nsPath("/alarms?state=firing&limit=1000"))]);
      const open = {};
      for (const a of alarms.alarms) (open[a.device_id] = open[a.device_id] || []).push(a);
      rows = devs.devices.map((d) => {
        const hb = d.heartbeat || {};
        return { device_id: d.device_id, device_type: d.device_type, group: d.group, state: deviceState(d, open),
          last_seen: d.last_seen, firmware: hb.firmware || d.firmware, uptime: hb.uptime, mem_free: hb.mem_free,
          mem_min: hb.mem_min, rssi: hb.rssi, alarms: (open[d.device_id] || []).length };
      });
      const uniq = (k) => [...new Set(rows.map((r) => r[k]).filter(Boolean))].sort();
      filters.replaceChildren(
        h("label", {}, "device", h("input", { type: "search", value: f.q, placeholder: "id contains…", oninput: (ev) => { f.q = ev.target.value; draw(); } })),
        h("label", {}, "group", opts("group", uniq("group"))), h("label", {}, "type", opts("type", uniq("device_type"))),
        h("label", {}, "state", opts("state", ["online", "degraded", "offline"])));
      draw();
    }
    S.view = { name: "fleet", refresh };
    await refresh();
    // for bench/dashboard.py: navigation start → the first full table painted
    requestAnimationFrame(() => performance.mark("fleet-rendered"));
  }

  // ------------------------------------------------------------------ one device
  async function deviceView(id) {
    const view = $("view");
    const card = (key, title, ...kids) => h("section", { class: "card", id: `card-${key}`, "aria-labelledby": `h-${key}` }, h("h2", { id: `h-${key}`, text: title }), ...kids);
    const c = {};
    for (const k of ["info", "relays", "values", "shadow", "config", "alarms", "ota"]) c[k] = h("div");
    const chartBox = h("div", { class: "chart", id: "chart" });
    const chartCtl = h("div", { class: "filters" });
    view.replaceChildren(h("p", {}, h("a", { href: "#/fleet", text: "← fleet" })), h("h1", { text: id }),
      h("div", { class: "cards" }, card("info", "Device", c.info), card("relays", "Relays", c.relays),
        card("values", "Sensors", c.values, chartCtl, chartBox), card("shadow", "Shadow", c.shadow),
        card("config", "Config", c.config), card("alarms", "Alarms", c.alarms), card("ota", "OTA", c.ota),
        card("logs", "Log lines", h("p", { class: "muted", text: "This device does not ship its log lines to the control plane: read them on its /metrics and serial console." }))));
    const dev = encodeURIComponent(id);
    let latest = {};

    async function refresh() {
      const [d, shadow, cfg, alarms, ota, tl] = await Promise.all([
        api("GET", nsPath(`/devices/${dev}`)), api("GET", nsPath(`/devices/${dev}/shadows/default`)),
        api("GET", nsPath(`/devices/${dev}/config/diff`)), api("GET", nsPath(`/alarms?device=${dev}&limit=100`)),
        api("GET", nsPath(`/ota/status?device=${dev}`)).catch(() => null), api("GET", nsPath(`/devices/${dev}/telemetry/latest`))]);
      const hb = d.heartbeat || {};
      const open = alarms.alarms.filter((a) => a.state === "firing");
      const state = !d.online ? "offline" : open.some((a) => a.severity !== "info") ? "degraded" : "online";
      c.info.replaceChildren(h("dl", {},
        ...[["state", h("span", { class: `state st-${state}`, id: "device-state", text: state })], ["type", d.device_type || "—"],
          ["group", d.group || "—"], ["last seen", ago(d.last_seen)], ["firmware", hb.firmware || d.firmware || "—"],
          ["uptime", dur(hb.uptime)], ["heap free / lowest", `${kb(hb.mem_free)} / ${kb(hb.mem_min)}`],
          ["memory errors", hb.mem_errors ? Object.entries(hb.mem_errors).map(([k, n]) => `${k}: ${n}`).join(", ") : "none"],
          ["RSSI", hb.rssi == null ? "—" : `${hb.rssi} dBm`], ["address", d.address || "—"]]
          .map(([k, v]) => [h("dt", { text: k }), h("dd", {}, v)]).flat()));
      drawRelays(shadow.state);
      c.shadow.replaceChildren(h("p", { text: `version ${shadow.version}` }),
        ...["desired", "reported", "delta"].map((k) => h("details", { open: k !== "desired" ? true : null }, h("summary", { text: k }), h("pre", { text: JSON.stringify(shadow.state[k], null, 1) }))));
      const diffRows = cfg.diff.map((x) => h("tr", {}, h("td", { text: x.path }), h("td", { text: JSON.stringify(x.before) }), h("td", { text: JSON.stringify(x.after) })));
      c.config.replaceChildren(h("p", { text: `version ${cfg.version}` + (cfg.previous_version ? `, changes from version ${cfg.previous_version}:` : "") }),
        diffRows.length ? h("div", { class: "table-wrap" }, h("table", {}, h("tr", {}, h("th", { text: "path" }), h("th", { text: "before" }), h("th", { text: "after" })), diffRows)) : h("p", { class: "muted", text: "no earlier version" }),
        ...(can("admin") ? [configEditor()] : []));
      c.alarms.replaceChildren(alarmTable(alarms.alarms));
      c.ota.replaceChildren(h("pre", { text: JSON.stringify(ota ? ota.devices[0] : null, null, 1) }));
      latest = {};
      for (const [f, [ts, v]] of Object.entries(tl.values)) latest[f] = [ts, v];
      drawValues();
    }

    function drawRelays(st) {
      const names = Object.keys({ ...st.reported, ...st.desired }).filter((k) => ["on", "off"].includes(st.reported[k]) || ["on", "off"].includes(st.desired[k])).sort();
      if (!names.length) { c.relays.replaceChildren(h("p", { class: "muted", text: "no relays" })); return; }
      c.relays.replaceChildren(...names.map((n) => {
        const on = st.reported[n] === "on";
        const want = st.desired[n];
        const pending = want && want !== st.reported[n];
        const label = h("span", { id: `relay-label-${n}`, text: n });
        const sw = can("operator")
          ? h("button", { type: "button", role: "switch", "aria-checked": String(on), "aria-labelledby": `relay-label-${n}`, "data-relay": n,
              onclick: async (ev) => {
                const b = ev.currentTarget; b.disabled = true;
                try { await api("POST", nsPath(`/devices/${dev}/shadows/default`), { state: { desired: { [n]: on ? "off" : "on" } } }); }
                catch (e) { handle(e); } finally { b.disabled = false; }
              }, text: on ? "on" : "off" })
          : h("span", { "data-relay": n, role: "status", text: on ? "on" : "off" });
        return h("div", { class: "switch" }, label, sw, pending ? h("span", { class: "pending", text: `switching to ${want}…` }) : null);
      }));
    }

    function configEditor() {
      const ta = h("textarea", { rows: 4, "aria-label": "config overrides (JSON)", spellcheck: "false" });
      api("GET", nsPath(`/devices/${dev}/config`)).then((x) => { ta.value = JSON.stringify(x.overrides, null, 1); }).catch(() => null);
      return h("details", {}, h("summary", { text: "edit overrides (admin)" }), ta,
        h("button", { type: "button", id: "save-config", onclick: async () => {
          let o; try { o = JSON.parse(ta.value); } catch (e) { return flash("overrides: not JSON"); }
          try { await api("PUT", nsPath(`/devices/${dev}/config`), { overrides: o }); scheduleRefresh(); } catch (e) { handle(e); }
        }, text: "Save" }));
    }

    function drawValues() {
      const fields = Object.keys(latest).sort();
      c.values.replaceChildren(fields.length ? h("div", { class: "values" }, fields.map((f) =>
        h("div", { "data-field": f }, h("span", { class: "muted", text: f }), h("b", { text: fmtNum(latest[f][1]) }), h("small", { class: "muted", text: ago(latest[f][0]) }))))
        : h("p", { class: "muted", text: "no readings yet" }));
      if (!S.chartField || !latest[S.chartField]) { S.chartField = fields[0] || null; if (S.chartField) loadChart(); }
      chartCtl.replaceChildren(...fields.map((f) => h("button", { type: "button", "aria-pressed": String(f === S.chartField), onclick: () => { S.chartField = f; drawValues(); loadChart(); }, text: f })),
        ...[["1 h", 3600e3], ["1 day", 86400e3], ["1 week", 7 * 86400e3]].map(([l, ms]) =>
          h("button", { type: "button", "aria-pressed": String(ms === S.chartRange), onclick: () => { S.chartRange = ms; drawValues(); loadChart(); }, text: l })));
    }

    async function loadChart() {
      if (!S.chartField) return;
      const now = Date.now();
      const r = await api("GET", nsPath(`/devices/${dev}/telemetry?field=${encodeURIComponent(S.chartField)}&since=${Math.round(now - S.chartRange)}`));
      S.chartData = [r.points.map((p) => p[0] / 1000), r.points.map((p) => p[1])];
      chartBox.dataset.points = String(r.points.length);
      drawChart();
    }

    function drawChart() {
      if (typeof uPlot === "undefined") { chartBox.textContent = "chart library not installed (./dev setup)"; return; }
      const width = Math.max(200, chartBox.clientWidth || 600);
      if (S.chart) S.chart.destroy();
      chartBox.replaceChildren();
      S.chart = new uPlot({ width, height: 220, series: [{}, { label: S.chartField, stroke: "#0969da", width: 2 }], axes: [{}, {}] }, S.chartData, chartBox);
    }

    function onTelemetry(values) {
      for (const [f, [ts, v]] of Object.entries(values)) latest[f] = [ts, v];
      for (const [f, [ts, v]] of Object.entries(values)) {
        const el = c.values.querySelector(`[data-field="${CSS.escape(f)}"] b`);
        if (el) el.textContent = fmtNum(v); else { drawValues(); break; }
      }
      if (S.chartField && values[S.chartField] && S.chartData && S.chartRange <= 3600e3) {
        S.chartData[0].push(values[S.chartField][0] / 1000); S.chartData[1].push(values[S.chartField][1]);
        chartBox.dataset.points = String(S.chartData[0].length);
        if (S.chart) S.chart.setData(S.chartData); else drawChart();
      }
    }

    S.view = { name: "device", id, refresh, onTelemetry, resize: () => S.chartData && drawChart() };
    S.chart = null; S.chartField = null; S.chartData = null;
    await refresh();
  }
  const fmtNum = (v) => (Math.abs(v) >= 100 ? v.toFixed(0) : Number(v.toFixed(2)).toString());

  // ------------------------------------------------------------------ alarms
  function alarmTable(list) {
    if (!list.length) return h("p", { class: "muted", text: "no alarms" });
    return h("div", { class: "table-wrap" }, h("table", { class: "alarms" },
      h("tr", {}, ["device", "key", "severity", "message", "state", "count", "last", ""].map((t) => h("th", { scope: "col", text: t }))),
      list.map((a) => h("tr", { "data-alarm": String(a.id) },
        h("td", {}, h("a", { href: `#/device/${encodeURIComponent(a.device_id)}`, text: a.device_id })),
        h("td", { text: a.key }), h("td", { text: a.severity }), h("td", { class: "message", text: a.message }),
        h("td", { text: a.state === "resolved" ? "cleared" : a.acked ? `acknowledged by ${a.acked_by}` : "open" }),
        h("td", { text: String(a.count) }), h("td", { text: ago(a.last_ts) }),
        h("td", {}, !a.acked && a.state === "firing" && can("operator") ? h("button", { type: "button", "data-ack": String(a.id),
          onclick: async () => { try { await api("POST", nsPath(`/alarms/${a.id}/ack`)); scheduleRefresh(); } catch (e) { handle(e); } }, text: "Acknowledge" }) : null)))));
  }

  async function alarmsView() {
    const view = $("view");
    const boxes = { open: h("div", { id: "alarms-open" }), acknowledged: h("div", { id: "alarms-acked" }), cleared: h("div", { id: "alarms-cleared" }) };
    view.replaceChildren(h("h1", { text: `Alarms · ${S.ns}` }),
      ...Object.entries(boxes).map(([k, b]) => h("section", { "aria-label": k }, h("h2", { text: k }), b)));
    async function refresh() {
      const { alarms } = await api("GET", nsPath("/alarms?limit=1000"));
      boxes.open.replaceChildren(alarmTable(alarms.filter((a) => a.state === "firing" && !a.acked)));
      boxes.acknowledged.replaceChildren(alarmTable(alarms.filter((a) => a.state === "firing" && a.acked)));
      boxes.cleared.replaceChildren(alarmTable(alarms.filter((a) => a.state === "resolved")));
    }
    S.view = { name: "alarms", refresh };
    await refresh();
  }

  // ------------------------------------------------------------------ audit
  async function auditView() {
    const view = $("view");
    const flt = { sub: "", resource: "", device: "" };
    const body = h("tbody");
    const inputs = Object.keys(flt).map((k) => h("label", {}, k, h("input", { type: "search", name: k, onchange: (ev) => { flt[k] = ev.target.value.trim(); refresh().catch(handle); } })));
    view.replaceChildren(h("h1", { text: `Audit log · ${S.ns}` }), h("div", { class: "filters" }, inputs),
      h("div", { class: "table-wrap" }, h("table", { id: "audit" },
        h("thead", {}, h("tr", {}, ["when", "who", "role", "via", "method", "path", "status", "summary"].map((t) => h("th", { scope: "col", text: t })))), body)));
    async function refresh() {
      const q = new URLSearchParams(Object.entries(flt).filter(([, v]) => v));
      const { entries } = await api("GET", nsPath(`/audit?limit=200&${q}`));
      body.replaceChildren(...entries.map((e) => h("tr", {}, h("td", { text: fmtTime(e.ts) }), h("td", { text: e.sub }), h("td", { text: e.role }),
        h("td", { text: e.via }), h("td", { text: e.method }), h("td", { text: e.path }), h("td", { text: String(e.status) }),
        h("td", {}, h("details", {}, h("summary", { text: e.resource }), h("pre", { text: JSON.stringify(e.summary, null, 1) }))))));
    }
    S.view = { name: "audit", refresh };
    await refresh();
  }

  start();
})();
