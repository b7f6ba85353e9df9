"""Running a preparation: inputs, the split across machines, worker processes with limits.

`prepare(inputs, out, cfg)` expands the inputs (files, directories searched recursively, text
files listing paths) to a sorted list of absolute paths, keeps this machine's share of it
(`sources[index::count]`: every machine must be given the same inputs), skips the sources the
part's journal already records, and hands the rest to `run.workers` worker processes. The main
process alone writes (`writer.py`), so a kill at any moment leaves the part consistent.

Each worker is a process started from a fork server that has the pipeline imported. It builds
the captioner once, then takes one source at a time. Its address space is capped with
`resource.setrlimit(RLIMIT_AS)` at its baseline after start-up plus `run.memory_limit_mb`: a
file that needs more raises MemoryError in the worker, which reports it and is replaced. A
source that takes longer than `run.time_limit_s` gets its worker killed (SIGKILL) and replaced.
Both, and a worker that dies on a file (a crash in a decoder), reject the file as `timeout` with
a detail saying which; the run goes on.
"""

from __future__ import annotations

import hashlib
import logging
import multiprocessing
import os
import resource
import signal
import time
import traceback
from collections import deque
from dataclasses import dataclass
from multiprocessing.connection import wait
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

from omegaconf import DictConfig

from kvideo.data.prepare.captions import CAPTIONERS, load_caption_table, sidecar_caption
from kvideo.data.prepare.process import SourceResult, process_source
from kvideo.data.prepare.writer import Journal, PartFiles, ShardWriter, lock_part, write_text_atomic, write_views

log = logging.getLogger(__name__)

__all__ = ["expand_inputs", "resolve_part", "prepare", "WorkerPool"]

LIST_SUFFIXES = (".txt", ".lst", ".list")


# ----------------------------------------------------------------------------------------------
# Inputs and parts
# ----------------------------------------------------------------------------------------------


def expand_inputs(inputs: Sequence[str | os.PathLike], extensions: Sequence[str]) -> List[str]:
    """Sorted absolute paths of the source videos named by `inputs`.

    A directory contributes its files with a video extension (recursively); a `.txt`/`.lst`/
    `.list` file lists inputs, one per line (`#` comments; relative to the list's directory);
    any other file is a source whatever it holds. A missing path on the command line is an
    error; a missing path in a list becomes a source that is rejected as `decode_error`.
    """
    exts = {"." + e.lower().lstrip(".") for e in extensions}
    found: set = set()

    def add(path: Path, listed: bool, depth: int = 0) -> None:
        if path.is_dir():
            found.update(os.path.abspath(p) for p in path.rglob("*") if p.is_file() and p.suffix.lower() in exts)
        elif path.is_file() and path.suffix.lower() in LIST_SUFFIXES:
            if depth > 8:
                raise ValueError(f"input lists nest deeper than 8 levels at {path}")
            for line in path.read_text(encoding="utf-8").splitlines():
                line = line.split("#", 1)[0].strip()
                if line:
                    add(path.parent / os.path.expanduser(line), True, depth + 1)
        elif path.exists() or listed:
            found.add(os.path.abspath(path))
        else:
            raise FileNotFoundError(f"input not found: {path}")

    for item in inputs:
        add(Path(item), False)
    return _one_path_per_file(sorted(found))


def _one_path_per_file(paths: List[str]) -> List[str]:
    """`paths` with each file once: a file reached by several paths (symlinks, hard links, bind
    mounts: the same device and inode) keeps its first path in sorted order."""
    seen: Dict[Tuple[int, int], str] = {}
    out = []
    for p in paths:
        try:
            st = os.stat(p)
        except OSError:  # missing (from a list): rejected later as decode_error
            out.append(p)
            continue
        ident = (st.st_dev, st.st_ino)
        if ident in seen:
            log.info("input %s is the same file as %s: prepared once", p, seen[ident])
            continue
        seen[ident] = p
        out.append(p)
    return out


def inputs_digest(sources: Sequence[str]) -> str:
    """SHA-256 of the whole input list (every machine's, before the split)."""
    return hashlib.sha256("\n".join(sources).encode()).hexdigest()


def check_inputs(files: PartFiles, journal: Journal, sources: List[str]) -> None:
    """Record the part's input list on its first run; on a re-run, a different list is a
    ValueError naming what was added and removed (a resume would skip or repeat files)."""
    digest = inputs_digest(sources)
    recorded = [r for r in journal.records if r["kind"] == "inputs"]
    if not recorded:
        write_text_atomic(files.inputs, "".join(s + "\n" for s in sources))
        journal.append({"kind": "inputs", "digest": digest, "count": len(sources)})
        return
    if recorded[-1]["digest"] == digest:
        return
    before = files.inputs.read_text().splitlines() if files.inputs.is_file() else []
    added, removed = sorted(set(sources) - set(before)), sorted(set(before) - set(sources))
    raise ValueError(
        f"part {files.tag} in {files.out} was started from another input list ({recorded[-1]['count']} files, "
        f"now {len(sources)}; {len(added)} added" + (f", first {added[0]}" if added else "") +
        f"; {len(removed)} removed" + (f", first {removed[0]}" if removed else "") +
        f"; the list is {files.inputs}). Give every run of a preparation the same inputs (the same paths: "
        f"a different mount point is a different list), or prepare into a new directory")


