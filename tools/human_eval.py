"""Side-by-side human evaluation of two systems' videos (kvideo.human_eval).

    python tools/human_eval.py serve --a DIR --b DIR [--prompts FILE] --db votes.sqlite
        [--host 127.0.0.1] [--port 8000] [--name-a NAME] [--name-b NAME] [--seed N]
    python tools/human_eval.py report --db votes.sqlite [--out DIR] [--name-a NAME] [--name-b NAME]

`serve` shows raters the two systems' videos of one prompt side by side (a pair is the same file
name in both folders), looping and in sync, sides drawn at random and recorded, and asks three
questions (temporal consistency, text alignment, frame quality: left / right / tie). Votes go to
the SQLite file (WAL mode: several raters at once, a restart loses nothing); each rater judges
each pair once. `report` prints the win rates of A and B and the ties per question with Wilson
95% intervals, and writes OUT/win_rates.json and OUT/win_rates.png.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from kvideo.human_eval import QUESTIONS, Study, bar_chart, create_app, read_votes, win_rates  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="serve the voting page")
    serve.add_argument("--a", required=True, type=Path, help="system A's videos")
    serve.add_argument("--b", required=True, type=Path, help="system B's videos")
    serve.add_argument("--prompts", type=Path, help="one prompt per pair, in sorted file-name order")
    serve.add_argument("--db", required=True, type=Path)
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--seed", type=int, help="seed of the pair order and the sides (default: random)")
    report = sub.add_parser("report", help="win rates per question")
    report.add_argument("--db", required=True, type=Path)
    report.add_argument("--out", type=Path, help="where win_rates.json and win_rates.png go (default: beside the db)")
    for p in (serve, report):
        p.add_argument("--name-a", default=None)
        p.add_argument("--name-b", default=None)
    args = ap.parse_args(argv)
    try:
        if args.command == "serve":
            study = Study.from_folders(args.a, args.b, args.prompts)
            app = create_app(study, args.db, args.seed)
            print(f"{len(study.pairs)} pairs of {study.a} (A) and {study.b} (B); votes in {args.db}; "
                  f"http://{args.host}:{args.port}/", flush=True)
            app.run(host=args.host, port=args.port, threaded=True)
            return 0
        votes = read_votes(args.db)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    names = {"a": args.name_a or "A", "b": args.name_b or "B"}
    rates = win_rates(votes)
    out = args.out or args.db.parent
    out.mkdir(parents=True, exist_ok=True)
    (out / "win_rates.json").write_text(json.dumps({"systems": names, "votes": len(votes), "questions": rates}, indent=2))
    bar_chart(rates, names, out / "win_rates.png")
    print(f"{len(votes)} votes from {len({v['rater'] for v in votes})} raters; A = {names['a']}, B = {names['b']}")
    print("| question | A wins | ties | B wins | votes |\n|---|---|---|---|---|")
    for q in QUESTIONS:
        r = rates[q]
        cell = lambda k: f"{100 * r[k]['rate']:.1f}% [{100 * r[k]['ci95'][0]:.1f}, {100 * r[k]['ci95'][1]:.1f}]"
        print(f"| {q} | {cell('a')} | {cell('tie')} | {cell('b')} | {r['votes']} |")
    print(f"wrote {out / 'win_rates.json'} and {out / 'win_rates.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
