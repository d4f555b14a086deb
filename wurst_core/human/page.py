"""The rater page: one self-contained HTML document (no external scripts, styles or fonts).

The rater enters a name (or none) once; the server keeps their id in a cookie, so that closing the tab and coming
back resumes where they stopped. Each pair shows the prompt and two images side by side; the rater chooses with the
buttons or the keys ← (left), → (right) and ↓ or N (neither). The page only ever learns opaque ids and image URLs.
"""
from __future__ import annotations

import html

PAGE = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>__TITLE__</title>
<style>
  body { font-family: system-ui, sans-serif; margin: 0; background: #f4f4f2; color: #222; }
  header { background: #2d3a4a; color: #fff; padding: 10px 20px; display: flex; justify-content: space-between; }
  main { max-width: 900px; margin: 20px auto; padding: 0 16px; text-align: center; }
  .prompt { font-size: 1.25em; margin: 12px 0 18px; min-height: 2.6em; }
  .pair { display: flex; gap: 24px; justify-content: center; }
  .pair figure { margin: 0; }
  .pair img { width: 320px; height: 320px; border: 3px solid #ccc; background: #fff; image-rendering: auto; }
  .choices { margin-top: 18px; display: flex; gap: 12px; justify-content: center; }
  button { font-size: 1.05em; padding: 10px 22px; border-radius: 6px; border: 1px solid #777; cursor: pointer;
           background: #fff; }
  button:disabled { opacity: 0.5; cursor: default; }
  .hint { color: #666; font-size: 0.9em; margin-top: 10px; }
  .hidden { display: none; }
  #error { color: #a00; }
</style>
</head>
<body>
<header><span>__TITLE__</span><span id="progress"></span></header>
<main>
  <section id="start">
    <p>Which image matches the prompt better, and looks better? You will see a prompt and two images.
       Choose the one you prefer, or <em>neither</em> if you cannot decide. You can stop at any time and come back.</p>
    <p><label>Your name (optional) <input id="name" maxlength="64" autocomplete="off"></label>
       <button id="begin">Start rating</button></p>
  </section>
  <section id="rate" class="hidden">
    <div class="prompt" id="prompt"></div>
    <div class="pair">
      <figure><img id="left" alt="left image"></figure>
      <figure><img id="right" alt="right image"></figure>
    </div>
    <div class="choices">
      <button id="choose-left">&larr; Left</button>
      <button id="choose-neither">Neither (&darr; / N)</button>
      <button id="choose-right">Right &rarr;</button>
    </div>
    <div class="hint">Keys: &larr; left, &rarr; right, &darr; or N neither.</div>
  </section>
  <section id="finished" class="hidden"><p>You have rated every pair. Thank you!</p></section>
  <p id="error"></p>
</main>
<script>
"use strict";
let showing = null, busy = false;
const $ = (id) => document.getElementById(id);
function show(section) {
  for (const s of ["start", "rate", "finished"]) $(s).classList.toggle("hidden", s !== section);
}
function setProgress(done, total) { $("progress").textContent = `${done} of ${total} rated`; }
async function call(method, url, body) {
  const r = await fetch(url, {method, credentials: "same-origin",
    headers: body ? {"Content-Type": "application/json"} : {}, body: body ? JSON.stringify(body) : undefined});
  const data = await r.json().catch(() => ({}));
  if (!r.ok) throw Object.assign(new Error(data.error || r.statusText), {status: r.status});
  return data;
}
function setBusy(b) {
  busy = b;
  for (const id of ["choose-left", "choose-neither", "choose-right"]) $(id).disabled = b;
}
async function nextPair() {
  setBusy(true);
  try {
    const data = await call("GET", "/api/next");
    setProgress(data.done, data.total);
    if (data.finished) { showing = null; show("finished"); return; }
    showing = data.showing;
    $("prompt").textContent = data.prompt;
    const loaded = Promise.all(["left", "right"].map((side) => new Promise((ok) => {
      $(side).onload = ok; $(side).onerror = ok; $(side).src = data[side];
    })));
    show("rate");
    await loaded;
    document.body.dataset.showing = showing;
  } catch (e) {
    if (e.status === 401) { show("start"); } else { $("error").textContent = e.message; }
  } finally { setBusy(false); }
}
async function vote(choice) {
  if (busy || !showing) return;
  setBusy(true);
  try {
    const data = await call("POST", "/api/vote", {showing, choice});
    setProgress(data.done, data.total);
    $("error").textContent = "";
  } catch (e) { $("error").textContent = e.message; }
  setBusy(false);
  await nextPair();
}
$("begin").onclick = async () => {
  try { await call("POST", "/api/raters", {name: $("name").value}); await nextPair(); }
  catch (e) { $("error").textContent = e.message; }
};
$("choose-left").onclick = () => vote("left");
$("choose-right").onclick = () => vote("right");
$("choose-neither").onclick = () => vote("neither");
document.addEventListener("keydown", (ev) => {
  if ($("rate").classList.contains("hidden") || ev.target.tagName === "INPUT") return;
  const choice = {ArrowLeft: "left", ArrowRight: "right", ArrowDown: "neither", n: "neither", N: "neither"}[ev.key];
  if (choice) { ev.preventDefault(); vote(choice); }
});
call("GET", "/api/me").then(nextPair).catch(() => show("start"));
</script>
</body>
</html>
"""


def page(title: str = "Which image do you prefer?") -> str:
    return PAGE.replace("__TITLE__", html.escape(title))
