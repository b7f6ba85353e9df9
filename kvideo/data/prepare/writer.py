"""Shards, the journal that makes them exactly-once, the views built from it, and `merge`.

The files of one part of a run (`tag` = `00003-of-00008`; a one-machine run is `00000-of-00001`):

    shard-{tag}-{seq:06d}.tar   webdataset shards: KEY.mp4 + KEY.json per clip, clips shuffled
    journal-{tag}.jsonl         the durable record of the part, and the only truth
    .lock-{tag}                 held (flock) while a run writes the part

Journal records, one JSON object per line, each appended with a single write and fsync'ed:

    {"kind": "inputs", "digest": SHA256, "count": N}             first: the whole input list
                                                                   (inputs-PART.txt holds it)
    {"kind": "shard", "shard": NAME, "clips": [manifest rows]}   once NAME is durably in place
    {"kind": "source", "source": PATH, ..., "rejects": [...]}     once all of PATH's clips are
    {"kind": "run", ...}                                           at the end of an invocation

Exactly once, whenever the run is killed: a shard is written as `NAME.tmp`, fsync'ed, renamed to
`NAME` (and the directory fsync'ed), and only then is its record appended. At start-up a torn
last line is cut off, and every `.tmp` and every tar of the part that no record names is deleted
(a kill between the rename and the append). A source is skipped when it has a `source` record;
a source redone after a kill skips the clips already in committed shards (clip keys are fixed by
the source path and the clip number), so nothing is lost and nothing is written twice.

The views (`manifest.jsonl`, `rejects.jsonl`, `report.json`, or `manifest-{tag}.jsonl`... per
part of a multi-machine run) are rebuilt from journals at the end of every run, and by `merge`.
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import shutil
from collections import Counter
from pathlib import Path
from typing import Dict, Iterable, List, Sequence, Tuple

import numpy as np

from kvideo.data.prepare.process import REASONS, Clip, SourceResult

__all__ = ["PartFiles", "Journal", "ShardWriter", "read_journal", "write_views", "merge", "MANIFEST_FIELDS"]

MANIFEST_FIELDS = ("key", "shard", "source", "start_s", "end_s", "fps", "width", "height", "num_frames", "crop",
                   "motion_score", "caption")
_TAR_END = 1024 + 10240  # end-of-archive blocks, and at most one record of padding (tarfile.RECORDSIZE)
_JOURNAL = re.compile(r"^journal-((\d{5})-of-(\d{5}))\.jsonl$")


def _parse_journal_name(path: Path) -> Tuple[str, int, int]:
    """(tag, index, count) of a part journal's file name."""
    m = _JOURNAL.match(path.name)
    if not m:
        raise ValueError(f"{path} is not a part journal (journal-IIIII-of-NNNNN.jsonl)")
    return m.group(1), int(m.group(2)), int(m.group(3))


class PartFiles:
    """The names of one part's files in the output directory."""

    def __init__(self, out: str | os.PathLike, index: int, count: int):
        if not 0 <= index < count:
            raise ValueError(f"part {index} of {count}: the shard id must be in [0, {count})")
        self.out = Path(out)
        self.index, self.count = index, count
        self.tag = f"{index:05d}-of-{count:05d}"

    @property
    def journal(self) -> Path:
        return self.out / f"journal-{self.tag}.jsonl"

    @property
    def lock(self) -> Path:
        return self.out / f".lock-{self.tag}"

    @property
    def inputs(self) -> Path:
        """The whole input list (every part's) this part was started from, one path a line."""
        return self.out / f"inputs-{self.tag}.txt"

    def shard(self, seq: int) -> str:
        return f"shard-{self.tag}-{seq:06d}.tar"

    def own_tars(self) -> List[Path]:
        return sorted(self.out.glob(f"shard-{self.tag}-*.tar")) + sorted(self.out.glob(f"shard-{self.tag}-*.tar.tmp"))

    @property
    def view_suffix(self) -> str:
        return "" if self.count == 1 else f"-{self.tag}"


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_text_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


# ----------------------------------------------------------------------------------------------
# Journal
# ----------------------------------------------------------------------------------------------


