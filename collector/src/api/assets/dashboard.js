// Tributary fleet dashboard: plain JavaScript, no build step, no dependencies.
//
// What it does: loads the fleet, devices and latest values from the query API once, then
// follows the live WebSocket (/api/v1/live) for new readings and window results; only the
// in-memory fleet view (/api/v1/agents) is asked again every few seconds. Charts are drawn
// on canvases by hand. Elements carry data-* attributes (data-device-id, data-selector,
// data-points, data-last-value) so the browser test can see what the page shows.
"use strict";

(() => {
  const CHART_SPAN_MS = 5 * 60 * 1000;
  const MAX_POINTS_PER_SERIES = 2000;
  const AGENTS_REFRESH_MS = 2000;
  const CATALOG_REFRESH_MS = 30000;
  const FRESH_MS = 5000;
  const STALE_MS = 60000;

  const state = {
    token: readToken(),
    clockOffsetMs: 0, // server clock minus browser clock
    devices: new Map(), // device_id -> { deviceId, agentId, newestMs }
    series: new Map(), // selector -> { selector, deviceId, metric, tags, points: [[t, v]], newestMs }
    agents: null, // the last /api/v1/agents answer
    newestByAgent: new Map(),
    newestMs: null,
    selectedDevice: null,
    socket: null,
    socketOpen: false,
    reconnectDelayMs: 500,
    charts: new Map(), // selector -> chart element bundle
    drawPending: false,
  };

  // ---- helpers ------------------------------------------------------------------------

  function readToken() {
    const match = /(?:^|[#&])token=([^&]+)/.exec(window.location.hash);
    if (match) {
      const token = decodeURIComponent(match[1]);
      sessionStorage.setItem("tributary-token", token);
      history.replaceState(null, "", window.location.pathname + window.location.search);
      return token;
    }
    return sessionStorage.getItem("tributary-token") || "";
  }

  function escapePart(text) {
    return text.replace(/%/g, "%25").replace(/\//g, "%2F");
  }

  function selectorOf(deviceId, metric, tags) {
    const base = escapePart(deviceId) + "/" + escapePart(metric);
    return tags ? base + "/" + escapePart(tags) : base;
  }

  function serverNow() {
    return Date.now() + state.clockOffsetMs;
  }

  function formatAge(ms) {
    if (ms === null || ms === undefined || !isFinite(ms)) return "–";
    if (ms < 0) ms = 0;
    if (ms < 1000) return ms.toFixed(0) + " ms";
    if (ms < 60000) return (ms / 1000).toFixed(1) + " s";
    if (ms < 3600000) return Math.floor(ms / 60000) + " min";
    if (ms < 86400000) return (ms / 3600000).toFixed(1) + " h";
    return (ms / 86400000).toFixed(1) + " d";
  }

  function ageClass(ms) {
    if (ms === null || ms === undefined) return "";
    if (ms < FRESH_MS) return "good";
    if (ms < STALE_MS) return "warn";
    return "bad";
  }

  function formatBytes(bytes) {
    if (!bytes) return "0 B";
    const units = ["B", "KiB", "MiB", "GiB", "TiB"];
    let value = bytes;
    let unit = 0;
    while (value >= 1024 && unit < units.length - 1) {
      value /= 1024;
      unit += 1;
    }
    return (unit === 0 ? value.toFixed(0) : value.toFixed(1)) + " " + units[unit];
  }

  function formatValue(value) {
    if (value === null || value === undefined || !isFinite(value)) return "–";
    const magnitude = Math.abs(value);
    if (magnitude >= 1e6 || (magnitude > 0 && magnitude < 1e-3)) return value.toExponential(2);
    if (magnitude >= 100) return value.toFixed(1);
    return value.toFixed(2);
  }

  function element(tag, className, text) {
    const node = document.createElement(tag);
    if (className) node.className = className;
    if (text !== undefined) node.textContent = text;
    return node;
  }

  function showProblem(message) {
    const box = document.getElementById("problem");
    box.hidden = !message;
    box.textContent = message || "";
  }

  async function api(path) {
    const headers = state.token ? { Authorization: "Bearer " + state.token } : {};
    const response = await fetch(path, { headers });
    if (response.status === 401) {
      document.getElementById("auth").hidden = false;
      throw new Error("unauthorized");
    }
    const body = await response.json().catch(() => ({}));
    if (!response.ok) {
      throw new Error(path + ": " + (body.error || response.status));
    }
    return body;
  }

  // ---- data -----------------------------------------------------------------------------

  function ensureDevice(deviceId, agentId) {
    let device = state.devices.get(deviceId);
    if (!device) {
      device = { deviceId, agentId: agentId || "", newestMs: null };
      state.devices.set(deviceId, device);
      if (!state.selectedDevice) selectDevice(deviceId);
      else renderDevices();
    } else if (agentId) {
      device.agentId = agentId;
    }
    return device;
  }

  function ensureSeries(deviceId, metric, tags) {
    const selector = selectorOf(deviceId, metric, tags);
    let series = state.series.get(selector);
    if (!series) {
      series = { selector, deviceId, metric, tags, points: [], newestMs: null, historyLoaded: false };
      state.series.set(selector, series);
      if (deviceId === state.selectedDevice) renderCharts();
    }
    return series;
  }

  function noteTime(agentId, deviceId, timeMs) {
    const device = ensureDevice(deviceId, agentId);
    if (device.newestMs === null || timeMs > device.newestMs) device.newestMs = timeMs;
    if (agentId) {
      const previous = state.newestByAgent.get(agentId);
      if (previous === undefined || timeMs > previous) state.newestByAgent.set(agentId, timeMs);
    }
    if (state.newestMs === null || timeMs > state.newestMs) state.newestMs = timeMs;
  }

  function addPoint(series, timeMs, value) {
    const points = series.points;
    if (points.length === 0 || timeMs > points[points.length - 1][0]) {
      points.push([timeMs, value]);
    } else {
      // Out of order (a backfill): insert in place, replacing an equal time.
      let index = points.length - 1;
      while (index >= 0 && points[index][0] > timeMs) index -= 1;
      if (index >= 0 && points[index][0] === timeMs) points[index][1] = value;
      else points.splice(index + 1, 0, [timeMs, value]);
    }
    if (points.length > MAX_POINTS_PER_SERIES) points.splice(0, points.length - MAX_POINTS_PER_SERIES);
    if (series.newestMs === null || timeMs >= series.newestMs) {
      series.newestMs = timeMs;
      series.latest = value;
    }
  }

  function onReading(reading) {
    const series = ensureSeries(reading.device_id, reading.metric, reading.tags);
    addPoint(series, reading.time_ms, reading.value);
    noteTime(reading.agent_id, reading.device_id, reading.time_ms);
    markChanged(series);
  }

  function onWindow(window_) {
    const series = ensureSeries(window_.device_id, window_.metric, window_.tags);
    // Without raw forwarding only windows arrive: plot each window's last reading.
    if (series.newestMs === null || window_.last_time_ms > series.newestMs) {
      addPoint(series, window_.last_time_ms, window_.last_value);
      markChanged(series);
    }
    noteTime(window_.agent_id, window_.device_id, window_.last_time_ms);
  }

  function markChanged(series) {
    const chart = state.charts.get(series.selector);
    if (chart) {
      chart.dirty = true;
      chart.root.classList.add("flash");
      setTimeout(() => chart.root.classList.remove("flash"), 300);
    }
    scheduleDraw();
  }

  async function loadCatalog() {
    const [devices, series, latest] = await Promise.all([
      api("/api/v1/devices"),
      api("/api/v1/series"),
      api("/api/v1/latest"),
    ]);
    for (const device of devices.devices) ensureDevice(device.device_id, device.last_agent_id);
    for (const entry of series.series) ensureSeries(entry.device_id, entry.metric, entry.tags);
    for (const value of latest.values) {
      const entry = ensureSeries(value.device_id, value.metric, value.tags);
      if (entry.newestMs === null || value.time_ms > entry.newestMs) {
        entry.newestMs = value.time_ms;
        entry.latest = value.value;
      }
      const device = state.devices.get(value.device_id);
      noteTime(device ? device.agentId : "", value.device_id, value.time_ms);
    }
    if (!state.selectedDevice && state.devices.size > 0) {
      selectDevice([...state.devices.keys()].sort()[0]);
    }
    renderDevices();
    renderCharts();
  }

  async function loadHistory(series) {
    series.historyLoaded = true;
    const now = serverNow();
    const query = "series=" + encodeURIComponent(series.selector) +
      "&from_ms=" + Math.floor(now - CHART_SPAN_MS) + "&to_ms=" + Math.ceil(now + 60000);
    try {
      const raw = await api("/api/v1/raw?" + query);
      for (const reading of raw.readings) addPoint(series, reading.time_ms, reading.value);
      if (raw.readings.length === 0) {
        const range = await api("/api/v1/range?" + query);
        for (const window_ of range.windows) addPoint(series, window_.last_time_ms, window_.last_value);
      }
      markChanged(series);
    } catch (error) {
      if (error.message !== "unauthorized") showProblem("Loading history of " + series.selector + ": " + error.message);
    }
  }

  async function refreshAgents() {
    try {
      const answer = await api("/api/v1/agents");
      state.clockOffsetMs = answer.now_ms - Date.now();
      state.agents = answer;
      renderFleet(answer);
      showProblem("");
    } catch (error) {
      if (error.message !== "unauthorized") showProblem("Cannot reach the collector: " + error.message);
    }
  }

  // ---- live -----------------------------------------------------------------------------

  function connect() {
    const scheme = window.location.protocol === "https:" ? "wss:" : "ws:";
    const query = state.token ? "?access_token=" + encodeURIComponent(state.token) : "";
    const socket = new WebSocket(scheme + "//" + window.location.host + "/api/v1/live" + query);
    state.socket = socket;
    socket.addEventListener("open", () => {
      state.socketOpen = true;
      state.reconnectDelayMs = 500;
      socket.send(JSON.stringify({ type: "subscribe", windows: true, readings: true }));
      updateFreshness();
    });
    socket.addEventListener("message", (event) => {
      let message;
      try {
        message = JSON.parse(event.data);
      } catch (_) {
        return;
      }
      if (message.type === "data") {
        if (typeof message.sent_ms === "number") {
          // The server's clock, to age data by; smoothed so one slow message does not jump it.
          const offset = message.sent_ms - Date.now();
          state.clockOffsetMs = Math.max(offset, state.clockOffsetMs * 0.9 + offset * 0.1);
        }
        for (const reading of message.readings) onReading(reading);
        for (const window_ of message.windows) onWindow(window_);
        updateFreshness();
      } else if (message.type === "lagged") {
        document.getElementById("charts-note").textContent =
          "skipped " + message.skipped_batches + " updates to catch up";
      } else if (message.type === "error") {
        showProblem("Live feed: " + message.error);
      }
    });
    socket.addEventListener("close", () => {
      state.socketOpen = false;
      updateFreshness();
      setTimeout(connect, state.reconnectDelayMs);
      state.reconnectDelayMs = Math.min(state.reconnectDelayMs * 2, 10000);
    });
  }

  // ---- rendering ------------------------------------------------------------------------

  function updateFreshness() {
    const box = document.getElementById("freshness");
    const label = document.getElementById("freshness-label");
    const age = state.newestMs === null ? null : serverNow() - state.newestMs;
    let status;
    if (!state.socketOpen) {
      status = "is-dead";
      label.textContent = "Live feed disconnected" + (age === null ? "" : " · newest data " + formatAge(age) + " old");
    } else if (age === null) {
      status = "is-waiting";
      label.textContent = "Live · waiting for data";
    } else {
      status = age < FRESH_MS ? "is-fresh" : age < STALE_MS ? "is-stale" : "is-dead";
      label.textContent = "Live · newest data " + formatAge(age) + " old";
    }
    box.className = "freshness " + status;
    box.dataset.newestAgeMs = age === null ? "" : String(Math.round(age));

    const newest = document.getElementById("newest-age");
    newest.textContent = age === null ? "–" : formatAge(age);
    newest.className = "card-value " + ageClass(age);
    document.getElementById("newest-note").textContent =
      state.newestMs === null ? "" : "at " + new Date(state.newestMs).toLocaleTimeString();
  }

  function renderFleet(answer) {
    document.getElementById("gateways-online").textContent = String(answer.online);
    document.getElementById("gateways-total").textContent = "/ " + answer.agents.length;
    const offline = document.getElementById("gateways-offline");
    offline.textContent = String(answer.offline);
    offline.className = "card-value " + (answer.offline > 0 ? "bad" : "good");

    let batches = 0;
    let bytes = 0;
    let oldestAge = null;
    for (const agent of answer.agents) {
      batches += agent.reported_backlog.batches;
      bytes += agent.reported_backlog.bytes;
      const age = agent.reported_backlog.oldest_unsent_age_ms;
      if (age !== null && (oldestAge === null || age > oldestAge)) oldestAge = age;
    }
    document.getElementById("backlog-total").textContent = batches + " batches";
    document.getElementById("backlog-note").textContent =
      formatBytes(bytes) + (oldestAge === null ? "" : " · oldest " + formatAge(oldestAge) + " behind");

    const body = document.getElementById("gateways-body");
    body.replaceChildren();
    if (answer.agents.length === 0) {
      const row = element("tr", "empty");
      const cell = element("td", "", "No gateway has connected since the collector started.");
      cell.colSpan = 8;
      row.append(cell);
      body.append(row);
      return;
    }
    for (const agent of answer.agents) {
      const row = element("tr");
      row.dataset.agentId = agent.agent_id;
      const newest = state.newestByAgent.get(agent.agent_id);
      const newestAge = newest === undefined ? null : serverNow() - newest;
      const backlog = agent.reported_backlog;
      const status = element("span", "status " + (agent.online ? "online" : "offline"), agent.online ? "online" : "offline");
      const cells = [
        element("td", "gateway-id", agent.agent_id),
        element("td"),
        element("td", "", agent.agent_version || "–"),
        element("td", "age-" + ageClass(agent.last_seen_age_ms), formatAge(agent.last_seen_age_ms) + " ago"),
        element("td", "age-" + ageClass(newestAge), newestAge === null ? "–" : formatAge(newestAge) + " old"),
        element("td", "", backlog.batches + " batches · " + formatBytes(backlog.bytes)),
        element("td", "age-" + ageClass(backlog.oldest_unsent_age_ms), backlog.oldest_unsent_age_ms === null ? "–" : formatAge(backlog.oldest_unsent_age_ms)),
        element("td", "num", agent.readings_acked.toLocaleString()),
      ];
      cells[1].append(status);
      row.append(...cells);
      body.append(row);
    }
  }

  function renderDevices() {
    const list = document.getElementById("device-list");
    const filter = document.getElementById("device-filter").value.trim().toLowerCase();
    document.getElementById("devices-count").textContent = String(state.devices.size);
    list.replaceChildren();
    const devices = [...state.devices.values()]
      .filter((device) => !filter || device.deviceId.toLowerCase().includes(filter))
      .sort((left, right) => left.deviceId.localeCompare(right.deviceId));
    if (devices.length === 0) {
      list.append(element("li", "empty", state.devices.size === 0 ? "No device has reported data yet." : "No device matches."));
      return;
    }
    const now = serverNow();
    for (const device of devices) {
      const item = element("li", "device" + (device.deviceId === state.selectedDevice ? " selected" : ""));
      item.dataset.deviceId = device.deviceId;
      const age = device.newestMs === null ? null : now - device.newestMs;
      const dot = element("span", "device-dot " + (age === null ? "" : age < FRESH_MS ? "fresh" : age < STALE_MS ? "stale" : "dead"));
      const text = element("div");
      text.append(element("div", "device-name", device.deviceId), element("div", "device-meta", device.agentId ? "via " + device.agentId : ""));
      item.append(dot, text, element("span", "device-age", age === null ? "" : formatAge(age)));
      item.addEventListener("click", () => selectDevice(device.deviceId));
      list.append(item);
    }
  }

  function selectDevice(deviceId) {
    state.selectedDevice = deviceId;
    renderDevices();
    renderCharts();
  }

  function renderCharts() {
    const container = document.getElementById("charts");
    const title = document.getElementById("charts-title");
    state.charts.clear();
    container.replaceChildren();
    if (!state.selectedDevice) {
      title.textContent = "Select a device";
      container.append(element("p", "empty", "Pick a device on the left to see its series."));
      return;
    }
    title.textContent = state.selectedDevice;
    const series = [...state.series.values()]
      .filter((entry) => entry.deviceId === state.selectedDevice)
      .sort((left, right) => (left.metric + left.tags).localeCompare(right.metric + right.tags));
    if (series.length === 0) {
      container.append(element("p", "empty", "No series yet for this device."));
      return;
    }
    for (const entry of series) {
      const root = element("section", "chart");
      root.dataset.selector = entry.selector;
      const head = element("div", "chart-head");
      const name = element("div", "chart-title", entry.metric);
      if (entry.tags) name.append(element("span", "chart-tags", entry.tags));
      const value = element("div", "chart-value", formatValue(entry.latest));
      head.append(name, value);
      const sub = element("div", "chart-sub");
      const range = element("span", "", "");
      const age = element("span", "", "");
      sub.append(range, age);
      const canvas = document.createElement("canvas");
      canvas.setAttribute("role", "img");
      canvas.setAttribute("aria-label", entry.metric + " over the last 5 minutes");
      root.append(head, sub, canvas);
      container.append(root);
      state.charts.set(entry.selector, { root, value, range, age, canvas, dirty: true });
      if (!entry.historyLoaded) loadHistory(entry);
    }
    scheduleDraw();
  }

  function scheduleDraw() {
    if (state.drawPending) return;
    state.drawPending = true;
    requestAnimationFrame(() => {
      state.drawPending = false;
      for (const [selector, chart] of state.charts) {
        const series = state.series.get(selector);
        if (series) drawChart(chart, series);
      }
    });
  }

  function niceStep(span, ticks) {
    const raw = span / ticks;
    const power = Math.pow(10, Math.floor(Math.log10(raw)));
    const scaled = raw / power;
    const nice = scaled < 1.5 ? 1 : scaled < 3 ? 2 : scaled < 7 ? 5 : 10;
    return nice * power;
  }

  function drawChart(chart, series) {
    const { canvas } = chart;
    const ratio = window.devicePixelRatio || 1;
    const width = canvas.clientWidth;
    const height = canvas.clientHeight;
    if (width === 0 || height === 0) return;
    if (canvas.width !== Math.round(width * ratio) || canvas.height !== Math.round(height * ratio)) {
      canvas.width = Math.round(width * ratio);
      canvas.height = Math.round(height * ratio);
    }
    const context = canvas.getContext("2d");
    context.setTransform(ratio, 0, 0, ratio, 0, 0);
    context.clearRect(0, 0, width, height);

    const now = serverNow();
    const from = now - CHART_SPAN_MS;
    const visible = series.points.filter((point) => point[0] >= from - 10000);

    chart.root.dataset.points = String(series.points.length);
    chart.root.dataset.lastValue = series.latest === undefined ? "" : String(series.latest);
    chart.root.dataset.lastTimeMs = series.newestMs === null ? "" : String(series.newestMs);
    chart.value.textContent = formatValue(series.latest);
    chart.age.textContent = series.newestMs === null ? "no data yet" : formatAge(now - series.newestMs) + " ago";

    const left = 44;
    const right = width - 8;
    const top = 8;
    const bottom = height - 20;
    let low = Infinity;
    let high = -Infinity;
    for (const [, value] of visible) {
      if (value < low) low = value;
      if (value > high) high = value;
    }
    if (!isFinite(low)) {
      low = 0;
      high = 1;
    }
    if (high - low < 1e-9) {
      const pad = Math.abs(high) * 0.05 || 1;
      low -= pad;
      high += pad;
    }
    const step = niceStep(high - low, 4);
    low = Math.floor(low / step) * step;
    high = Math.ceil(high / step) * step;
    chart.range.textContent = visible.length ? "min " + formatValue(Math.min(...visible.map((p) => p[1]))) + " · max " + formatValue(Math.max(...visible.map((p) => p[1]))) : "";
    const x = (time) => left + ((time - from) / CHART_SPAN_MS) * (right - left);
    const y = (value) => bottom - ((value - low) / (high - low)) * (bottom - top);

    context.font = "11px DejaVu Sans, system-ui, sans-serif";
    context.strokeStyle = "#e8edf3";
    context.fillStyle = "#8a94a3";
    context.lineWidth = 1;
    context.textAlign = "right";
    context.textBaseline = "middle";
    for (let tick = low; tick <= high + step / 2; tick += step) {
      const ty = Math.round(y(tick)) + 0.5;
      context.beginPath();
      context.moveTo(left, ty);
      context.lineTo(right, ty);
      context.stroke();
      context.fillText(formatValue(tick).replace(/\.00$/, ""), left - 6, ty);
    }
    context.textAlign = "center";
    context.textBaseline = "top";
    for (let minutesAgo = 5; minutesAgo >= 0; minutesAgo -= 1) {
      const time = now - minutesAgo * 60000;
      const label = minutesAgo === 0 ? "now" : "-" + minutesAgo + " min";
      context.fillText(label, Math.min(Math.max(x(time), left + 14), right - 14), bottom + 5);
    }
    if (visible.length === 0) {
      context.fillStyle = "#a0a9b6";
      context.textBaseline = "middle";
      context.fillText("waiting for data", (left + right) / 2, (top + bottom) / 2);
      return;
    }

    context.save();
    context.beginPath();
    context.rect(left, top - 4, right - left + 4, bottom - top + 8);
    context.clip();
    const gradient = context.createLinearGradient(0, top, 0, bottom);
    gradient.addColorStop(0, "rgba(37, 99, 235, 0.22)");
    gradient.addColorStop(1, "rgba(37, 99, 235, 0.0)");
    context.beginPath();
    visible.forEach(([time, value], index) => {
      if (index === 0) context.moveTo(x(time), y(value));
      else context.lineTo(x(time), y(value));
    });
    const lastPoint = visible[visible.length - 1];
    context.lineTo(x(lastPoint[0]), bottom);
    context.lineTo(x(visible[0][0]), bottom);
    context.closePath();
    context.fillStyle = gradient;
    context.fill();
    context.beginPath();
    visible.forEach(([time, value], index) => {
      if (index === 0) context.moveTo(x(time), y(value));
      else context.lineTo(x(time), y(value));
    });
    context.strokeStyle = "#2563eb";
    context.lineWidth = 1.8;
    context.lineJoin = "round";
    context.stroke();
    context.beginPath();
    context.arc(x(lastPoint[0]), y(lastPoint[1]), 3.5, 0, Math.PI * 2);
    context.fillStyle = "#2563eb";
    context.fill();
    context.restore();
  }

  // ---- start ----------------------------------------------------------------------------

  document.getElementById("auth-form").addEventListener("submit", (event) => {
    event.preventDefault();
    state.token = document.getElementById("auth-token").value.trim();
    sessionStorage.setItem("tributary-token", state.token);
    document.getElementById("auth").hidden = true;
    start();
  });
  document.getElementById("device-filter").addEventListener("input", renderDevices);

  let started = false;
  async function start() {
    try {
      const info = await api("/api/v1/info");
      state.clockOffsetMs = info.now_ms - Date.now();
    } catch (error) {
      if (error.message !== "unauthorized") showProblem("Cannot reach the collector: " + error.message);
      return;
    }
    if (started) return;
    started = true;
    connect();
    await refreshAgents();
    try {
      await loadCatalog();
    } catch (error) {
      showProblem("Loading devices: " + error.message);
    }
    setInterval(refreshAgents, AGENTS_REFRESH_MS);
    setInterval(() => loadCatalog().catch((error) => showProblem("Loading devices: " + error.message)), CATALOG_REFRESH_MS);
    setInterval(() => {
      updateFreshness();
      if (state.agents) renderFleet(state.agents);
      renderDevices();
      scheduleDraw();
    }, 1000);
  }

  start();
})();
