"""The panel's downloader: search the Hugging Face hub, list a repo's files, download one
into a model dir with progress, cancel it, resume it.

Search and file lists go through `huggingface_hub.HfApi` (honouring `HF_ENDPOINT`).  Each
download runs `omlx pull` in a child process: huggingface_hub has no way to stop a transfer
from another thread, but a process can be ended at once; the partial files it leaves are
what the next `omlx pull` of the repo resumes from.  Progress is the bytes on disk (finished
files plus huggingface_hub's `.incomplete` ones) against the repo's serving files' sizes.
"""

from __future__ import annotations

import asyncio
import fnmatch
import itertools
import logging
import os
import socket
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

from omlx.hub import MODEL_FILE_PATTERNS, PullError, model_folder

log = logging.getLogger("omlx.downloads")

_ids = itertools.count(1)
REACH_TIMEOUT_S = 3.0


class HubUnreachable(Exception):
    """The hub (or the HF_ENDPOINT mirror) could not be asked."""


def hub_endpoint() -> str | None:
    return os.environ.get("HF_ENDPOINT") or None


def _api():
    from huggingface_hub import HfApi

    return HfApi(endpoint=hub_endpoint())


def _check_reachable() -> None:
    """Fail at once when the hub's host cannot even be connected to: huggingface_hub would
    retry with back-off for half a minute before giving up, and the panel would hang."""
    url = urlsplit(hub_endpoint() or "https://huggingface.co")
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        socket.create_connection((url.hostname, port), timeout=REACH_TIMEOUT_S).close()
    except OSError as exc:
        raise HubUnreachable(f"the Hugging Face hub at {url.scheme}://{url.netloc} cannot be reached "
                             f"({exc}); set HF_ENDPOINT to a mirror, or download on a machine that "
                             "has the network and copy the folder into a model dir") from None


def _hub_call(what: str, fn):
    """Run a hub query; a missing repo is a PullError, any failure to reach the hub a
    HubUnreachable saying where it tried."""
    from huggingface_hub.errors import HfHubHTTPError, RepositoryNotFoundError

    _check_reachable()
    try:
        return fn()
    except RepositoryNotFoundError:
        raise PullError(f"the hub has no model repo {what!r} (or it is private)") from None
    except HfHubHTTPError as exc:
        raise HubUnreachable(f"the hub at {hub_endpoint() or 'https://huggingface.co'} refused {what}: {exc}") from None
    except Exception as exc:  # connection refused, DNS, timeouts: the machine is offline
        raise HubUnreachable(f"the Hugging Face hub at {hub_endpoint() or 'https://huggingface.co'} "
                             f"cannot be reached ({type(exc).__name__}: {exc})") from None


def search(query: str, limit: int = 20) -> list[dict]:
    def run():
        models = _api().list_models(search=query or None, limit=limit)
        return [{"id": m.id, "downloads": getattr(m, "downloads", None), "likes": getattr(m, "likes", None),
                 "pipeline_tag": getattr(m, "pipeline_tag", None)} for m in models]

    return _hub_call(f"a search for {query!r}", run)


def serving_file(path: str) -> bool:
    return any(fnmatch.fnmatch(path, pattern) for pattern in MODEL_FILE_PATTERNS)


def repo_files(repo_id: str) -> list[dict]:
    """The repo's files with sizes, and whether `omlx pull` fetches each."""
    model_folder(Path("."), repo_id)  # a PullError for what is no repo id

    def run():
        from huggingface_hub.hf_api import RepoFile

        entries = _api().list_repo_tree(repo_id, recursive=True)
        return [{"path": e.path, "size": e.size, "download": serving_file(e.path)}
                for e in entries if isinstance(e, RepoFile)]

    return _hub_call(repo_id, run)


