// Jobs: the ListJobs filters (states, types, parent, order), paging, refreshed every 2 s.
"use strict";

(() => {
  const { el } = ajs;
  const STATES = ["CREATED", "PENDING", "FINISHED", "FAILED", "CANCELLED"];
  const REFRESH = 2000;
  let tokens = [""]; // page tokens of the pages up to the current one
  let nextToken = "";
  let timer = null;
  let generation = 0; // a reply to an older load is dropped

  function chip(name, value, label, checked) {
    return el("label", {}, el("input", { type: "checkbox", name, value, checked: checked ? "checked" : false }), label);
  }

  function filtersFromUrl() {
    const query = new URLSearchParams(location.search);
    return {
      states: query.getAll("state"),
      types: query.getAll("type"),
      parent: query.get("parent") || "",
      order: query.get("order") === "asc" ? "asc" : "desc",
      pageSize: query.get("page_size") || "25",
    };
  }

  function filtersFromForm() {
    const form = document.getElementById("filters");
    const checked = (name) => [...form.querySelectorAll("input[name=" + name + "]:checked")].map((i) => i.value);
    return {
      states: checked("state"),
      types: checked("type"),
      parent: document.getElementById("parent-filter").value.trim(),
      order: document.getElementById("order-filter").value,
      pageSize: document.getElementById("page-size").value,
    };
  }

  function query(filters, token) {
    const params = new URLSearchParams();
    filters.states.forEach((s) => params.append("state", s));
    filters.types.forEach((t) => params.append("type", t));
    if (filters.parent) params.set("parent", filters.parent);
    params.set("order", filters.order);
    params.set("page_size", filters.pageSize);
    if (token) params.set("page_token", token);
    return params;
  }

  async function fillForm(filters) {
    document.getElementById("state-filter").replaceChildren(
      ...STATES.map((s) => chip("state", s, ajs.STATE_NAMES[s], filters.states.includes(s))),
    );
    let types = [];
    try {
      types = (await ajs.api("/api/types")).map((t) => t.name);
    } catch (error) {
      types = [];
    }
    for (const t of filters.types) if (!types.includes(t)) types.push(t);
    document.getElementById("type-filter").replaceChildren(
      ...types.map((t) => chip("type", t, t, filters.types.includes(t))),
    );
    document.getElementById("parent-filter").value = filters.parent;
    document.getElementById("order-filter").value = filters.order;
    document.getElementById("page-size").value = filters.pageSize;
  }

  function row(job) {
    const fraction = ajs.fractionOf(job);
    return el("tr", { "data-id": job.id, "data-state": job.state },
      el("td", { class: "id", title: job.id }, el("a", { href: ajs.jobHref(job.id), text: job.id })),
      el("td", { text: job.type }),
      el("td", {}, ajs.badge(job.state)),
      el("td", {}, el("div", { class: "progress-cell" }, ajs.bar(job.state, fraction),
        el("span", { class: "pct", text: Math.round(fraction * 100) + "%" }))),
      el("td", { class: "num", text: job.attempt + " / " + job.max_attempts }),
      el("td", { text: job.creator }),
      el("td", { title: job.create_time || "", text: ajs.ago(job.create_time) }),
    );
  }

  async function load() {
    clearTimeout(timer);
    const mine = ++generation;
    const filters = filtersFromUrl();
    const token = tokens[tokens.length - 1];
    try {
      const page = await ajs.api("/api/jobs?" + query(filters, token).toString());
      if (mine !== generation) return;
      document.querySelector("#jobs-table tbody").replaceChildren(...page.jobs.map(row));
      document.getElementById("jobs-empty").hidden = page.jobs.length > 0;
      nextToken = page.next_page_token;
    } catch (error) {
      if (mine !== generation) return;
      document.querySelector("#jobs-table tbody").replaceChildren(
        el("tr", {}, el("td", { colspan: 7, class: "error", text: error.message })),
      );
      nextToken = "";
    }
    document.getElementById("next-page").disabled = !nextToken;
    document.getElementById("prev-page").disabled = tokens.length < 2;
    document.getElementById("page-number").textContent = "Page " + tokens.length;
    timer = setTimeout(load, REFRESH);
  }

  document.addEventListener("DOMContentLoaded", async () => {
    const filters = filtersFromUrl();
    const token = new URLSearchParams(location.search).get("page_token");
    if (token) tokens = ["", token];
    await fillForm(filters);
    document.getElementById("filters").addEventListener("submit", (event) => {
      event.preventDefault();
      tokens = [""];
      history.pushState(null, "", "/jobs?" + query(filtersFromForm(), "").toString());
      load();
    });
    document.getElementById("next-page").addEventListener("click", () => {
      if (!nextToken) return;
      tokens.push(nextToken);
      load();
    });
    document.getElementById("prev-page").addEventListener("click", () => {
      if (tokens.length < 2) return;
      tokens.pop();
      load();
    });
    window.addEventListener("popstate", async () => {
      tokens = [""];
      await fillForm(filtersFromUrl());
      load();
    });
    load();
  });
})();
