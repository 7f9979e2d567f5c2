// AMS-Build: live panels and live logs. Text from the server is only ever set with textContent.
"use strict";

const SGR = { 1: "b", 30: "c0", 31: "c1", 32: "c2", 33: "c3", 34: "c4", 35: "c5", 36: "c6", 37: "c7",
  90: "c0", 91: "c1", 92: "c2", 93: "c3", 94: "c4", 95: "c5", 96: "c6", 97: "c7" };

// Appends text with ANSI colour codes to `el` as spans; other escape sequences are dropped.
function appendAnsi(el, text, state) {
  const re = /\x1b\[([0-9;]*)([A-Za-z])/g;
  let last = 0, m;
  const put = (s) => {
    if (!s) return;
    const span = document.createElement("span");
    if (state.classes.length) span.className = state.classes.join(" ");
    appendLinked(span, s);
    el.appendChild(span);
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

// "Load earlier lines": fetches the part of the log before what is shown and puts it on top.
function loadMore() {
  const btn = document.getElementById("load-more");
  const log = document.getElementById("log");
  if (!btn || !log) return;
  btn.addEventListener("click", () => {
    btn.disabled = true;
    const url = btn.dataset.src + "?before=" + encodeURIComponent(btn.dataset.before);
    fetch(url, { credentials: "same-origin" })
      .then((r) => (r.ok ? r.text().then((t) => [t, r.headers.get("x-log-start")]) : null))
      .then((res) => {
        if (!res) { btn.disabled = false; return; }
        const [text, start] = res;
        const frag = document.createElement("span");
        appendAnsi(frag, text, { classes: [] });
        log.insertBefore(frag, log.firstChild);
        btn.dataset.before = start;
        if (start === "0") btn.remove(); else btn.disabled = false;
      })
      .catch(() => { btn.disabled = false; });
  });
}

function livePanels() {
  const panels = document.getElementById("panels");
  if (!panels || !window.EventSource) return;
  let pending = null;
  const refresh = () => {
    fetch(panels.dataset.src, { credentials: "same-origin" })
      .then((r) => (r.ok ? r.text() : null))
      .then((html) => { if (html !== null) panels.innerHTML = html; }) // server-escaped fragment
      .catch(() => {});
  };
  const es = new EventSource(panels.dataset.events);
  es.addEventListener("change", () => {
    if (pending) return;
    pending = setTimeout(() => { pending = null; refresh(); }, 150);
  });
}

const LIVE_MAX = 2 * 1024 * 1024;

function liveLog() {
  const log = document.getElementById("log");
  if (!log || !log.dataset.stream || !window.EventSource) return;
  const state = { classes: [] };
  const status = document.getElementById("status");
  const follow = document.getElementById("follow");
  const es = new EventSource(log.dataset.stream);
  // A build that prints without end must not grow the page without end: past LIVE_MAX
  // characters the oldest lines leave the page (the whole log stays a download).
  let size = log.textContent.length;
  let trimmed = false;
  es.addEventListener("log", (e) => {
    appendAnsi(log, e.data, state);
    size += e.data.length;
    while (size > LIVE_MAX && log.firstChild && log.firstChild !== log.lastChild) {
      size -= log.firstChild.textContent.length;
      log.removeChild(log.firstChild);
      if (!trimmed) {
        trimmed = true;
        const more = document.getElementById("load-more");
        if (more) more.remove();
        const note = document.getElementById("trimmed");
        if (note) note.hidden = false;
      }
    }
    if (!follow || follow.checked) window.scrollTo(0, document.body.scrollHeight);
  });
  es.addEventListener("end", (e) => {
    if (status) {
      status.textContent = e.data.toUpperCase();
      status.className = "status " + e.data;
    }
    es.close();
    const stages = document.getElementById("stages");
    if (stages && stages.dataset.src) {
      fetch(stages.dataset.src, { credentials: "same-origin" })
        .then((r) => (r.ok ? r.text() : null))
        .then((html) => { if (html !== null) stages.innerHTML = html; })
        .catch(() => {});
    }
  });
}

document.addEventListener("DOMContentLoaded", () => { livePanels(); liveLog(); loadMore(); });
