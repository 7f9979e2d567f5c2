// AMS-Build: live panels, the live build page and its log tools, and times in the viewer's
// zone. Text from the server is only ever set with textContent; HTML only ever comes from our
// own server-escaped fragments.
"use strict";

const SGR = { 1: "b", 30: "c0", 31: "c1", 32: "c2", 33: "c3", 34: "c4", 35: "c5", 36: "c6", 37: "c7",
  90: "c0", 91: "c1", 92: "c2", 93: "c3", 94: "c4", 95: "c5", 96: "c6", 97: "c7" };

// ---- Times: one format, the viewer's zone, UTC on hover; or relative. ----

let relativeTimes = false;
const pad = (n) => String(n).padStart(2, "0");

function localText(d) {
  return d.getFullYear() + "-" + pad(d.getMonth() + 1) + "-" + pad(d.getDate()) + " " +
    pad(d.getHours()) + ":" + pad(d.getMinutes()) + ":" + pad(d.getSeconds());
}

function relativeText(d) {
  const s = Math.round((Date.now() - d.getTime()) / 1000);
  const a = Math.abs(s);
  const unit = a < 60 ? [a, "s"] : a < 3600 ? [Math.floor(a / 60), "min"] :
    a < 86400 ? [Math.floor(a / 3600), "h"] : [Math.floor(a / 86400), "d"];
  return s >= 0 ? unit[0] + " " + unit[1] + " ago" : "in " + unit[0] + " " + unit[1];
}

function showTimes(root) {
  for (const t of (root || document).querySelectorAll("time[datetime]")) {
    const d = new Date(t.getAttribute("datetime"));
    if (isNaN(d.getTime())) continue;
    if (!t.dataset.utc) t.dataset.utc = t.textContent;
    t.title = t.dataset.utc + (relativeTimes ? " · " + localText(d) : "");
    t.textContent = relativeTimes ? relativeText(d) : localText(d);
  }
}

function timeToggle() {
  const b = document.getElementById("time-mode");
  if (!b) return;
  b.hidden = false;
  b.addEventListener("click", () => {
    relativeTimes = !relativeTimes;
    b.textContent = relativeTimes ? "Absolute times" : "Relative times";
    showTimes();
  });
}

// ---- ANSI colours and links, as spans and anchors built with textContent. ----

function appendAnsi(el, text, state) {
  const re = /\x1b\[([0-9;]*)([A-Za-z])/g;
  let last = 0, m;
  const put = (s) => {
    if (!s) return;
    if (state.classes.length) {
      const span = document.createElement("span");
      span.className = state.classes.join(" ");
      appendLinked(span, s);
      el.appendChild(span);
    } else {
      appendLinked(el, s);
    }
  };
  while ((m = re.exec(text)) !== null) {
    put(text.slice(last, m.index));
    last = re.lastIndex;
    if (m[2] !== "m") continue;
    for (const code of (m[1] || "0").split(";").map(Number)) {
      if (code === 0) state.classes = [];
      else if (SGR[code]) {
        if (SGR[code] !== "b") state.classes = state.classes.filter((c) => c === "b");
        state.classes.push(SGR[code]);
      }
    }
  }
  put(text.slice(last));
}

// Appends text to `el`, making http(s) URLs links; no other scheme ever becomes a link.
function appendLinked(el, text) {
  const re = /https?:\/\/[^\s<>"'`\x00-\x1f]+/g;
  let last = 0, m;
  while ((m = re.exec(text)) !== null) {
    let url = m[0].replace(/[.,;:!?)\]]+$/, "");
    if (url.indexOf("://") + 3 >= url.length) continue;
    el.appendChild(document.createTextNode(text.slice(last, m.index)));
    const a = document.createElement("a");
    a.href = url;
    a.rel = "noopener noreferrer nofollow";
    a.target = "_blank";
    a.textContent = url;
    el.appendChild(a);
    last = m.index + url.length;
    re.lastIndex = last;
  }
  el.appendChild(document.createTextNode(text.slice(last)));
}