def resolve_part(num_shards: Optional[int], shard_id: Optional[int]) -> Tuple[int, int]:
    """(index, count) of this machine: the flags, else torchrun's RANK/WORLD_SIZE, else SLURM's
    SLURM_PROCID/SLURM_NTASKS, else (0, 1)."""
    if num_shards is not None or shard_id is not None:
        if num_shards is None or shard_id is None:
            raise ValueError("--num-shards and --shard-id go together")
        source = "--num-shards/--shard-id"
        index, count = shard_id, num_shards
    elif "WORLD_SIZE" in os.environ:
        source = "RANK/WORLD_SIZE"
        index, count = int(os.environ.get("RANK", "0")), int(os.environ["WORLD_SIZE"])
    elif "SLURM_NTASKS" in os.environ:
        source = "SLURM_PROCID/SLURM_NTASKS"
        index, count = int(os.environ.get("SLURM_PROCID", "0")), int(os.environ["SLURM_NTASKS"])
    else:
        return 0, 1
    if count < 1 or not 0 <= index < count:
        raise ValueError(f"{source}: shard id {index} is not in [0, {count})")
    return index, count


def source_caption(source: str, table: Dict[str, str], cfg) -> Optional[str]:
    """The caption a source has before decoding: its captions-file entry, else its sidecar."""
    if source in table:
        return table[source]
    return sidecar_caption(source) if cfg.captions.sidecar else None


# ----------------------------------------------------------------------------------------------
# Workers
# ----------------------------------------------------------------------------------------------


def _address_space() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[0]) * resource.getpagesize()


def _die_with_parent() -> None:
    """Linux: get SIGKILL when the parent (the fork server, which ends with the main process) ends,
    so a worker busy on a file does not outlive a main process that was killed."""
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return
    if os.getppid() == 1:  # the parent ended before prctl
        os._exit(1)


def _worker_main(conn, cfg: DictConfig, captioner_cls) -> None:
    """A worker: build the captioner, cap memory, then process sources until told to stop."""
    _die_with_parent()
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the main process decides when to stop
    try:
        import cv2
        import torch

        cv2.setNumThreads(1)
        torch.set_num_threads(1)
        captioner = captioner_cls(cfg) if captioner_cls is not None else None
        if cfg.run.memory_limit_mb > 0:
            limit = _address_space() + cfg.run.memory_limit_mb * 2**20
            resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    except Exception as e:  # a broken captioner config: the run cannot go on
        conn.send(("init_error", f"{type(e).__name__}: {e}"))
        return
    conn.send(("ready", None))
    while True:
        try:
            task = conn.recv()
        except (EOFError, OSError):
            return  # the main process is gone
        if task is None:
            return
        source, caption = task
        try:
            conn.send(("done", process_source(source, cfg, caption, captioner)))
        except MemoryError:
            conn.send(("memory", None))
            return
        except Exception as e:  # a bug, or an input no check anticipated: reject it, go on
            tb = traceback.format_exc(limit=-3).strip().replace("\n", " | ")
            result = SourceResult(source).reject("decode_error", f"unexpected {type(e).__name__}: {e} [{tb}]")
            conn.send(("done", result))


@dataclass
class _Worker:
    process: multiprocessing.Process
    conn: object
    ready: bool = False
    task: Optional[str] = None
    deadline: float = 0.0


