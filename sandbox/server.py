"""The session server: one persistent Python interpreter that runs untrusted cells, inside the jail or container.

Runs under any Python >= 3.8 with the standard library only (Debian's /usr/bin/python3 in the Docker image, the
host interpreter under bubblewrap). Both backends start it the same way and talk to it over stdin/stdout:

* At start-up the server moves the protocol off fds 0/1 onto private high fds, points fd 0 at /dev/null and fds 1/2
  at anonymous memory files. So user code that prints, `os.write(1, ...)`s, closes stdout or spawns noisy children
  can never corrupt the protocol: fd 1 is no longer the pipe the host reads.
* Frames are length-prefixed: MAGIC(4) + big-endian u32 length + body. A request body is JSON. A response body is
  u32 json-length + JSON + raw stdout bytes + raw stderr bytes (the host decodes with errors='replace', so NUL bytes
  and invalid UTF-8 are harmless).
* Output is capped per call at `max_output_bytes` (stdout+stderr together) while it is written: 100 MB of prints
  costs no memory here, only a `truncated` flag.

Semantics are a notebook's: one globals dict for the whole session, the value of a trailing expression is echoed
(like the REPL), `sys.exit()` ends the cell (status `exited`) but not the session, MemoryError is status `memory`.
Death of this process (segfault, os._exit, kill, CPU limit) is detected by the host, which reports it and starts a
fresh server for the next call.
"""

from __future__ import annotations

import ast
import builtins
import contextlib
import io
import json
import linecache
import os
import resource
import signal
import struct
import sys
import time
import traceback
import types

MAGIC = b"ALP1"
HEADER = struct.Struct(">4sI")
U32 = struct.Struct(">I")
MAX_REQUEST_BYTES = 64 * 1024 * 1024
TRACEBACK_RESERVE = 8192  # a traceback is always kept (its tail), even after prints used up the output budget

_RLIMITS = {
    "as": resource.RLIMIT_AS,
    "cpu": resource.RLIMIT_CPU,
    "fsize": resource.RLIMIT_FSIZE,
    "nofile": resource.RLIMIT_NOFILE,
    "nproc": resource.RLIMIT_NPROC,
    "core": resource.RLIMIT_CORE,
}


# ----------------------------------------------------------------------------------------------- framing (shared)
def encode_frame(body: bytes) -> bytes:
    return HEADER.pack(MAGIC, len(body)) + body


def encode_response(meta: dict, out: bytes = b"", err: bytes = b"") -> bytes:
    meta = dict(meta, stdout_len=len(out), stderr_len=len(err))
    js = json.dumps(meta).encode()
    return encode_frame(U32.pack(len(js)) + js + out + err)


def decode_response(body: bytes) -> tuple[dict, bytes, bytes]:
    (n,) = U32.unpack_from(body, 0)
    meta = json.loads(body[4 : 4 + n])
    a = 4 + n + int(meta["stdout_len"])
    return meta, body[4 + n : a], body[a : a + int(meta["stderr_len"])]


def _read_exact(fd: int, n: int) -> bytes | None:
    buf = bytearray()
    while len(buf) < n:
        chunk = os.read(fd, n - len(buf))
        if not chunk:
            return None
        buf += chunk
    return bytes(buf)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


# ----------------------------------------------------------------------------------------------- capped output
class Budget:
    """Bytes of output one cell may still produce; shared by stdout and stderr."""

    def __init__(self, limit: int):
        self.remaining = limit
        self.truncated = False


class CappedSink(io.RawIOBase):
    """Binary sink that keeps at most the budget and silently drops (but flags) the rest."""

    def __init__(self, budget: Budget, fd: int):
        self.budget, self.parts, self._fd = budget, [], fd

    def writable(self) -> bool:
        return True

    def fileno(self) -> int:  # children and C code writing here end up in the fd-level capture
        return self._fd

    def write(self, b) -> int:
        n = len(b)
        take = min(n, self.budget.remaining)
        if take > 0:
            self.parts.append(bytes(memoryview(b)[:take]))
            self.budget.remaining -= take
        if take < n:
            self.budget.truncated = True
        return n

    def getvalue(self) -> bytes:
        return b"".join(self.parts)


