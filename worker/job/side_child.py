"""A helper child of one job that runs beside its stages: the base model's download
(worker/job/prefetch.py) and the kernel warm-up (worker/job/warmup.py).

Unlike a stage it has no limits and no say in the job's result: the stage that needs its work does it
itself when the helper failed or was stopped. It runs in its own session (forked from the stage template
when the job has one), its output is read as it comes, so a chatty child never blocks on a full pipe, and
is kept, redacted, in its log once it ends; `close()` kills it with everything it started.
"""

from __future__ import annotations

import os
import signal
import subprocess
import threading
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO

from worker.job.supervisor import start_process

if TYPE_CHECKING:
    from schemas.secrets import Redactor
    from worker.job.template import ForkedChild, StageTemplate


class SideChild:
    """One running helper child; `noise`: the prefix of its progress lines, left out of its log."""

    def __init__(
        self,
        proc: subprocess.Popen[bytes] | ForkedChild,
        output: BinaryIO,
        log: Path,
        redactor: Redactor,
        noise: bytes = b"",
    ):
        self.proc, self.log, self.redactor, self.noise = proc, log, redactor, noise
        self.output: list[bytes] = []
        self.kept = False
        self.reader = threading.Thread(target=self._read, args=(output,), name=f"{log.stem}-output", daemon=True)
        self.reader.start()

    @staticmethod
    def launch(
        argv: list[str], env: Mapping[str, str], template: StageTemplate | None = None
    ) -> tuple[subprocess.Popen[bytes] | ForkedChild, BinaryIO]:
        """(the child, the read end of its stdout and stderr)."""
        read_fd, write_fd = os.pipe()
        try:
            proc = start_process(argv, env, template, write_fd, write_fd)
        except BaseException:
            os.close(read_fd)
            raise
        finally:
            os.close(write_fd)  # the child holds its own copy: the pipe ends with it
        return proc, os.fdopen(read_fd, "rb")

    def _read(self, output: BinaryIO) -> None:
        with output:
            for line in output:
                self.output.append(line)

    def running(self) -> bool:
        return self.proc.poll() is None

    def close(self) -> None:
        """Kill the child if it still runs, and keep what it printed (redacted) in its log."""
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)  # its own session: its threads and children go with it
            except ProcessLookupError:
                pass
            self.proc.wait()
        self.keep_output()

    def keep_output(self) -> None:
        """Once the child has ended: its output, redacted, in its log (once; an earlier attempt's is replaced)."""
        if self.kept:
            return
        self.kept = True
        self.reader.join()  # the pipe's end came with the child's
        self.log.parent.mkdir(parents=True, exist_ok=True)
        text = b"".join(line for line in self.output if not self._noise(line)).decode(errors="replace")
        self.log.write_text(self.redactor.text(text), encoding="utf-8")

    def last_line(self) -> str:
        """The child's last line of its own (not a progress line), redacted: why it failed."""
        lines = [line for line in self.output if line.strip() and not self._noise(line)]
        last = lines[-1].decode(errors="replace").strip() if lines else f"exit code {self.proc.returncode}"
        return self.redactor.text(last)

    def _noise(self, line: bytes) -> bool:
        return bool(self.noise) and line.startswith(self.noise)