// ---- The log: numbered lines, stages as collapsible sections. ----

const STAGE_START = /^\[amsbuild\] ==> stage (\d+)\/(\d+): (.*)$/;
const STAGE_END = /^\[amsbuild\] <== stage (\d+)\/(\d+): (.*?) exit code (\S+?)[,:].*: ([A-Z]+) in ([0-9.]+) s$/;

function lineLink(n) {
  const a = document.createElement("a");
  a.className = "ln";
  a.href = "#L" + n;
  a.dataset.n = String(n);
  a.setAttribute("aria-label", "line " + n);
  return a;
}

function newLine(n) {
  const line = document.createElement("span");
  line.className = "line";
  line.id = "L" + n;
  line.appendChild(lineLink(n));
  return line;
}

// A line that heads a stage section sits in its <summary>, which may hold no link: its
// number becomes plain text there (the line keeps its id, so #L links still reach it).
function plainNumber(line) {
  const a = line.querySelector("a.ln");
  if (!a) return;
  const span = document.createElement("span");
  span.className = "ln";
  span.dataset.n = a.dataset.n;
  line.replaceChild(span, a);
}

function lineText(line) {
  return line.textContent.replace(/\n$/, "");
}

// Groups a flat run of lines into stage sections. `target` receives them in order.
function groupLines(lines, target) {
  let group = null;
  for (const line of lines) {
    const text = lineText(line);
    if (text.startsWith("[amsbuild] ")) line.classList.add("amsline");
    if (STAGE_START.test(text)) {
      group = document.createElement("details");
      group.className = "stage";
      group.open = true;
      const summary = document.createElement("summary");
      plainNumber(line);
      summary.appendChild(line);
      group.appendChild(summary);
      target.appendChild(group);
      continue;
    }
    (group || target).appendChild(line);
    if (group && STAGE_END.test(text)) group = null;
  }
  return group;
}

const LIVE_MAX = 2 * 1024 * 1024;

