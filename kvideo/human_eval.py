"""Side-by-side human evaluation of two systems' videos, as Kandinsky Video 1.1 was judged.

    app = create_app(Study.from_folders(a_dir, b_dir, prompts_file), "votes.sqlite")
    app.run(port=8000)                      # tools/human_eval.py serve
    win_rates(read_votes("votes.sqlite"))   # tools/human_eval.py report

A pair is one prompt's video from each system (the same file name in both folders). A rater
(a name given once, kept in a cookie) sees the pairs they have not judged, in a random order,
the two videos side by side, looping and in sync, with the sides drawn at random per rater and
pair and recorded; they answer three questions (temporal consistency, text alignment, frame
quality), each left / right / tie. Votes go to SQLite in WAL mode (several raters at once; a
restart loses nothing); a rater can vote on a pair once. Only the two folders' videos are ever
served; a bad request gets a 4xx with a message, never a traceback.
"""

from __future__ import annotations

import json
import math
import random
import sqlite3
import time
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional

from flask import Flask, abort, jsonify, make_response, request, send_from_directory
from werkzeug.exceptions import HTTPException

QUESTIONS = {
    "temporal": "Which video is more temporally consistent (smooth motion, objects that stay themselves)?",
    "alignment": "Which video matches the text better?",
    "quality": "Which video has better frames (sharpness, artefacts)?",
}
ANSWERS = ("left", "right", "tie")
SYSTEMS = ("a", "b")
VIDEO_SUFFIXES = (".mp4", ".webm")
SCHEMA = """
CREATE TABLE IF NOT EXISTS assignments (
    rater TEXT NOT NULL, pair TEXT NOT NULL, left_system TEXT NOT NULL, created REAL NOT NULL,
    PRIMARY KEY (rater, pair));
CREATE TABLE IF NOT EXISTS votes (
    id INTEGER PRIMARY KEY AUTOINCREMENT, rater TEXT NOT NULL, pair TEXT NOT NULL, prompt TEXT NOT NULL,
    left_system TEXT NOT NULL, temporal TEXT NOT NULL, alignment TEXT NOT NULL, quality TEXT NOT NULL,
    created REAL NOT NULL, UNIQUE (rater, pair));
"""


@dataclass
class Study:
    """The two systems' folders and the pairs: file name -> prompt."""

    a: Path
    b: Path
    pairs: Dict[str, str]
    names: Dict[str, str]

    @classmethod
    def from_folders(cls, a: Path, b: Path, prompts: Optional[Path] = None,
                     names: Optional[Dict[str, str]] = None) -> "Study":
        """Pairs are the video files present in both folders; prompts are the lines of `prompts`
        (one per pair, in sorted file-name order) or the "prompt" of the JSON beside system A's
        video."""
        a, b = Path(a).resolve(), Path(b).resolve()
        for folder in (a, b):
            if not folder.is_dir():
                raise FileNotFoundError(f"video folder {str(folder)!r} does not exist")
        files = lambda d: {p.name for p in d.iterdir() if p.suffix.lower() in VIDEO_SUFFIXES}
        common = sorted(files(a) & files(b))
        if not common:
            raise ValueError(f"no video file name is in both {a} and {b}: a pair is the same file name in each")
        if prompts is not None:
            lines = [line.strip() for line in Path(prompts).read_text().splitlines() if line.strip()]
            if len(lines) != len(common):
                raise ValueError(f"--prompts {prompts}: {len(lines)} prompts for {len(common)} pairs "
                                 f"(one line per pair, in sorted file-name order)")
            texts = dict(zip(common, lines))
        else:
            texts = {}
            for name in common:
                meta = (a / name).with_suffix(".json")
                if not meta.is_file():
                    raise ValueError(f"no prompt for {name}: pass --prompts FILE or put {meta.name} beside it in {a}")
                texts[name] = json.loads(meta.read_text())["prompt"]
        return cls(a, b, texts, names or {"a": a.name, "b": b.name})


def connect(db: Path) -> sqlite3.Connection:
    con = sqlite3.connect(str(db), timeout=30)
    con.execute("PRAGMA journal_mode=WAL")
    con.execute("PRAGMA synchronous=FULL")
    con.executescript(SCHEMA)
    return con