def read_journal(path: Path) -> List[dict]:
    """The complete records of a journal (a torn last line, from a kill, is ignored)."""
    data = path.read_bytes()
    complete = data[: data.rfind(b"\n") + 1]
    records = []
    for n, line in enumerate(complete.splitlines(), 1):
        if line.strip():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise RuntimeError(f"{path}:{n}: corrupt journal line ({e}); the part cannot be trusted") from None
    return records


class Journal:
    """An append-only JSON-lines file; opening it repairs a torn last line."""

    def __init__(self, path: Path, fsync: bool = True):
        self.path, self.fsync = path, fsync
        self.records: List[dict] = []
        if path.exists():
            self.records = read_journal(path)
            size = path.stat().st_size
            complete = path.read_bytes().rfind(b"\n") + 1
            if complete < size:
                with open(path, "r+b") as f:
                    f.truncate(complete)
        self._file = open(path, "a", encoding="utf-8")

    def append(self, record: dict) -> None:
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        if self.fsync:
            os.fsync(self._file.fileno())
        self.records.append(record)

    def close(self) -> None:
        self._file.close()


def lock_part(files: PartFiles):
    """Hold the part's lock for the life of the returned file object (another run: an error)."""
    handle = open(files.lock, "w")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.close()
        raise RuntimeError(f"another prepare run is writing part {files.tag} in {files.out} (lock {files.lock})") from None
    return handle


# ----------------------------------------------------------------------------------------------
# Shard writer
# ----------------------------------------------------------------------------------------------


def manifest_row(clip: Clip, shard: str) -> dict:
    row = {"key": clip.key, "shard": shard}
    row.update({k: clip.meta[k] for k in MANIFEST_FIELDS[2:]})
    return row