const Log = {
  el: null,
  state: { classes: [] },
  open: null,    // the line being written (no newline yet)
  group: null,   // the stage section lines go into
  next: 1,
  size: 0,
  trimmed: false,
  onLine: null,

  init() {
    this.el = document.getElementById("log");
    if (!this.el) return false;
    const lines = Array.from(this.el.querySelectorAll(".line"));
    const first = Number(this.el.dataset.firstLine || "1");
    // The server sends bare numbered lines; the number links are added here.
    for (const line of lines) {
      if (!line.querySelector(".ln")) line.insertBefore(lineLink(Number(line.id.slice(1))), line.firstChild);
    }
    this.next = lines.length ? Number(lines[lines.length - 1].id.slice(1)) + 1 : first;
    const last = lines[lines.length - 1];
    if (last && !last.textContent.endsWith("\n")) { this.open = last; this.next -= 1; }
    this.el.textContent = "";
    this.group = groupLines(lines, this.el);
    this.size = this.el.textContent.length;
    document.getElementById("fold-all").hidden = false;
    return true;
  },

  // Appends streamed text, line by line.
  append(text) {
    let rest = text;
    while (rest.length) {
      const i = rest.indexOf("\n");
      const piece = i < 0 ? rest : rest.slice(0, i + 1);
      rest = i < 0 ? "" : rest.slice(i + 1);
      if (!this.open) {
        this.open = newLine(this.next);
        (this.group || this.el).appendChild(this.open);
      }
      appendAnsi(this.open, piece, this.state);
      if (piece.endsWith("\n")) this.finish();
    }
    this.size += text.length;
    this.trim();
  },

  // A line is complete: it may open or close a stage section.
  finish() {
    const line = this.open;
    this.open = null;
    this.next += 1;
    const text = lineText(line);
    if (text.startsWith("[amsbuild] ")) line.classList.add("amsline");
    if (STAGE_START.test(text)) {
      const g = document.createElement("details");
      g.className = "stage";
      g.open = true;
      const s = document.createElement("summary");
      line.parentNode.removeChild(line);
      plainNumber(line);
      s.appendChild(line);
      g.appendChild(s);
      this.el.appendChild(g);
      this.group = g;
    } else if (this.group && STAGE_END.test(text)) {
      this.group = null;
    }
    if (this.onLine) this.onLine(text);
  },

  // A build that prints without end must not grow the page without end: past LIVE_MAX
  // characters the oldest lines leave the page (the whole log stays a download).
  trim() {
    while (this.size > LIVE_MAX) {
      const first = this.el.querySelector(".line");
      if (!first || first === this.open) break;
      this.size -= first.textContent.length;
      const parent = first.parentNode;
      parent.removeChild(first);
      if (parent.tagName === "SUMMARY") {
        // The stage's first line left: its section unfolds into plain lines.
        const details = parent.parentNode;
        while (details.lastChild && details.lastChild !== parent) {
          details.parentNode.insertBefore(details.lastChild, details.nextSibling);
        }
        if (this.group === details) this.group = null;
        details.remove();
      }
      if (!this.trimmed) {
        this.trimmed = true;
        const more = document.getElementById("load-more");
        if (more) more.remove();
        const ns = document.getElementById("not-shown");
        if (ns) ns.remove();
        const note = document.getElementById("trimmed");
        if (note) note.hidden = false;
      }
    }
  },

  // Earlier lines, numbered from `first`, go on top.
  prepend(text, first) {
    const frag = document.createDocumentFragment();
    const state = { classes: [] };
    const lines = [];
    let n = first;
    let rest = text;
    while (rest.length) {
      const i = rest.indexOf("\n");
      const piece = i < 0 ? rest : rest.slice(0, i + 1);
      rest = i < 0 ? "" : rest.slice(i + 1);
      const line = newLine(n++);
      appendAnsi(line, piece, state);
      lines.push(line);
    }
    // Regroup from the start: a stage may begin in the new part and end in the old one.
    const old = Array.from(this.el.querySelectorAll(".line"));
    const all = lines.concat(old);
    const openGroup = this.group !== null;
    this.el.textContent = "";
    groupLines(all, frag);
    this.el.appendChild(frag);
    this.size = this.el.textContent.length;
    if (openGroup) {
      const last = this.el.lastElementChild;
      this.group = last && last.tagName === "DETAILS" ? last : null;
    }
  },
};

// "Load earlier lines": fetches the part of the log before what is shown and puts it on top.
function loadMore() {
  const btn = document.getElementById("load-more");
  if (!btn || !Log.el) return;
  btn.addEventListener("click", () => {
    btn.disabled = true;
    const url = btn.dataset.src + "?before=" + encodeURIComponent(btn.dataset.before);
    fetch(url, { credentials: "same-origin" })
      .then((r) => (r.ok ? r.text().then((t) => [t, r.headers.get("x-log-start"), r.headers.get("x-log-first-line")]) : null))
      .then((res) => {
        if (!res) { btn.disabled = false; return; }
        const [text, start, firstLine] = res;
        Log.prepend(text, Number(firstLine || "1"));
        btn.dataset.before = start;
        if (start === "0") {
          btn.remove();
          const ns = document.getElementById("not-shown");
          if (ns) ns.remove();
        } else btn.disabled = false;
      })
      .catch(() => { btn.disabled = false; });
  });
}

// ---- Log tools: search, first error, folding, line links. ----

function openTo(el) {
  for (let p = el.parentElement; p; p = p.parentElement) if (p.tagName === "DETAILS") p.open = true;
}