PAGE = """<!doctype html>
<html><head><meta charset="utf-8"><title>kvideo side-by-side evaluation</title>
<style>
 body { font-family: sans-serif; margin: 1.5em; max-width: 1100px; }
 .videos { display: flex; gap: 1em; } .videos div { flex: 1; text-align: center; }
 video { width: 100%; max-height: 45vh; background: #000; image-rendering: pixelated; }
 .q { margin: 0.8em 0; } .q label { margin-right: 1.2em; } #prompt { font-size: 1.2em; margin: 0.5em 0 1em; }
 #done { display: none; font-size: 1.2em; } #error { color: #a00; }
</style></head>
<body>
<h1>Which video is better?</h1>
<div id="login">Your name: <input id="rater" autocomplete="off"> <button id="start">Start</button></div>
<div id="study" style="display:none">
 <div id="progress"></div>
 <div id="prompt"></div>
 <div class="videos"><div><b>Left</b><video id="left" loop muted playsinline></video></div>
  <div><b>Right</b><video id="right" loop muted playsinline></video></div></div>
 <form id="form">__QUESTIONS__<button id="submit" type="submit">Vote</button></form>
</div>
<div id="done">Thank you: you have judged every pair.</div>
<div id="error"></div>
<script>
const $ = (id) => document.getElementById(id);
let current = null;
async function api(path, body) {
  const r = await fetch(path, body ? {method: "POST", headers: {"Content-Type": "application/json"},
                                      body: JSON.stringify(body)} : {});
  const data = await r.json();
  if (!r.ok) throw new Error(data.error || r.statusText);
  return data;
}
function sync() {  // keep the right video on the left one's clock
  const l = $("left"), r = $("right");
  if (!l.paused && Math.abs(l.currentTime - r.currentTime) > 0.08) r.currentTime = l.currentTime;
}
setInterval(sync, 250);
async function next() {
  $("error").textContent = "";
  const n = await api("/api/next");
  if (n.done) { $("study").style.display = "none"; $("done").style.display = "block"; return; }
  current = n;
  $("progress").textContent = `pair ${n.judged + 1} of ${n.total}`;
  $("prompt").textContent = n.prompt;
  $("form").reset();
  const l = $("left"), r = $("right");
  l.src = n.left; r.src = n.right;
  await Promise.all([l, r].map(v => new Promise(ok => { v.oncanplay = ok; v.load(); })));
  l.currentTime = 0; r.currentTime = 0;
  await Promise.all([l.play(), r.play()]);
}
$("start").onclick = async () => {
  try {
    await api("/api/login", {rater: $("rater").value});
    $("login").style.display = "none"; $("study").style.display = "block"; await next();
  } catch (e) { $("error").textContent = e.message; }
};
$("form").onsubmit = async (ev) => {
  ev.preventDefault();
  const f = new FormData($("form")); const vote = {pair: current.pair};
  for (const q of __KEYS__) vote[q] = f.get(q);
  try { await api("/api/vote", vote); await next(); } catch (e) { $("error").textContent = e.message; }
};
</script></body></html>
"""


def _page() -> str:
    questions = "".join(
        f'<div class="q"><div>{text}</div>' + "".join(
            f'<label><input type="radio" name="{key}" value="{a}" required> {a}</label>' for a in ANSWERS) + "</div>"
        for key, text in QUESTIONS.items())
    return PAGE.replace("__QUESTIONS__", questions).replace("__KEYS__", json.dumps(list(QUESTIONS)))


