"""The side-by-side human evaluation: votes stored with the sides drawn, no pair twice, only the
two folders served, 4xx on bad requests, votes kept across a restart, win rates mapped back to
the systems. The browser test (a real headless Chromium) is tests/test_human_eval_browser.py."""

import json

import numpy as np
import pytest

from kvideo.data.video_io import write_video
from kvideo.human_eval import QUESTIONS, Study, create_app, read_votes, wilson, win_rates


def make_folders(root, n=3):
    a, b = root / "sys_a", root / "sys_b"
    a.mkdir(), b.mkdir()
    for i in range(n):
        for folder, colour in ((a, 40), (b, 200)):
            frames = np.full((6, 32, 32, 3), colour, dtype=np.uint8)
            frames[:, 8:16, 4 + i:12 + i] = 255
            write_video(folder / f"p{i}.mp4", frames, 8)
        (a / f"p{i}.json").write_text(json.dumps({"prompt": f"prompt number {i}"}))
    write_video(a / "only_in_a.mp4", np.zeros((4, 32, 32, 3), np.uint8), 8)  # not a pair
    (root / "secret.txt").write_text("not to be served")
    return a, b


@pytest.fixture
def study(tmp_path):
    a, b = make_folders(tmp_path)
    return Study.from_folders(a, b)


def client(study, db, name="ann"):
    c = create_app(study, db, seed=0).test_client()
    if name:
        assert c.post("/api/login", json={"rater": name}).status_code == 200
    return c


ALL_LEFT = {q: "left" for q in QUESTIONS}


def test_votes_record_the_sides_and_no_pair_comes_twice(study, tmp_path):
    db = tmp_path / "votes.sqlite"
    c = client(study, db)
    assert sorted(study.pairs) == ["p0.mp4", "p1.mp4", "p2.mp4"]
    seen = []
    for _ in range(3):
        n = c.get("/api/next").get_json()
        assert not n["done"] and n["pair"] not in seen
        assert c.get("/api/next").get_json()["pair"] == n["pair"]  # a reload shows the same pair and sides
        left_system = n["left"].split("/")[2]
        assert {n["left"], n["right"]} == {f"/video/a/{n['pair']}", f"/video/b/{n['pair']}"}
        assert n["prompt"] == study.pairs[n["pair"]]
        assert c.post("/api/vote", json={"pair": n["pair"], **ALL_LEFT}).get_json() == {"ok": True}
        assert c.post("/api/vote", json={"pair": n["pair"], **ALL_LEFT}).status_code == 409  # once
        seen.append(n["pair"])
        assert read_votes(db)[-1]["left_system"] == left_system
    assert c.get("/api/next").get_json()["done"]
    # another rater gets every pair again; a restarted server keeps every vote
    other = client(study, db, "bob")
    assert not other.get("/api/next").get_json()["done"]
    restarted = client(create_app(study, db).config["STUDY"], db, "ann")
    assert restarted.get("/api/next").get_json()["done"] and len(read_votes(db)) == 3


def test_bad_requests_get_4xx_and_only_the_pairs_are_served(study, tmp_path):
    db = tmp_path / "votes.sqlite"
    anonymous = client(study, db, name=None)
    assert anonymous.get("/api/next").status_code == 401
    assert anonymous.post("/api/login", json={"rater": ""}).status_code == 400
    c = client(study, db)
    n = c.get("/api/next").get_json()
    assert c.post("/api/vote", data="not json").status_code == 400
    assert c.post("/api/vote", json={"pair": "nope.mp4", **ALL_LEFT}).status_code == 400
    assert c.post("/api/vote", json={"pair": n["pair"], **ALL_LEFT, "quality": "both"}).status_code == 400
    other = [p for p in study.pairs if p != n["pair"]][0]
    assert c.post("/api/vote", json={"pair": other, **ALL_LEFT}).status_code == 409  # never shown to ann
    assert c.get(n["left"]).status_code == 200 and c.get(n["left"]).data[4:8] == b"ftyp"
    for path in ("/video/a/only_in_a.mp4", "/video/c/p0.mp4", "/video/a/../secret.txt",
                 "/video/a/%2e%2e/secret.txt", "/video/a/p0.json", "/etc/passwd"):
        r = c.get(path)
        assert r.status_code == 404 and b"not to be served" not in r.data, path
    assert c.put("/api/vote").status_code == 405
    assert all(r.is_json for r in (c.get("/nothing"), c.put("/api/vote")))  # messages, not tracebacks
    assert read_votes(db) == []


def test_win_rates_map_sides_back_to_systems():
    votes = [
        {"left_system": "a", "temporal": "left", "alignment": "right", "quality": "tie"},   # A, B, tie
        {"left_system": "b", "temporal": "left", "alignment": "right", "quality": "left"},  # B, A, B
        {"left_system": "b", "temporal": "right", "alignment": "tie", "quality": "left"},   # A, tie, B
    ]
    rates = win_rates(votes)
    assert {k: rates["temporal"][k]["count"] for k in ("a", "b", "tie")} == {"a": 2, "b": 1, "tie": 0}
    assert {k: rates["alignment"][k]["count"] for k in ("a", "b", "tie")} == {"a": 1, "b": 1, "tie": 1}
    assert {k: rates["quality"][k]["count"] for k in ("a", "b", "tie")} == {"a": 0, "b": 2, "tie": 1}
    lo, hi = wilson(2, 3)
    assert lo < 2 / 3 < hi and wilson(0, 10)[0] == 0.0
    # Wilson's interval for 8 / 10 (a textbook value: 0.490 to 0.943)
    assert wilson(8, 10) == pytest.approx([0.4902, 0.9433], abs=1e-3)


def test_report_writes_rates_and_chart(study, tmp_path, capsys):
    from tools import human_eval

    db = tmp_path / "votes.sqlite"
    c = client(study, db)
    n = c.get("/api/next").get_json()
    c.post("/api/vote", json={"pair": n["pair"], **ALL_LEFT})
    assert human_eval.main(["report", "--db", str(db), "--out", str(tmp_path / "report")]) == 0
    saved = json.loads((tmp_path / "report" / "win_rates.json").read_text())
    winner = n["left"].split("/")[2]
    assert saved["questions"]["quality"][winner]["count"] == 1 and saved["votes"] == 1
    assert (tmp_path / "report" / "win_rates.png").read_bytes()[:4] == b"\x89PNG"
    assert "| quality |" in capsys.readouterr().out
    assert human_eval.main(["report", "--db", str(tmp_path / "missing.sqlite")]) == 2
    assert human_eval.main(["serve", "--a", str(tmp_path / "nope"), "--b", str(tmp_path), "--db", str(db)]) == 2