function logTools() {
  const box = document.getElementById("log-search-box");
  const input = document.getElementById("log-search");
  const hits = document.getElementById("log-hits");
  if (box && input) {
    box.hidden = false;
    let found = [], at = -1, timer = null;
    const mark = () => {
      for (const l of Log.el.querySelectorAll(".line.hit")) l.classList.remove("hit");
      const q = input.value.toLowerCase();
      found = q.length < 2 ? [] :
        Array.from(Log.el.querySelectorAll(".line")).filter((l) => l.textContent.toLowerCase().includes(q));
      for (const l of found) l.classList.add("hit");
      at = -1;
      hits.textContent = q.length < 2 ? "" : found.length + " matching line" + (found.length === 1 ? "" : "s");
    };
    input.addEventListener("input", () => { clearTimeout(timer); timer = setTimeout(mark, 150); });
    input.addEventListener("keydown", (e) => {
      if (e.key !== "Enter" || !found.length) return;
      e.preventDefault();
      at = (at + (e.shiftKey ? found.length - 1 : 1)) % found.length;
      openTo(found[at]);
      found[at].scrollIntoView({ block: "center" });
      hits.textContent = (at + 1) + " of " + found.length;
    });
  }
  const fold = document.getElementById("fold-all");
  if (fold) {
    fold.addEventListener("click", () => {
      const sections = Log.el.querySelectorAll("details.stage");
      const open = fold.dataset.folded === "1";
      for (const d of sections) d.open = open;
      fold.dataset.folded = open ? "0" : "1";
      fold.textContent = open ? "Collapse stages" : "Expand stages";
    });
  }
  firstErrorButton();
  const m = /^#L(\d+)$/.exec(location.hash);
  if (m) {
    const line = document.getElementById("L" + m[1]);
    if (line) { openTo(line); line.scrollIntoView({ block: "center" }); }
  }
}

const ERROR_WORDS = /\b(error|errors|failed|failure|fatal|panicked|exception|traceback)\b/i;

function firstErrorButton() {
  const btn = document.getElementById("first-error");
  const status = document.getElementById("status");
  if (!btn || !status || !["fail", "error", "warn"].includes(status.dataset.status)) return;
  const lines = Array.from(Log.el.querySelectorAll(".line"));
  // The commands' own output: not our lines, not the trace of a command ("+ cmd").
  const output = (l) => !l.classList.contains("amsline") && !lineText(l).startsWith("+ ");
  const target = lines.find((l) => output(l) && ERROR_WORDS.test(l.textContent)) ||
    lines.find((l) => l.classList.contains("amsline") && /: (FAIL|ERROR)\b/.test(l.textContent));
  if (!target) return;
  btn.hidden = false;
  btn.onclick = () => {
    for (const l of Log.el.querySelectorAll(".first-error")) l.classList.remove("first-error");
    target.classList.add("first-error");
    openTo(target);
    target.scrollIntoView({ block: "center" });
    history.replaceState(null, "", "#" + target.id);
  };
}

// ---- The live build page. ----

const WORDS = { pass: "PASS", fail: "FAIL", warn: "WARN", error: "ERROR", cancel: "CANCEL", skip: "SKIP",
  dummy: "DUMMY", running: "RUNNING", pending: "PENDING" };
const ICONS = { pass: "pass", dummy: "pass", fail: "fail", error: "error", warn: "warn", running: "running",
  pending: "running", cancel: "cancel", skip: "cancel" };

function setStatus(s) {
  const el = document.getElementById("status");
  if (!el) return;
  el.dataset.status = s;
  el.className = "status s-" + s;
  el.textContent = "";
  const icon = document.createElement("span");
  icon.className = "icon";
  icon.setAttribute("aria-hidden", "true");
  el.appendChild(icon);
  el.appendChild(document.createTextNode(WORDS[s] || s.toUpperCase()));
  const base = document.title.replace(/^\[[A-Z]+\] /, "");
  document.title = "[" + (WORDS[s] || s.toUpperCase()) + "] " + base;
  const fav = document.getElementById("favicon");
  if (fav) fav.href = fav.href.replace(/[a-z]+\.svg$/, (ICONS[s] || "app") + ".svg");
}