def create_app(study: Study, db: Path, seed: Optional[int] = None) -> Flask:
    """The Flask app of `study`, storing votes in the SQLite file `db`."""
    app = Flask(__name__)
    rng = random.Random(seed)
    with closing(connect(db)):
        pass  # the schema exists before the first request

    def fail(code: int, message: str):
        return make_response(jsonify(error=message), code)

    def rater() -> str:
        name = request.cookies.get("rater", "")
        if not name:
            abort(fail(401, "no rater: log in with your name first"))
        return name

    @app.errorhandler(404)
    def not_found(_):
        return fail(404, "not found")

    @app.errorhandler(405)
    def not_allowed(_):
        return fail(405, "method not allowed")

    @app.errorhandler(Exception)
    def internal(e):  # every other failure: a message, not a traceback
        if isinstance(e, HTTPException):
            return e if e.code is None else fail(e.code, e.description or e.name)
        app.logger.exception("request failed")
        return fail(500, f"server error: {type(e).__name__}")

    @app.get("/")
    def index():
        return _page()

    @app.post("/api/login")
    def login():
        body = request.get_json(silent=True) or {}
        name = str(body.get("rater", "")).strip()
        if not name or len(name) > 64:
            return fail(400, "rater: a name of 1 to 64 characters")
        response = jsonify(rater=name)
        response.set_cookie("rater", name, samesite="Strict", httponly=True)
        return response

    @app.get("/api/next")
    def next_pair():
        who = rater()
        with closing(connect(db)) as con, con:
            voted = {row[0] for row in con.execute("SELECT pair FROM votes WHERE rater = ?", (who,))}
            todo = [p for p in study.pairs if p not in voted]
            if not todo:
                return jsonify(done=True, judged=len(voted), total=len(study.pairs))
            row = con.execute("SELECT pair, left_system FROM assignments WHERE rater = ? AND pair NOT IN "
                              "(SELECT pair FROM votes WHERE rater = ?) ORDER BY created LIMIT 1", (who, who)).fetchone()
            if row is None:  # a new pair, the sides drawn now and recorded
                pair, left = rng.choice(todo), rng.choice(SYSTEMS)
                con.execute("INSERT INTO assignments VALUES (?, ?, ?, ?)", (who, pair, left, time.time()))
            else:
                pair, left = row
        right = "b" if left == "a" else "a"
        return jsonify(done=False, pair=pair, prompt=study.pairs[pair], left=f"/video/{left}/{pair}",
                       right=f"/video/{right}/{pair}", judged=len(voted), total=len(study.pairs))

    @app.post("/api/vote")
    def vote():
        who = rater()
        body = request.get_json(silent=True)
        if not isinstance(body, dict):
            return fail(400, "a JSON object with pair and the answers")
        pair = body.get("pair")
        if pair not in study.pairs:
            return fail(400, "pair: not a pair of this study")
        answers = {q: body.get(q) for q in QUESTIONS}
        bad = [q for q, a in answers.items() if a not in ANSWERS]
        if bad:
            return fail(400, f"{bad[0]}: answer one of {', '.join(ANSWERS)}")
        with closing(connect(db)) as con, con:
            row = con.execute("SELECT left_system FROM assignments WHERE rater = ? AND pair = ?", (who, pair)).fetchone()
            if row is None:
                return fail(409, "pair: not shown to this rater")
            try:
                con.execute("INSERT INTO votes (rater, pair, prompt, left_system, temporal, alignment, quality, created) "
                            "VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                            (who, pair, study.pairs[pair], row[0], answers["temporal"], answers["alignment"],
                             answers["quality"], time.time()))
            except sqlite3.IntegrityError:
                return fail(409, "pair: this rater has voted on it already")
        return jsonify(ok=True)

    @app.get("/video/<system>/<path:name>")
    def video(system: str, name: str):
        if system not in SYSTEMS or name not in study.pairs:
            return fail(404, "not found")
        return send_from_directory(study.a if system == "a" else study.b, name)

    app.config["STUDY"] = study
    return app


def read_votes(db: Path) -> List[dict]:
    if not Path(db).is_file():
        raise FileNotFoundError(f"votes database {str(db)!r} does not exist")
    with closing(sqlite3.connect(str(db))) as con:
        con.row_factory = sqlite3.Row
        return [dict(row) for row in con.execute("SELECT * FROM votes ORDER BY id")]


def wilson(k: int, n: int, z: float = 1.959964) -> List[float]:
    """The Wilson score 95% interval of a proportion k / n."""
    if n == 0:
        return [0.0, 1.0]
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return [max(0.0, centre - half), min(1.0, centre + half)]


def win_rates(votes: List[dict]) -> Dict[str, dict]:
    """Per question: the share of votes for system A, for B and ties, each with its 95% interval.
    A vote's left / right is mapped back to the systems through the recorded sides."""
    out = {}
    for q in QUESTIONS:
        counts = {"a": 0, "b": 0, "tie": 0}
        for v in votes:
            answer = v[q]
            if answer == "tie":
                counts["tie"] += 1
            else:
                counts[v["left_system"] if answer == "left" else ("b" if v["left_system"] == "a" else "a")] += 1
        n = sum(counts.values())
        out[q] = {"votes": n, **{k: {"count": c, "rate": c / n if n else 0.0, "ci95": wilson(c, n)}
                                 for k, c in counts.items()}}
    return out


def bar_chart(rates: Dict[str, dict], names: Dict[str, str], path: Path) -> None:
    """A PNG of stacked bars (A wins, ties, B wins) per question, with A's 95% interval."""
    from PIL import Image, ImageDraw

    width, row, left = 760, 70, 170
    img = Image.new("RGB", (width, 50 + row * len(rates)), "white")
    draw = ImageDraw.Draw(img)
    draw.text((10, 10), f"A = {names['a']} (blue), ties (grey), B = {names['b']} (orange)", fill="black")
    span = width - left - 20
    for i, (q, r) in enumerate(rates.items()):
        y = 45 + i * row
        draw.text((10, y + 12), f"{q} (n={r['votes']})", fill="black")
        x = left
        for key, colour in (("a", (60, 110, 200)), ("tie", (180, 180, 180)), ("b", (230, 140, 40))):
            w = round(r[key]["rate"] * span)
            draw.rectangle([x, y, x + w, y + 36], fill=colour)
            if w > 30:
                draw.text((x + 4, y + 12), f"{100 * r[key]['rate']:.0f}%", fill="white")
            x += w
        lo, hi = r["a"]["ci95"]
        draw.line([left + lo * span, y + 40, left + hi * span, y + 40], fill="black", width=2)
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)