@dataclass
class Download:
    id: str
    repo_id: str
    model_dir: Path  # the model dir it goes into (`dest` is its folder there)
    dest: Path
    total_bytes: int
    status: str = "downloading"  # downloading, done, failed, cancelled
    error: str | None = None
    started: float = field(default_factory=time.time)
    finished: float | None = None
    process: asyncio.subprocess.Process | None = None

    def bytes_on_disk(self) -> int:
        if not self.dest.exists():
            return 0
        total = 0
        for path in self.dest.rglob("*"):
            if path.is_file() and (path.suffix == ".incomplete" or ".cache" not in path.parts):
                try:
                    total += path.stat().st_size
                except OSError:  # renamed from .incomplete under our feet
                    pass
        return total

    def report(self) -> dict:
        done = self.total_bytes if self.status == "done" else min(self.bytes_on_disk(), self.total_bytes)
        return {"id": self.id, "repo_id": self.repo_id, "dest": str(self.dest), "status": self.status,
                "error": self.error, "total_bytes": self.total_bytes, "downloaded_bytes": done,
                "progress": done / self.total_bytes if self.total_bytes else (1.0 if self.status == "done" else 0.0),
                "started": self.started, "finished": self.finished}


class Downloads:
    def __init__(self, model_dirs: list[Path], on_done=None):
        """`model_dirs`: where downloads may go, the first by default."""
        self.model_dirs = list(model_dirs)
        self.on_done = on_done  # called after a download completes (the pool rescans)
        self.tasks: dict[str, Download] = {}

    async def start(self, repo_id: str, model_dir: Path | None = None) -> Download:
        model_dir = model_dir or self.model_dirs[0]
        dest = model_folder(model_dir, repo_id)
        for task in self.tasks.values():
            if task.dest == dest and task.status == "downloading":
                return task
        files = await asyncio.to_thread(repo_files, repo_id)
        total = sum(f["size"] or 0 for f in files if f["download"])
        task = Download(f"dl-{next(_ids)}", repo_id, model_dir, dest, total)
        self.tasks[task.id] = task
        await self._run(task)
        return task

    async def resume(self, task_id: str) -> Download:
        task = self.tasks[task_id]
        if task.status != "downloading":
            # Detach the old process first: its watcher must not take the new run's
            # "downloading" status for its own and mark the task failed when it exits.
            old, task.process = task.process, None
            task.status, task.error, task.finished = "downloading", None, None
            if old is not None and old.returncode is None:
                old.terminate()
                await old.wait()  # two pulls must never write the same partial files
            await self._run(task)
        return task

    def cancel(self, task_id: str) -> Download:
        task = self.tasks[task_id]
        if task.status == "downloading":
            task.status = "cancelled"
            task.finished = time.time()
            if task.process is not None and task.process.returncode is None:
                task.process.terminate()
            log.info("download of %s cancelled", task.repo_id)
        return task

    async def _run(self, task: Download) -> None:
        log.info("downloading %s into %s (%d bytes)", task.repo_id, task.dest, task.total_bytes)
        task.process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "omlx", "pull", task.repo_id, "--model-dir", str(task.model_dir),
            stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE,
        )
        asyncio.ensure_future(self._watch(task, task.process))

    async def _watch(self, task: Download, process) -> None:
        _, stderr = await process.communicate()
        if task.process is not process or task.status == "cancelled":
            return
        task.finished = time.time()
        if process.returncode == 0:
            task.status = "done"
            log.info("downloaded %s into %s", task.repo_id, task.dest)
            if self.on_done is not None:
                self.on_done(task)
        else:
            task.status = "failed"
            lines = [line for line in stderr.decode(errors="replace").splitlines() if line.strip()]
            task.error = lines[-1] if lines else f"omlx pull exited with {process.returncode}"
            log.warning("download of %s failed: %s", task.repo_id, task.error)

    async def close(self) -> None:
        for task in self.tasks.values():
            if task.process is not None and task.process.returncode is None:
                task.process.terminate()
                await task.process.wait()