function refreshLive(then) {
  const live = document.getElementById("live");
  if (!live || !live.dataset.src) return;
  fetch(live.dataset.src, { credentials: "same-origin" })
    .then((r) => (r.ok ? r.text() : null))
    .then((html) => {
      if (html !== null) { live.innerHTML = html; showTimes(live); } // server-escaped fragment
      if (then) then();
    })
    .catch(() => {});
}

// Live stage rows from the log's stage lines until the build's record says the rest.
const Stages = {
  running: null,
  timer: null,
  row(name) {
    const body = document.getElementById("stage-rows");
    if (!body) return null;
    const none = document.getElementById("no-stages");
    if (none) none.remove();
    const tr = document.createElement("tr");
    const cells = [name, "", "-", localText(new Date()), "0 s"].map((t) => {
      const td = document.createElement("td");
      td.textContent = t;
      tr.appendChild(td);
      return td;
    });
    cells[2].className = "num";
    cells[3].className = "hide-narrow";
    cells[4].className = "num";
    body.appendChild(tr);
    return { tr, cells, started: Date.now() };
  },
  badge(td, s) {
    td.textContent = "";
    const b = document.createElement("span");
    b.className = "status s-" + s;
    const i = document.createElement("span");
    i.className = "icon";
    i.setAttribute("aria-hidden", "true");
    b.appendChild(i);
    b.appendChild(document.createTextNode(WORDS[s] || s.toUpperCase()));
    td.appendChild(b);
  },
  line(text) {
    let m = STAGE_START.exec(text);
    if (m) {
      this.stop();
      const r = this.row(m[3]);
      if (!r) return;
      this.badge(r.cells[1], "running");
      this.running = r;
      this.timer = setInterval(() => {
        r.cells[4].textContent = Math.round((Date.now() - r.started) / 1000) + " s";
      }, 1000);
      return;
    }
    m = STAGE_END.exec(text);
    if (m && this.running) {
      const r = this.running;
      this.stop();
      this.badge(r.cells[1], m[5] === "PASS" ? "pass" : "fail");
      r.cells[2].textContent = m[4];
      r.cells[4].textContent = Number(m[6]).toFixed(2) + " s";
    }
  },
  stop() {
    if (this.timer) clearInterval(this.timer);
    this.timer = null;
    this.running = null;
  },
};

function liveBuild() {
  if (!Log.el || !Log.el.dataset.stream || !window.EventSource) return;
  const follow = document.getElementById("follow");
  Log.onLine = (text) => Stages.line(text);
  const es = new EventSource(Log.el.dataset.stream);
  es.addEventListener("log", (e) => {
    const st = document.getElementById("status");
    if (st && st.dataset.status === "pending") setStatus("running");
    Log.append(e.data);
    if (!follow || follow.checked) window.scrollTo(0, document.body.scrollHeight);
  });
  es.addEventListener("end", (e) => {
    es.close();
    Stages.stop();
    if (e.data) setStatus(e.data);
    // The record decides the rest: buttons, archive link, stages, tests and files.
    refreshLive(firstErrorButton);
  });
}

function livePanels() {
  const panels = document.getElementById("panels");
  if (!panels || !window.EventSource) return;
  let pending = null;
  const refresh = () => {
    fetch(panels.dataset.src, { credentials: "same-origin" })
      .then((r) => (r.ok ? r.text() : null))
      .then((html) => { if (html !== null) { panels.innerHTML = html; showTimes(panels); } }) // server-escaped fragment
      .catch(() => {});
  };
  const es = new EventSource(panels.dataset.events);
  es.addEventListener("change", () => {
    if (pending) return;
    pending = setTimeout(() => { pending = null; refresh(); }, 150);
  });
}

document.addEventListener("DOMContentLoaded", () => {
  showTimes();
  timeToggle();
  livePanels();
  if (Log.init()) {
    loadMore();
    logTools();
    liveBuild();
  }
  const st = document.getElementById("status");
  if (st && st.dataset.status) setStatus(st.dataset.status);
});
