// Overview: counts by type and by queue, and a live chart of jobs ended per second.
"use strict";

(() => {
  const { el } = ajs;
  const WINDOW = 300; // seconds of throughput kept on the chart
  const times = [];
  const rates = [];
  const buckets = new Map(); // unix second -> jobs ended in it
  let liveSince = null; // the first second the server counted for this page
  let chart = null;

  function makeChart() {
    const box = document.getElementById("chart");
    const options = {
      width: Math.max(300, box.clientWidth),
      height: 220,
      legend: { show: false },
      cursor: { drag: { x: false, y: false } },
      scales: { x: { time: true }, y: { range: (u, min, max) => [0, Math.max(1, max * 1.15)] } },
      axes: [
        { stroke: "#6b7488", grid: { stroke: "#eef0f4" }, ticks: { stroke: "#e3e7ef" } },
        { stroke: "#6b7488", grid: { stroke: "#eef0f4" }, ticks: { stroke: "#e3e7ef" }, size: 50 },
      ],
      series: [
        {},
        { label: "ended / s", stroke: "#2f5bea", width: 2, fill: "rgba(47, 91, 234, 0.12)", points: { show: false } },
      ],
    };
    chart = new uPlot(options, [times, rates], box);
    window.addEventListener("resize", () => chart.setSize({ width: Math.max(300, box.clientWidth), height: 220 }));
  }

  function countCell(value, href) {
    const td = el("td", { class: "num" + (value === 0 ? " zero" : "") });
    if (value > 0 && href) td.append(el("a", { href, text: value }));
    else td.textContent = String(value);
    return td;
  }

  function fillTable(id, rows, filterKey) {
    const body = document.querySelector("#" + id + " tbody");
    const built = rows.map((row) => {
      const filter = filterKey ? filterKey + "=" + encodeURIComponent(row.name) + "&" : "";
      const first = filterKey === "type" ? el("a", { href: "/jobs?type=" + encodeURIComponent(row.name), text: row.name }) : row.name;
      const paused = row.paused ? el("span", { class: "badge PAUSED", text: "paused", title: "no job of it starts" }) : null;
      return el("tr", { "data-name": row.name },
        el("td", {}, first, paused ? " " : null, paused),
        countCell(row.queued, filterKey ? "/jobs?" + filter + "state=CREATED" : null),
        countCell(row.running, filterKey ? "/jobs?" + filter + "state=PENDING" : null),
        countCell(row.failed, filterKey ? "/jobs?" + filter + "state=FAILED" : null),
      );
    });
    if (built.length === 0) built.push(el("tr", {}, el("td", { colspan: 4, class: "muted", text: "Nothing yet." })));
    body.replaceChildren(...built);
  }

  function total(rows, key) {
    return rows.reduce((sum, row) => sum + row[key], 0);
  }

  function shown(value, capped, cap) {
    return capped && value >= cap ? cap + "+" : String(value);
  }

  function onSample(sample) {
    if (sample.types) showCounts(sample);
    showThroughput(sample);
  }

  function showCounts(sample) {
    fillTable("types-table", sample.types, "type");
    fillTable("queues-table", sample.queues, null);
    document.getElementById("total-queued").textContent = shown(total(sample.types, "queued"), sample.capped, sample.cap);
    document.getElementById("total-running").textContent = shown(total(sample.types, "running"), sample.capped, sample.cap);
    document.getElementById("total-failed").textContent = shown(total(sample.types, "failed"), sample.capped, sample.cap);
    document.getElementById("overview-note").textContent =
      "Counts of the jobs you may see, kept up to date live" +
      (sample.capped ? "; more than " + sample.cap + " in a state: counts stop there." : ".");
  }

  function showThroughput(sample) {
    if (sample.ended !== null) {
      const now = Math.floor(new Date(sample.time).getTime() / 1000); // the server's clock
      if (liveSince === null) liveSince = now;
      for (const [second, count] of sample.ended) buckets.set(second, (buckets.get(second) || 0) + count);
      // Whole seconds only: the current one is still counting.
      const first = Math.max(liveSince, now - WINDOW);
      times.length = 0;
      rates.length = 0;
      for (let second = first; second < now; second++) {
        times.push(second);
        rates.push(buckets.get(second) || 0);
      }
      for (const second of buckets.keys()) if (second < now - WINDOW) buckets.delete(second);
      chart.setData([times, rates]);
      const minute = rates.slice(-60);
      const rate = minute.length ? minute.reduce((a, b) => a + b, 0) / minute.length : 0;
      document.getElementById("rate").textContent = rate.toFixed(1);
    }
  }

  document.addEventListener("DOMContentLoaded", () => {
    makeChart();
    const source = new EventSource("/api/events/overview");
    source.addEventListener("overview", (event) => onSample(JSON.parse(event.data)));
    source.addEventListener("problem", (event) => {
      const problem = JSON.parse(event.data);
      document.getElementById("overview-note").textContent = "The server said: " + problem.message;
    });
    source.addEventListener("error", () => {
      if (source.readyState === EventSource.CLOSED) setTimeout(() => window.location.reload(), 3000);
    });
  });
})();