class WorkerPool:
    """`run.workers` processes; `imap(tasks)` yields a SourceResult per (source, caption) task."""

    def __init__(self, cfg: DictConfig, captioner_cls=None):
        self.cfg = cfg
        self.captioner_cls = captioner_cls
        self.ctx = multiprocessing.get_context("forkserver")
        self.ctx.set_forkserver_preload(["kvideo.data.prepare.runner"])
        self.workers: List[_Worker] = []
        self.started = 0

    def _start(self) -> _Worker:
        self.started += 1
        ours, theirs = self.ctx.Pipe()
        p = self.ctx.Process(target=_worker_main, args=(theirs, self.cfg, self.captioner_cls), daemon=True,
                             name=f"prepare-worker-{self.started}")
        p.start()
        theirs.close()
        worker = _Worker(p, ours)
        self.workers.append(worker)
        return worker

    def _replace(self, worker: _Worker) -> None:
        if worker.process.is_alive():
            worker.process.kill()
        worker.process.join()
        worker.conn.close()
        self.workers.remove(worker)
        self._start()

    def imap(self, tasks: Sequence[Tuple[str, Optional[str]]]) -> Iterator[SourceResult]:
        limit = self.cfg.run.time_limit_s
        queue = deque(tasks)
        for _ in range(min(self.cfg.run.workers, len(queue))):
            self._start()
        while queue or any(w.task for w in self.workers):
            for w in self.workers:
                if w.ready and w.task is None and queue:
                    w.task, caption = queue.popleft()
                    w.deadline = time.monotonic() + limit
                    w.conn.send((w.task, caption))
            busy = [w for w in self.workers if w.task]
            timeout = max(0.0, min(w.deadline for w in busy) - time.monotonic()) if busy else None
            handles = {w.conn: w for w in self.workers} | {w.process.sentinel: w for w in self.workers}
            for handle in wait(list(handles), timeout):
                w = handles[handle]
                if w not in self.workers:
                    continue  # already replaced in this round
                if handle is w.conn:
                    try:
                        kind, payload = w.conn.recv()
                    except (EOFError, OSError):
                        kind, payload = "died", None
                else:
                    if w.conn.poll():
                        continue  # read its last message first
                    kind, payload = "died", None
                if kind == "ready":
                    w.ready = True
                elif kind == "init_error":
                    raise RuntimeError(f"a prepare worker could not start: {payload}")
                elif kind == "done":
                    w.task = None
                    yield payload
                elif kind == "memory":
                    yield SourceResult(w.task).reject(
                        "timeout", f"abandoned: needed more than run.memory_limit_mb={self.cfg.run.memory_limit_mb} MB")
                    self._replace(w)
                elif kind == "died":
                    w.process.join(1)
                    code = w.process.exitcode
                    if not w.ready:  # start-up itself fails: nothing will work
                        raise RuntimeError(f"a prepare worker died while starting (exit code {code})")
                    if w.task is None:  # killed while idle (the OOM killer, an operator): replace it
                        self._replace(w)
                        continue
                    what = f"signal {-code}" if code is not None and code < 0 else f"exit code {code}"
                    yield SourceResult(w.task).reject("timeout", f"abandoned: the worker died on it ({what})")
                    self._replace(w)
            now = time.monotonic()
            for w in list(self.workers):
                if w.task and now >= w.deadline and w in self.workers:
                    yield SourceResult(w.task).reject("timeout", f"abandoned after run.time_limit_s={limit} s")
                    self._replace(w)

    def close(self) -> None:
        for w in self.workers:
            if w.process.is_alive():
                if w.task is None:
                    try:
                        w.conn.send(None)
                    except OSError:
                        pass
                    w.process.join(2)
                if w.process.is_alive():
                    w.process.kill()
            w.process.join()
            w.conn.close()
        self.workers.clear()


# ----------------------------------------------------------------------------------------------
# A run
# ----------------------------------------------------------------------------------------------


def prepare(inputs: Sequence[str | os.PathLike], out: str | os.PathLike, cfg: DictConfig, *,
            num_shards: Optional[int] = None, shard_id: Optional[int] = None, progress: bool = True) -> dict:
    """Prepare this machine's share of `inputs` into `out`; returns the part's report.

    Re-running the same command resumes: finished sources are skipped.
    """
    from tqdm import tqdm

    t0 = time.perf_counter()
    index, count = resolve_part(num_shards, shard_id)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    captioner_cls = CAPTIONERS[cfg.captions.captioner] if cfg.captions.captioner else None
    if captioner_cls is not None:
        captioner_cls.check(cfg)
    table = load_caption_table(cfg.captions.file) if cfg.captions.file else {}
    every = expand_inputs(inputs, cfg.inputs.extensions)
    sources = every[index::count]

    files = PartFiles(out, index, count)
    lock = lock_part(files)
    journal = Journal(files.journal, fsync=cfg.writer.fsync)
    pool = None
    try:
        check_inputs(files, journal, every)
        writer = ShardWriter(files, journal, cfg.writer)
        todo = [(s, source_caption(s, table, cfg)) for s in sources if s not in writer.done_sources]
        log.info("part %s: %d sources, %d to do", files.tag, len(sources), len(todo))
        seconds = 0.0
        if todo:
            pool = WorkerPool(cfg, captioner_cls)
            bar = tqdm(total=len(todo), desc=f"prepare {files.tag}", unit="file", disable=not progress,
                       dynamic_ncols=True)
            clips = rejected = 0
            for result in pool.imap(todo):
                writer.add(result)
                seconds += result.duration_s
                clips += len(result.clips)
                rejected += not result.clips
                bar.update(1)
                bar.set_postfix(clips=clips, rejected_files=rejected, refresh=False)
            bar.close()
            writer.close()
        journal.append({"kind": "run", "inputs": len(sources), "processed": len(todo),
                        "source_seconds": round(seconds, 3), "wall_s": round(time.perf_counter() - t0, 3),
                        "workers": cfg.run.workers,
                        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z")})
        return write_views(out, [files.journal], files.view_suffix)
    finally:
        if pool is not None:
            pool.close()
        journal.close()
        lock.close()


def install_sigterm_exit() -> None:
    """SIGTERM (preemption) unwinds like Ctrl-C: workers are killed, the journal stays consistent."""
    def handler(signum, frame):
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, handler)