class ShardWriter:
    """Buffers finished clips, draws them at random into size-capped shards, commits each shard
    to the journal, and records a source as done once all of its clips are committed."""

    def __init__(self, files: PartFiles, journal: Journal, cfg):
        self.files, self.journal, self.cfg = files, journal, cfg
        self.rng = np.random.default_rng([cfg.seed, files.index])
        self.committed: Dict[str, str] = {}  # clip key -> shard
        self.done_sources = set()
        shards = []
        for r in journal.records:
            if r["kind"] == "shard":
                shards.append(r["shard"])
                self.committed.update({c["key"]: r["shard"] for c in r["clips"]})
            elif r["kind"] == "source":
                self.done_sources.add(r["source"])
        self.seq = 1 + max((int(s.rsplit("-", 1)[1].split(".")[0]) for s in shards), default=-1)
        self._remove_orphans(set(shards))
        self.buffer: List[Clip] = []
        self.buffer_bytes = 0
        self.pending: Dict[str, set] = {}  # source -> keys not yet in a committed shard
        self.records: Dict[str, dict] = {}  # source -> its record, appended when pending empties
        self.max_bytes = int(cfg.max_shard_mb * 2**20)

    def _remove_orphans(self, committed_shards: set) -> None:
        for path in self.files.own_tars():
            if path.name not in committed_shards:
                path.unlink()  # a .tmp, or a tar renamed into place but never journaled

    def add(self, result: SourceResult) -> None:
        """Take a processed source; writes shards when the buffer is full."""
        record = {
            "kind": "source", "source": result.source, "duration_s": round(result.duration_s, 6),
            "candidates": result.candidates, "clips": len(result.clips),
            "seconds_out": round(sum(c.meta["end_s"] - c.meta["start_s"] for c in result.clips), 6),
            "process_s": round(result.process_s, 3), "rejects": result.rejects,
        }
        new = [c for c in result.clips if c.key not in self.committed]
        if not new:
            self._source_done(record)
            return
        self.pending[result.source] = {c.key for c in new}
        self.records[result.source] = record
        self.buffer += new
        self.buffer_bytes += sum(self._size(c) for c in new)
        # Full when a whole shard plus the shuffle buffer is waiting (in bytes: two shards' worth).
        while self.buffer and (len(self.buffer) >= self.cfg.max_shard_clips + self.cfg.shuffle_buffer_clips
                               or self.buffer_bytes >= 2 * self.max_bytes):
            self._write_shard()

    def close(self) -> None:
        """Write out everything still buffered (the last shards may be small)."""
        while self.buffer:
            self._write_shard()

    @staticmethod
    def _size(clip: Clip) -> int:
        """Bytes the clip takes in a tar: a 512-byte header and 512-byte blocks per member."""
        members = (len(clip.mp4), len(json.dumps(clip.meta, sort_keys=True).encode()))
        return sum(512 + -(-n // 512) * 512 for n in members)

    def _source_done(self, record: dict) -> None:
        self.journal.append(record)
        self.done_sources.add(record["source"])

    def _write_shard(self) -> None:
        import webdataset as wds

        take, size = [], 0
        for j in self.rng.permutation(len(self.buffer)).tolist():  # a random draw from the buffer
            s = self._size(self.buffer[j])
            if take and size + s + _TAR_END > self.max_bytes:
                continue
            take.append(j)
            size += s
            if len(take) >= self.cfg.max_shard_clips:
                break
        clips = [self.buffer[j] for j in take]
        name = self.files.shard(self.seq)
        final = self.files.out / name
        tmp = final.with_name(name + ".tmp")
        with open(tmp, "wb") as f:
            tar = wds.TarWriter(f)
            for c in clips:
                tar.write({"__key__": c.key, "mp4": c.mp4, "json": json.dumps(c.meta, sort_keys=True).encode()})
            tar.close()
            f.flush()
            if self.cfg.fsync:
                os.fsync(f.fileno())
        os.replace(tmp, final)
        if self.cfg.fsync:
            _fsync_dir(self.files.out)
        self.journal.append({"kind": "shard", "shard": name, "clips": [manifest_row(c, name) for c in clips]})
        self.seq += 1

        chosen = set(take)
        self.buffer = [c for j, c in enumerate(self.buffer) if j not in chosen]
        self.buffer_bytes -= size
        for c in clips:
            self.committed[c.key] = name
            source = c.meta["source"]
            self.pending[source].discard(c.key)
            if not self.pending[source]:
                del self.pending[source]
                self._source_done(self.records.pop(source))


# ----------------------------------------------------------------------------------------------
# Views: manifest, rejects, report
# ----------------------------------------------------------------------------------------------


def _summary(journals: Dict[str, List[dict]]) -> Tuple[List[dict], List[dict], dict]:
    """Manifest rows, reject rows and the report of some parts' journal records."""
    manifest, rejects, parts = [], [], []
    sources = 0
    with_clips = 0
    clips_in = 0
    seconds_in = seconds_out = 0.0
    wall = timed = 0.0
    for tag, records in journals.items():
        runs = [r for r in records if r["kind"] == "run"]
        done = [r for r in records if r["kind"] == "source"]
        for r in records:
            if r["kind"] == "shard":
                manifest += r["clips"]
        for r in done:
            rejects += r["rejects"]
            with_clips += r["clips"] > 0
            clips_in += r["candidates"]
            seconds_in += r["duration_s"]
        seconds_out += sum(c["end_s"] - c["start_s"] for r in records if r["kind"] == "shard" for c in r["clips"])
        wall += sum(r["wall_s"] for r in runs)
        timed += sum(r["source_seconds"] for r in runs)
        inputs = runs[-1]["inputs"] if runs else None
        parts.append({"part": tag, "inputs": inputs, "sources_done": len(done),
                      "complete": inputs is not None and len({r["source"] for r in done}) >= inputs})
        sources += len(done)
    by_reason = Counter(r["reason"] for r in rejects)
    files_by_reason = Counter(r["reason"] for r in rejects if "start_s" not in r)
    report = {
        "complete": all(p["complete"] for p in parts),
        "inputs": sum(p["inputs"] or 0 for p in parts),
        "sources_done": sources,
        "sources_with_clips": with_clips,
        "sources_rejected": sources - with_clips,
        "rejects_by_reason": {k: by_reason.get(k, 0) for k in REASONS},
        "rejected_files_by_reason": {k: files_by_reason.get(k, 0) for k in REASONS},
        "clips_in": clips_in,
        "clips_out": len(manifest),
        "seconds_in": round(seconds_in, 3),
        "seconds_out": round(seconds_out, 3),
        "wall_s": round(wall, 3),
        "throughput_source_s_per_wall_s": round(timed / wall, 3) if wall > 0 else None,
        "parts": parts,
    }
    return manifest, rejects, report


def write_views(out: Path, journal_paths: Sequence[Path], suffix: str = "") -> dict:
    """Write manifest{suffix}.jsonl, rejects{suffix}.jsonl and report{suffix}.json; returns the report."""
    journals = {_parse_journal_name(p)[0]: read_journal(p) for p in journal_paths}
    manifest, rejects, report = _summary(journals)
    keys = Counter(r["key"] for r in manifest)
    dupes = [k for k, n in keys.items() if n > 1]
    if dupes:
        raise RuntimeError(f"clip keys appear more than once across {', '.join(journals)}: {dupes[:5]}")
    write_text_atomic(out / f"manifest{suffix}.jsonl", "".join(json.dumps(r) + "\n" for r in manifest))
    write_text_atomic(out / f"rejects{suffix}.jsonl", "".join(json.dumps(r) + "\n" for r in rejects))
    write_text_atomic(out / f"report{suffix}.json", json.dumps(report, indent=2) + "\n")
    return report


def _place(src: Path, dst: Path) -> None:
    """Hard-link `src` to `dst` (a copy across file systems); an identical `dst` is kept."""
    if dst.exists():
        if dst.samefile(src) or dst.stat().st_size == src.stat().st_size:
            return
        raise RuntimeError(f"merge: {dst} exists and differs from {src}")
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def merge(inputs: Iterable[str | os.PathLike], out: str | os.PathLike, *, allow_partial: bool = False) -> dict:
    """Join the parts of a multi-machine run into one manifest, rejects list and report in `out`.

    `inputs` are output directories (every `journal-*.jsonl` in them) or journal files. Parts in
    other directories have their shards hard-linked (or copied) and journals copied into `out`.
    Missing or unfinished parts are an error unless `allow_partial`.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    found: Dict[str, Path] = {}
    for item in inputs:
        item = Path(item)
        paths = sorted(item.glob("journal-*.jsonl")) if item.is_dir() else [item]
        if not item.exists() or not paths:
            raise FileNotFoundError(f"merge: no journal-*.jsonl in {item}")
        for p in paths:
            tag = _parse_journal_name(p)[0]
            if tag in found and found[tag].resolve() != p.resolve():
                raise ValueError(f"merge: part {tag} appears twice: {found[tag]} and {p}")
            found[tag] = p
    counts = {_parse_journal_name(p)[2] for p in found.values()}
    if len(counts) > 1:
        raise ValueError(f"merge: parts of runs split {sorted(counts)} ways cannot be merged together")
    count = counts.pop()
    missing = sorted(set(range(count)) - {_parse_journal_name(p)[1] for p in found.values()})
    if missing and not allow_partial:
        raise ValueError(f"merge: parts {missing} of {count} are missing (pass --allow-partial to merge anyway)")

    digests = {tag: [r["digest"] for r in read_journal(path) if r["kind"] == "inputs"] for tag, path in found.items()}
    different = sorted({d[-1] for d in digests.values() if d})
    if len(different) > 1:
        by_digest = {d: [t for t, ds in digests.items() if ds and ds[-1] == d] for d in different}
        raise ValueError("merge: the parts were prepared from different input lists (" + "; ".join(
            f"parts {', '.join(tags)}: digest {d[:12]}" for d, tags in by_digest.items()) +
            "); compare their inputs-PART.txt files")

    local: List[Path] = []
    for tag, path in sorted(found.items()):
        records = read_journal(path)
        if path.parent.resolve() != out.resolve():
            for r in records:
                if r["kind"] == "shard":
                    _place(path.parent / r["shard"], out / r["shard"])
            shutil.copy2(path, out / path.name)
            listed = path.parent / f"inputs-{tag}.txt"
            if listed.is_file():
                shutil.copy2(listed, out / listed.name)
        local.append(out / path.name)
    report = write_views(out, local)
    unfinished = [p["part"] for p in report["parts"] if not p["complete"]]
    if unfinished and not allow_partial:
        raise ValueError(f"merge: parts {unfinished} have not finished (re-run them, or pass --allow-partial); "
                         f"views written to {out} anyway")
    return report