class CappedText(io.TextIOBase):
    """sys.stdout/sys.stderr replacement: encodes only what fits, so print('x' * 10**8) stays cheap."""

    def __init__(self, sink: CappedSink):
        self.buffer = sink

    encoding = "utf-8"
    errors = "backslashreplace"

    def writable(self) -> bool:
        return True

    def isatty(self) -> bool:
        return False

    def fileno(self) -> int:
        return self.buffer.fileno()

    def write(self, s) -> int:
        if not isinstance(s, str):
            raise TypeError(f"write() argument must be str, not {type(s).__name__}")
        budget = self.buffer.budget
        if budget.remaining <= 0:
            if s:
                budget.truncated = True
            return len(s)
        cut = len(s) > budget.remaining
        self.buffer.write(s[: budget.remaining].encode("utf-8", "backslashreplace"))
        if cut:
            budget.truncated = True
        return len(s)


# ----------------------------------------------------------------------------------------------- the server
class Server:
    def __init__(self, opts: dict):
        self.max_output = int(opts.get("max_output_bytes", 65536))
        self.pid = os.getpid()
        self.cells = 0
        main = types.ModuleType("__main__")
        main.__dict__["__builtins__"] = builtins
        sys.modules["__main__"] = main  # user code sees itself as __main__, not this server module
        self.ns = main.__dict__
        self._setup_fds()
        self._apply_limits(opts)
        os.register_at_fork(after_in_child=self._after_fork_in_child)

    # fds ------------------------------------------------------------------------------------------------------
    def _setup_fds(self) -> None:
        self.proto_in = os.dup(0)
        self.proto_out = os.dup(1)
        for fd in (self.proto_in, self.proto_out):
            os.set_inheritable(fd, False)
        null = os.open(os.devnull, os.O_RDONLY)
        os.dup2(null, 0)
        os.close(null)
        mk = getattr(os, "memfd_create", None)
        self.cap_fds = [mk("alp-stdout") if mk else _tmpfile(), mk("alp-stderr") if mk else _tmpfile()]
        for fd in self.cap_fds:
            os.set_inheritable(fd, False)
        self._point_std_fds()
        sys.stdin = io.StringIO("")

    def _point_std_fds(self) -> None:
        os.dup2(self.cap_fds[0], 1)
        os.dup2(self.cap_fds[1], 2)
        for fd in self.cap_fds:
            os.ftruncate(fd, 0)
            os.lseek(fd, 0, os.SEEK_SET)

    def _after_fork_in_child(self) -> None:
        """A forked child must never speak the protocol; its prints go to the fd-level capture instead."""
        for fd in (self.proto_in, self.proto_out):
            with contextlib.suppress(OSError):
                os.close(fd)
        self.proto_in = self.proto_out = -1
        try:
            sys.stdout = io.TextIOWrapper(io.FileIO(1, "w", closefd=False), write_through=True)
            sys.stderr = io.TextIOWrapper(io.FileIO(2, "w", closefd=False), write_through=True)
        except Exception:  # noqa: BLE001, S110 - the child keeps the capped writers then
            pass

    def _apply_limits(self, opts: dict) -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # writes past RLIMIT_FSIZE fail with EFBIG, not death
        for name, value in (opts.get("rlimits") or {}).items():
            soft, hard = (value, value) if isinstance(value, int) else value
            try:
                resource.setrlimit(_RLIMITS[name], (soft, hard))
            except (ValueError, OSError) as e:  # e.g. nproc without privileges; the backend has other limits
                sys.stderr.write(f"sandbox: cannot set rlimit {name}: {e}\n")
        uid, gid = opts.get("uid"), opts.get("gid")
        if uid is not None and os.getuid() == 0:
            os.setgroups([])
            os.setresgid(
                gid if gid is not None else uid, gid if gid is not None else uid, gid if gid is not None else uid
            )
            os.setresuid(uid, uid, uid)  # drops every capability: the cell runs as an unprivileged user
        if opts.get("cwd"):
            with contextlib.suppress(OSError):
                os.chdir(opts["cwd"])

    # protocol -------------------------------------------------------------------------------------------------
    def serve(self) -> None:
        _write_all(self.proto_out, encode_response({"ready": True, "pid": self.pid, "python": sys.version.split()[0]}))
        while True:
            head = _read_exact(self.proto_in, HEADER.size)
            if head is None:
                return
            magic, n = HEADER.unpack(head)
            if magic != MAGIC or n > MAX_REQUEST_BYTES:
                return
            body = _read_exact(self.proto_in, n)
            if body is None:
                return
            req = json.loads(body)
            if req.get("op") == "ping":
                reply = encode_response({"status": "ok"})
            else:
                reply = self.run_cell(req.get("code", ""))
            if os.getpid() != self.pid:  # a forked child escaped user code: die quietly
                os._exit(0)
            _write_all(self.proto_out, reply)

    def run_cell(self, code: str) -> bytes:
        self.cells += 1
        filename = f"<cell-{self.cells}>"
        budget = Budget(self.max_output)
        out = CappedText(CappedSink(budget, 1))
        err = CappedText(CappedSink(budget, 2))
        self._point_std_fds()
        sys.stdout, sys.stderr = out, err
        status, exit_code, tb_text = "ok", None, ""
        start = time.perf_counter()
        try:
            linecache.cache[filename] = (len(code), None, code.splitlines(True), filename)
            self._execute(code, filename)
        except SystemExit as e:
            status, exit_code = "exited", _exit_code(e, err)
        except MemoryError:
            status, tb_text = "memory", _format_exc(skip=1)
        except BaseException:  # noqa: BLE001 - any exception of the cell is its result
            status, tb_text = "error", _format_exc(skip=1)
        finally:
            duration = time.perf_counter() - start
            if os.getpid() != self.pid:
                os._exit(1)
            sys.stdout, sys.stderr = sys.__stdout__, sys.__stderr__
        out_b = out.buffer.getvalue() + self._drain(0, budget)
        err_b = err.buffer.getvalue() + self._drain(1, budget)
        if tb_text:
            tb = tb_text.encode("utf-8", "backslashreplace")
            if len(tb) > max(TRACEBACK_RESERVE, budget.remaining):
                tb = b"...\n" + tb[-TRACEBACK_RESERVE:]
            err_b += tb
        meta = {"status": status, "exit_code": exit_code, "truncated": budget.truncated, "duration_s": duration}
        return encode_response(meta, out_b, err_b)

    def _execute(self, code: str, filename: str) -> None:
        tree = ast.parse(code, filename, "exec")
        last = None
        if tree.body and isinstance(tree.body[-1], ast.Expr):
            last = ast.Expression(tree.body.pop().value)
        if tree.body:
            exec(compile(tree, filename, "exec"), self.ns)  # noqa: S102 - running the cell is the point
        if last is not None:
            value = eval(compile(last, filename, "eval"), self.ns)
            if value is not None:
                self.ns["_"] = value
                sys.stdout.write(repr(value) + "\n")

    def _drain(self, i: int, budget: Budget) -> bytes:
        """Read what children / C code wrote to fd 1 or 2 during the cell, within the remaining budget."""
        fd = self.cap_fds[i]
        try:
            size = os.fstat(fd).st_size
            if size == 0:
                return b""
            take = min(size, max(budget.remaining, 0))
            if size > take:
                budget.truncated = True
            data = os.pread(fd, take, 0) if take else b""
            budget.remaining -= len(data)
            return data
        except OSError:
            return b""


def _exit_code(e: SystemExit, err: CappedText):
    code = e.code
    if code is None or isinstance(code, int):
        return 0 if code is None else code
    err.write(str(code) + "\n")
    return 1


def _format_exc(skip: int) -> str:
    etype, value, tb = sys.exc_info()
    for _ in range(skip):
        if tb is not None and tb.tb_next is not None:
            tb = tb.tb_next
    # Drop the server's own frames (_execute) so the model sees only its cell.
    while tb is not None and tb.tb_frame.f_code.co_filename == _SERVER_FILE:
        tb = tb.tb_next
    try:
        return "".join(traceback.format_exception(etype, value, tb))
    except BaseException:  # noqa: BLE001 - a broken __str__ must not kill the server
        return "{}: <unprintable>\n".format(getattr(etype, "__name__", "Exception"))


_SERVER_FILE = Server._execute.__code__.co_filename  # also right when started as `python -c SOURCE`


def _tmpfile() -> int:
    import tempfile

    fd, path = tempfile.mkstemp()
    os.unlink(path)
    return fd


def main(argv: list[str]) -> None:
    opts = json.loads(argv[1]) if len(argv) > 1 else {}
    Server(opts).serve()


if __name__ == "__main__":
    main(sys.argv)
