// Shared by every page of the ajs dashboard. Server data is only ever put into the
// page as text (textContent, attribute values): job data is user input.
"use strict";

const ajs = (() => {
  let session = null;

  // An element: el("td", {class: "num", text: "3"}, child, ...).
  function el(tag, props, ...children) {
    const node = document.createElement(tag);
    for (const [key, value] of Object.entries(props || {})) {
      if (value === undefined || value === null || value === false) continue;
      if (key === "text") node.textContent = String(value);
      else if (key === "class") node.className = value;
      else if (key === "href") node.setAttribute("href", safeHref(value));
      else node.setAttribute(key, String(value));
    }
    for (const child of children) {
      if (child !== null && child !== undefined) node.append(child);
    }
    return node;
  }

  // Only links within the dashboard.
  function safeHref(value) {
    const text = String(value);
    return text.startsWith("/") && !text.startsWith("//") ? text : "#";
  }

  function jobHref(id) {
    return "/job?id=" + encodeURIComponent(id);
  }

  const STATE_NAMES = {
    CREATED: "queued", PENDING: "running", FINISHED: "finished", FAILED: "failed", CANCELLED: "cancelled",
  };

  function badge(state) {
    return el("span", { class: "badge " + state, text: state, title: STATE_NAMES[state] || "" });
  }

  function fractionOf(job) {
    if (job.state === "FINISHED") return 1;
    const progress = job.last && job.last.progress;
    return progress ? progress.fraction : 0;
  }

  // A progress bar; setBar updates it.
  function bar(state, fraction, big) {
    const node = el("div", {
      class: "bar " + state + (big ? " big" : ""), role: "progressbar",
      "aria-valuemin": 0, "aria-valuemax": 100,
    }, el("span", { class: "fill" }));
    setBar(node, state, fraction);
    return node;
  }

  function setBar(node, state, fraction) {
    const percent = Math.round(Math.max(0, Math.min(1, fraction)) * 100);
    node.className = "bar " + state + (node.classList.contains("big") ? " big" : "");
    node.setAttribute("aria-valuenow", String(percent));
    node.querySelector(".fill").style.width = percent + "%";
  }

  function when(iso) {
    if (!iso) return "";
    const at = new Date(iso);
    const today = new Date();
    const time = at.toLocaleTimeString([], { hour12: false });
    return at.toDateString() === today.toDateString() ? time : at.toLocaleDateString() + " " + time;
  }

  function ago(iso) {
    if (!iso) return "";
    const seconds = Math.max(0, (Date.now() - new Date(iso).getTime()) / 1000);
    if (seconds < 60) return Math.round(seconds) + " s ago";
    if (seconds < 3600) return Math.round(seconds / 60) + " min ago";
    if (seconds < 86400) return Math.round(seconds / 3600) + " h ago";
    return Math.round(seconds / 86400) + " d ago";
  }

  class ApiError extends Error {
    constructor(status, code, message) {
      super(message);
      this.status = status;
      this.code = code;
    }
  }

  async function api(path, options) {
    const init = Object.assign({ credentials: "same-origin", headers: {} }, options || {});
    if (init.method && init.method !== "GET") {
      const current = await getSession();
      init.headers["X-CSRF-Token"] = current.csrf;
    }
    const reply = await fetch(path, init);
    if (reply.status === 401) {
      window.location.assign("/signin?next=" + encodeURIComponent(location.pathname + location.search));
      throw new ApiError(401, "UNAUTHENTICATED", "signed out");
    }
    const body = await reply.json();
    if (!reply.ok) {
      const error = body.error || {};
      throw new ApiError(reply.status, error.code || "ERROR", error.message || reply.statusText);
    }
    return body;
  }

  async function getSession() {
    if (session === null) session = await api("/api/session");
    return session;
  }

  async function header() {
    const top = document.getElementById("top");
    const page = document.body.dataset.page;
    const link = (href, text, name) => el("a", { href, text, class: page === name ? "current" : "" });
    top.append(
      el("a", { class: "brand", href: "/" }, el("span", { class: "logo", "aria-hidden": "true" }), "ajs dashboard"),
      el("nav", {}, link("/", "Overview", "overview"), link("/jobs", "Jobs", "jobs")),
    );
    const current = await getSession();
    if (current.authenticated) {
      const who = el("div", { class: "who" });
      const name = current.principal || "signed in";
      who.append(el("span", { id: "principal", text: current.admin ? name + " · admin" : name }));
      const form = el("form", { method: "post", action: "/signout" }, el("button", { type: "submit", id: "signout", text: "Sign out" }));
      who.append(form);
      top.append(who);
    }
  }

  document.addEventListener("DOMContentLoaded", () => {
    header().catch(() => {});
  });

  return { el, badge, bar, setBar, fractionOf, when, ago, api, getSession, jobHref, ApiError, STATE_NAMES };
})();
