/* batcher report: the gallery, filters, detail view and (on `batcher review`) the marks.
 *
 * Every piece of data (prompt, id, note, message) reaches the page through textContent or a
 * setAttribute of our own URL, never as HTML. The same file runs from file:// (a static
 * report) and from the review server (http://127.0.0.1, with ?token=... in the address).
 */
"use strict";

window.BATCHER = (function () {
  const PAGE = 120;            // tiles in the page at once
  const POLL_MS = 2000;        // live updates on the review server
  const STATES = ["pending", "running", "generated", "done", "failed", "withdrawn"];
  const jobs = [];             // every job, manifest order
  const byId = new Map();
  let summary = null;
  let view = [];               // the jobs the filters let through
  let page = 0;
  let selected = -1;           // index in view of the selected tile
  let openAt = -1;             // index in view of the job in the detail view, -1: closed
  const params = new URLSearchParams(location.search);
  const token = params.get("token");
  const review = location.protocol.startsWith("http") && !!token;
  let since = null;

  const $ = (id) => document.getElementById(id);
  function el(tag, attrs, text) {
    const node = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) {
      if (v !== null && v !== undefined) node.setAttribute(k, v);
    }
    if (text !== undefined && text !== null) node.textContent = String(text);
    return node;
  }
  function option(select, value, label) {
    select.appendChild(el("option", { value: value }, label));
  }

  function add(list) {
    for (const job of list) {
      if (!byId.has(job.id)) jobs.push(job);
      byId.set(job.id, job);
    }
  }
  function merge(list) {
    for (const job of list) {
      if (byId.has(job.id)) {
        const at = jobs.findIndex((j) => j.id === job.id);
        if (at >= 0) jobs[at] = job;
      } else {
        jobs.push(job);
      }
      byId.set(job.id, job);
    }
  }
  function setSummary(s) { summary = s; }

  // ----------------------------------------------------------------------- filters
  function count(key) {
    const out = new Map();
    for (const j of jobs) {
      const v = j[key] === null || j[key] === undefined ? "" : String(j[key]);
      out.set(v, (out.get(v) || 0) + 1);
    }
    return out;
  }
  function fillSelect(id, pairs, keep) {
    const select = $(id);
    const before = keep ? select.value : null;
    select.textContent = "";
    for (const [value, label] of pairs) option(select, value, label);
    if (before !== null && [...select.options].some((o) => o.value === before)) {
      select.value = before;
    }
  }
  function fillFilters(keep) {
    const states = count("state");
    fillSelect("f-state", [["*", `all (${jobs.length})`],
      ...STATES.filter((s) => states.get(s)).map((s) => [s, `${s} (${states.get(s)})`])], keep);
    if (!keep) $("f-state").value = states.get("done") ? "done" : "*";
    const folders = [...count("folder").entries()].sort();
    fillSelect("f-folder", [["*", "all"], ...folders.map(([f, n]) =>
      [f, `${f === "" ? "(top level)" : f} (${n})`])], keep);
    const models = [...count("model").entries()].sort();
    fillSelect("f-model", [["*", "all"], ...models.map(([m, n]) => [m, `${m} (${n})`])], keep);
    const codes = new Map();
    for (const j of jobs) {
      if (j.state === "failed") {
        const c = j.error_code || "unknown";
        codes.set(c, (codes.get(c) || 0) + 1);
      }
    }
    fillSelect("f-code", [["*", "any"], ...[...codes.entries()].sort().map(([c, n]) =>
      [c, `${c} (${n})`])], keep);
    const marks = count("review");
    fillSelect("f-review", [["*", "any"],
      ["approved", `approved (${marks.get("approved") || 0})`],
      ["rejected", `rejected (${marks.get("rejected") || 0})`],
      ["", `not reviewed (${marks.get("") || 0})`]], keep);
  }
  function applyFilters() {
    const state = $("f-state").value, folder = $("f-folder").value, model = $("f-model").value;
    const code = $("f-code").value, mark = $("f-review").value;
    const words = $("f-search").value.trim().toLowerCase().split(/\s+/).filter(Boolean);
    view = jobs.filter((j) => {
      if (state !== "*" && j.state !== state) return false;
      if (folder !== "*" && j.folder !== folder) return false;
      if (model !== "*" && j.model !== model) return false;
      if (code !== "*" && (j.state !== "failed" || (j.error_code || "unknown") !== code)) return false;
      if (mark !== "*" && (j.review || "") !== mark) return false;
      if (words.length) {
        const hay = `${j.id}\n${j.prompt}\n${j.actual_prompt || ""}`.toLowerCase();
        for (const w of words) if (!hay.includes(w)) return false;
      }
      return true;
    });
  }

  // -------------------------------------------------------------------------- grid
  function thumbImage(job, cls) {
    const img = el("img", { alt: "", loading: "lazy", decoding: "async", class: cls || null });
    img.addEventListener("error", () => {       // thumbnail not made yet: the image itself
      if (job.image && img.getAttribute("src") !== job.image) img.setAttribute("src", job.image);
    }, { once: true });
    img.setAttribute("src", job.thumb || job.image);
    return img;
  }
  function tile(job, index) {
    const node = el("div", { class: `tile ${job.review || ""}`, role: "listitem", tabindex: "0",
      "data-id": job.id, "data-index": String(index), title: job.prompt });
    const box = el("div", { class: "thumb" });
    if (job.image) box.appendChild(thumbImage(job));
    else box.appendChild(el("div", { class: "noimg" },
      job.state === "failed" ? `failed: ${job.error_code || "unknown"}` : job.state));
    if (job.images && job.images.length > 1) {    // a job of several images: the first, and a count
      box.appendChild(el("span", { class: "count", title: `${job.images.length} images` },
        `×${job.images.length}`));
    }
    node.appendChild(box);
    const cap = el("div", { class: "cap" });
    const id = el("div", { class: "id" });
    if (job.review) id.appendChild(el("span", { class: `badge ${job.review}` }, job.review));
    if (job.state !== "done") id.appendChild(el("span", { class: `badge ${job.state}` }, job.state));
    id.appendChild(document.createTextNode(job.id));
    cap.appendChild(id);
    cap.appendChild(el("div", { class: "prompt" }, job.prompt));
    node.appendChild(cap);
    node.addEventListener("click", () => openDetail(index));
    return node;
  }
  function pager(nav) {
    nav.textContent = "";
    const pages = Math.max(1, Math.ceil(view.length / PAGE));
    const prev = el("button", { type: "button", class: "page-prev" }, "← Previous page");
    prev.disabled = page === 0;
    prev.addEventListener("click", () => goPage(page - 1));
    const next = el("button", { type: "button", class: "page-next" }, "Next page →");
    next.disabled = page >= pages - 1;
    next.addEventListener("click", () => goPage(page + 1));
    const from = view.length ? page * PAGE + 1 : 0;
    const to = Math.min(view.length, (page + 1) * PAGE);
    nav.appendChild(prev);
    nav.appendChild(el("span", { class: "showing" },
      `${from.toLocaleString()}–${to.toLocaleString()} of ${view.length.toLocaleString()}` +
      ` (page ${page + 1} of ${pages})`));
    nav.appendChild(next);
  }
  function goPage(n) {
    const pages = Math.max(1, Math.ceil(view.length / PAGE));
    page = Math.max(0, Math.min(pages - 1, n));
    renderGrid();
  }
  function renderGrid() {
    const grid = $("grid");
    grid.textContent = "";
    const frag = document.createDocumentFragment();
    const end = Math.min(view.length, (page + 1) * PAGE);
    for (let i = page * PAGE; i < end; i++) frag.appendChild(tile(view[i], i));
    grid.appendChild(frag);
    if (!view.length) grid.appendChild(el("p", { class: "muted", id: "empty" }, "No job matches."));
    pager($("pager-top"));
    pager($("pager-bottom"));
    markSelected();
  }
  function markSelected() {
    for (const t of document.querySelectorAll(".tile.selected")) t.classList.remove("selected");
    const t = document.querySelector(`.tile[data-index="${selected}"]`);
    if (t) t.classList.add("selected");
  }
  function select(i) {
    if (!view.length) return;
    selected = Math.max(0, Math.min(view.length - 1, i));
    const want = Math.floor(selected / PAGE);
    if (want !== page) { page = want; renderGrid(); } else markSelected();
    const t = document.querySelector(`.tile[data-index="${selected}"]`);
    if (t) t.scrollIntoView({ block: "nearest" });
  }
  function refresh(keepPlace) {
    const current = keepPlace && openAt >= 0 ? view[openAt] : null;
    applyFilters();
    if (!keepPlace) { page = 0; selected = -1; }
    page = Math.min(page, Math.max(0, Math.ceil(view.length / PAGE) - 1));
    renderGrid();
    renderCounts();
    if (current) {
      const at = view.findIndex((j) => j.id === current.id);
      if (at >= 0) { openAt = at; renderDetail(); }
    }
  }

  // ------------------------------------------------------------------------ counts
  function renderCounts() {
    const states = count("state");
    const table = $("state-counts");
    table.textContent = "";
    const rows = [["total", jobs.length], ...STATES.map((s) => [s, states.get(s) || 0])];
    for (const [label, n] of rows) {
      const tr = el("tr", { "data-state": label });
      tr.appendChild(el("th", {}, label));
      tr.appendChild(el("td", {}, n.toLocaleString()));
      table.appendChild(tr);
    }
    const marks = count("review");
    const rt = $("review-counts");
    rt.textContent = "";
    for (const label of ["approved", "rejected"]) {
      const tr = el("tr", { "data-review": label });
      tr.appendChild(el("th", {}, label));
      tr.appendChild(el("td", {}, (marks.get(label) || 0).toLocaleString()));
      rt.appendChild(tr);
    }
    const tr = el("tr", { "data-review": "open" });
    tr.appendChild(el("th", {}, "done, not reviewed"));
    tr.appendChild(el("td", {}, jobs.filter((j) => j.state === "done" && !j.review).length
      .toLocaleString()));
    rt.appendChild(tr);
  }

  // ------------------------------------------------------------------------ detail
  const FIELDS = [
    ["id", "id"], ["state", "state"], ["prompt", "prompt"], ["actual_prompt", "actual prompt"],
    ["seed", "seed"], ["size", "size"], ["width", "width"], ["height", "height"],
    ["model", "model"], ["prompt_extend", "prompt extend"], ["n", "images asked (n)"],
    ["shortfall", "images missing"], ["file", "file"],
    ["request_id", "request_id"], ["cost", "cost (every image billed)"], ["currency", "currency"],
    ["latency_ms", "latency (ms)"], ["attempts", "attempts"],
    ["download_attempts", "download attempts"], ["sha256", "sha256"], ["bytes", "bytes"],
    ["error_code", "error code"], ["error_message", "error message"], ["billed", "billed"],
    ["throttled", "throttled"], ["ambiguous", "ambiguous"], ["regenerated", "regenerated"],
    ["review", "review"], ["review_note", "note"], ["reviewed_at", "reviewed"],
    ["manifest_seed", "manifest seed"], ["manifest_prompt", "manifest prompt"],
    ["vars", "variables"], ["endpoint", "endpoint"], ["created_at", "created"],
    ["started_at", "started"], ["generated_at", "generated"], ["finished_at", "finished"],
  ];
  const TIMES = new Set(["created_at", "started_at", "generated_at", "finished_at", "reviewed_at"]);
  function shown(key, v) {
    if (v === null || v === undefined || v === "") return null;
    if (TIMES.has(key)) return new Date(v * 1000).toISOString().replace("T", " ").slice(0, 19) + " UTC";
    if (key === "latency_ms") return Number(v).toFixed(0);
    if (typeof v === "object") return JSON.stringify(v);
    return String(v);
  }
  function openDetail(i) {
    if (i < 0 || i >= view.length) return;
    openAt = i;
    selected = i;
    $("detail").hidden = false;
    renderDetail();
    history.replaceState(null, "", `#job=${encodeURIComponent(view[i].id)}`);
  }
  function closeDetail() {
    openAt = -1;
    $("detail").hidden = true;
    history.replaceState(null, "", location.pathname + location.search);
    select(selected);
  }
  function renderDetail() {
    const job = view[openAt];
    if (!job) return closeDetail();
    $("d-title").textContent = job.id;
    $("d-pos").textContent = `${openAt + 1} of ${view.length}`;
    const badge = $("d-mark");
    badge.textContent = job.review || (job.state === "done" ? "not reviewed" : job.state);
    badge.className = `badge ${job.review || ""}`;
    const img = $("d-img");
    const note = $("d-img-note");
    note.textContent = "";
    img.removeAttribute("src");
    img.onerror = () => {
      if (job.thumb && img.getAttribute("src") !== job.thumb) {
        img.setAttribute("src", job.thumb);
        note.textContent = "The full image is not beside this report; showing its thumbnail.";
      }
    };
    if (job.image) img.setAttribute("src", job.image);
    else note.textContent = job.state === "failed"
      ? `No image: failed with ${job.error_code || "an unknown error"}` : `No image yet (${job.state}).`;
    img.setAttribute("alt", job.prompt);
    const table = $("d-fields");
    table.textContent = "";
    for (const [key, label] of FIELDS) {
      const text = shown(key, job[key]);
      if (text === null) continue;
      const tr = el("tr", { "data-field": key });
      tr.appendChild(el("th", {}, label));
      tr.appendChild(el("td", {}, text));
      table.appendChild(tr);
    }
    const all = $("d-images");
    all.textContent = "";
    all.hidden = !(job.images && job.images.length > 1);
    for (const image of job.images || []) {
      const a = el("a", { href: image.image, target: "_blank", rel: "noopener",
        title: image.file, "data-index": String(image.index) });
      const ii = el("img", { alt: `image ${image.index}`, loading: "lazy" });
      ii.addEventListener("error", () => {
        if (ii.getAttribute("src") !== image.image) ii.setAttribute("src", image.image);
      }, { once: true });
      ii.setAttribute("src", image.thumb);
      a.appendChild(ii);
      a.appendChild(el("span", {}, `${image.index}`));
      a.addEventListener("click", (e) => {   // show it large in place of the first
        e.preventDefault();
        img.setAttribute("src", image.image);
      });
      all.appendChild(a);
    }
    const box = $("d-history");
    box.textContent = "";
    const versions = (job.history || []).slice().reverse();
    if (!versions.length) box.appendChild(el("p", { class: "muted" }, "None."));
    for (const v of versions) {
      const row = el("div", { class: "version", "data-reason": v.reason || "" });
      if (v.thumb || v.image) {
        const a = el("a", { href: v.image || v.thumb, target: "_blank", rel: "noopener" });
        const vi = el("img", { alt: "", loading: "lazy" });
        vi.addEventListener("error", () => {
          if (v.image && vi.getAttribute("src") !== v.image) vi.setAttribute("src", v.image);
        }, { once: true });
        vi.setAttribute("src", v.thumb || v.image);
        a.appendChild(vi);
        row.appendChild(a);
      }
      const what = el("div", { class: "what" });
      const when = v.at ? new Date(v.at * 1000).toISOString().replace("T", " ").slice(0, 19) : "";
      what.appendChild(el("div", {}, `${v.reason || "earlier"} · ${when} UTC · was ${v.state}`));
      for (const [k, label] of [["seed", "seed"], ["prompt", "prompt"], ["request_id", "request_id"],
        ["error_code", "error"], ["error_message", "message"], ["review", "review"],
        ["review_note", "note"], ["file", "kept as"], ["sha256", "sha256"]]) {
        if (v[k] !== null && v[k] !== undefined && v[k] !== "") {
          what.appendChild(el("div", { "data-field": k }, `${label}: ${v[k]}`));
        }
      }
      row.appendChild(what);
      box.appendChild(row);
    }
    if (review) {
      const ta = $("d-note");
      if (document.activeElement !== ta) ta.value = job.review_note || "";
      $("d-approve").disabled = job.state !== "done";
      $("d-reject").disabled = job.state !== "done";
    }
  }
  function step(d) {
    if (openAt >= 0) {
      const next = openAt + d;
      if (next >= 0 && next < view.length) openDetail(next);
    } else {
      select(selected < 0 ? 0 : selected + d);
    }
  }

  // ------------------------------------------------------------------------ review
  async function post(path, body) {
    const res = await fetch(path, {
      method: "POST",
      headers: { "Content-Type": "application/json", "X-Batcher-Token": token },
      body: JSON.stringify(body),
    });
    const data = await res.json().catch(() => ({}));
    if (!res.ok) throw new Error(data.error || `HTTP ${res.status}`);
    return data;
  }
  function status(text) { $("d-status").textContent = text; }
  async function mark(value) {
    if (!review) return;
    const i = openAt >= 0 ? openAt : selected;
    const job = view[i];
    if (!job || job.state !== "done") return;
    try {
      const data = await post("api/review", { id: job.id, review: value });
      merge([data.job]);
      status(value ? `${job.id}: ${value}` : `${job.id}: mark removed`);
      fillFilters(true);
      refreshKeeping(job.id, value !== null);
    } catch (err) {
      status(`not saved: ${err.message}`);
    }
  }
  function refreshKeeping(id, advance) {
    // keep the job in place (the filter may drop it now), then step on if asked
    const at = view.findIndex((j) => j.id === id);
    if (at >= 0) view[at] = byId.get(id);
    renderCounts();
    renderGrid();
    if (openAt >= 0) {
      if (advance && openAt + 1 < view.length) openDetail(openAt + 1); else renderDetail();
    } else if (advance) {
      select(selected + 1);
    }
  }
  async function saveNote() {
    const job = view[openAt];
    if (!job) return;
    try {
      const data = await post("api/note", { id: job.id, note: $("d-note").value });
      merge([data.job]);
      status(`${job.id}: note saved`);
      refreshKeeping(job.id, false);
    } catch (err) {
      status(`not saved: ${err.message}`);
    }
  }
  async function poll() {
    try {
      const q = since === null ? "" : `?since=${encodeURIComponent(since)}`;
      const res = await fetch(`api/changes${q}`);
      if (res.ok) {
        const data = await res.json();
        since = data.since;
        if (data.jobs.length) {
          merge(data.jobs);
          fillFilters(true);
          refresh(true);
        }
        $("mode").textContent = `review server · live · ${data.jobs.length ? "updated" : "checked"} ` +
          new Date().toLocaleTimeString();
      }
    } catch (err) {
      $("mode").textContent = "review server · not reachable";
    }
    setTimeout(poll, POLL_MS);
  }

  // ------------------------------------------------------------------------ keys
  function onKey(e) {
    const typing = ["INPUT", "TEXTAREA", "SELECT"].includes(document.activeElement.tagName);
    if (typing) {
      if (e.key === "Escape") document.activeElement.blur();
      else if (e.key === "Enter" && (e.ctrlKey || e.metaKey) && document.activeElement.id === "d-note") saveNote();
      return;
    }
    if (e.ctrlKey || e.metaKey || e.altKey) return;
    const k = e.key;
    if (k === "ArrowRight" || k === "j") step(1);
    else if (k === "ArrowLeft" || k === "k") step(-1);
    else if (k === "Enter" && openAt < 0 && selected >= 0) openDetail(selected);
    else if (k === "Escape" && openAt >= 0) closeDetail();
    else if (k === "/") $("f-search").focus();
    else if (review && k === "a") mark("approved");
    else if (review && k === "r") mark("rejected");
    else if (review && k === "u") mark(null);
    else if (review && k === "n" && openAt >= 0) $("d-note").focus();
    else return;
    e.preventDefault();
  }

  function start() {
    if (review) {
      document.body.classList.add("review");
      $("mode").textContent = "review server";
    }
    fillFilters(false);
    for (const id of ["f-state", "f-folder", "f-model", "f-code", "f-review"]) {
      $(id).addEventListener("change", () => refresh(false));
    }
    $("f-search").addEventListener("input", () => refresh(false));
    $("filters").addEventListener("submit", (e) => e.preventDefault());
    for (const b of document.querySelectorAll(".code-filter")) {
      b.addEventListener("click", () => {
        $("f-state").value = "failed";
        $("f-code").value = b.getAttribute("data-code");
        refresh(false);
        $("gallery").scrollIntoView();
      });
    }
    $("d-close").addEventListener("click", closeDetail);
    $("d-prev").addEventListener("click", () => step(-1));
    $("d-next").addEventListener("click", () => step(1));
    $("d-approve").addEventListener("click", () => mark("approved"));
    $("d-reject").addEventListener("click", () => mark("rejected"));
    $("d-unmark").addEventListener("click", () => mark(null));
    $("d-note-save").addEventListener("click", saveNote);
    $("detail").addEventListener("click", (e) => { if (e.target === $("detail")) closeDetail(); });
    document.addEventListener("keydown", onKey);
    refresh(false);
    const m = /^#job=(.+)$/.exec(location.hash);
    if (m) {
      const id = decodeURIComponent(m[1]);
      let at = view.findIndex((j) => j.id === id);
      if (at < 0 && byId.has(id)) { $("f-state").value = "*"; refresh(false); at = view.findIndex((j) => j.id === id); }
      if (at >= 0) { page = Math.floor(at / PAGE); renderGrid(); openDetail(at); }
    }
    if (review) poll();
    document.body.setAttribute("data-ready", "1");
  }
  document.addEventListener("DOMContentLoaded", start);
  return { add: add, setSummary: setSummary, jobs: jobs, get view() { return view; } };
})();
