"""Run a TFLite file with LiteRT where a native crash cannot take the process down.

    from qtoolkit import contained
    try:
        outputs = contained.predict(data, [x])        # what verify.LiteRTModel(data).predict([x]) returns
    except contained.RuntimeAbortError as e:
        print(f"error: {e}")                          # LiteRT aborted (SIGABRT) while running the TFLite file

Some LiteRT kernels abort instead of returning an error: with ai-edge-litert
2.3.0 the TFLite converter's int16x8 file of a transformer block (a tf_keras
LayerNormalization alone is enough) aborts inside `invoke`: exit code 134 and
not a word on stderr.  `predict` runs `verify.LiteRTModel(...).predict` in a
child process: the outputs come back through a pipe, a Python exception is
raised again in the parent (same type and message), and a child killed by a
signal becomes one `RuntimeAbortError` line naming the signal.  `aborts` asks
the same of another file (the converter's own) and `predict_explained` puts
both halves in one message.

Why a forked child per call.  Measured on the 2-core test machine (TensorFlow
loaded, a small int8 model, 40 samples; `python tests/test_contained.py`
prints it; the ranges are the machine's load):
  * in-process `LiteRTModel(data).predict`:           0.5-2 ms
  * forked child (the default on Linux):              20-60 ms per call with
    an 850 MB process, ~32 ms at 1 GB (the fork copies page tables, ~5 ms;
    the child's first writes copy pages)
  * a spawned `python` importing only LiteRT+NumPy:   230-430 ms per call
  * a first probe in a child, then the run in-process: the fork cost plus a
    second interpreter build, and it misses a crash only some samples cause:
    no cheaper than running every sample in the child.
A ptq run takes seconds and verifies once, so ~25 ms is noise, and every
verification sample runs contained.

Forking a multi-threaded TensorFlow process is safe as long as the child
touches nothing of TensorFlow's: it builds a new LiteRT interpreter, uses
NumPy, and leaves with `os._exit` (no atexit hooks, no flushing of the
parent's buffers).  The garbage collector is off in the child from the fork
on (it is turned off around `os.fork`): collecting the parent's garbage there
runs TensorFlow finalizers that need threads the child does not have, and the
child segfaults (measured: `gc.collect()` in a child forked after a conversion
dies by SIGSEGV; so did an occasional test while only the child's first line
turned the collector off, as Python's own after-fork hooks can start a
collection).  The child writes no core file and has Python's faulthandler
off, so an abort costs no more than a normal run.  An answered child is
reaped on a later call instead of waited for (unmapping ~1 GB at its exit
takes ~10 ms).  Elsewhere than Linux (fork after macOS frameworks is unsafe;
no fork on Windows) a spawned child is used; `method="spawn"` forces it.
"""

from __future__ import annotations

import gc
import os
import pickle
import signal
import subprocess
import sys
import threading
import warnings
from typing import Callable, Optional

from qtoolkit.errors import RuntimeAbortError

__all__ = ["RuntimeAbortError", "predict", "aborts", "predict_explained", "with_baseline"]

_FORK = sys.platform.startswith("linux")
_DONE = b"qtoolkit-contained-done\n"  # starts a forked child's complete answer
_unreaped: list[int] = []  # forked children that answered and are exiting
_forking = threading.Lock()


def predict(data: bytes, inputs, batch_size: int = 32, num_threads: int = 1,
            what: str = "the TFLite file", method: Optional[str] = None):
    """`verify.LiteRTModel(data, num_threads, batch_size).predict(inputs)`, run in a child process.

    Args:
      data: the flatbuffer bytes.
      inputs: an array, or a list with one float array per model input (samples on axis 0).
      batch_size, num_threads: as for `verify.LiteRTModel`.
      what: how the message names the file ("the int16x8 file").
      method: "fork" (the default on Linux) or "spawn" (elsewhere).

    Returns:
      Exactly what `LiteRTModel.predict` returns: one float32 array, or a list if several outputs.

    Raises:
      RuntimeAbortError: LiteRT crashed (the message names the signal); the calling process is unharmed.
      Any exception `LiteRTModel` raises (ValueError, ...), with its type and message.
    """
    request = (bytes(data), inputs, batch_size, num_threads)
    method = method or ("fork" if _FORK else "spawn")
    if method not in ("fork", "spawn"):
        raise ValueError(f"method must be 'fork' or 'spawn', got {method!r}")
    return _result(*(_run_forked if method == "fork" else _run_spawned)(request), what)


def aborts(data: bytes, inputs, batch_size: int = 32, num_threads: int = 1) -> bool:
    """True when LiteRT crashes running `data` on `inputs` (in a child process); False when it runs.

    A Python error (e.g. inputs that do not fit the file) is raised, not counted as a crash.
    """
    try:
        predict(data, inputs, batch_size, num_threads)
    except RuntimeAbortError:
        return True
    return False


def with_baseline(error: RuntimeAbortError, baseline_aborts: Optional[bool], scheme: str) -> RuntimeAbortError:
    """The error with the second half of the message: does the TFLite converter's own `scheme` file crash too?

    `baseline_aborts` None means the file that crashed is the converter's own (int16x8, weight-only,
    a SavedModel): there is no other file to try.
    """
    verb = "aborts" if error.signal_name == "SIGABRT" else "crashes"
    fix = "try another scheme (e.g. int8)" if scheme != "int8" else "try another ai-edge-litert version"
    if baseline_aborts is None:
        tail = (f"the file is the TFLite converter's own {scheme} conversion, so the converter's own file {verb} "
                f"too (not a qtoolkit fault); {fix}")
    elif baseline_aborts:
        tail = f"the converter's own {scheme} file {verb} too (not a qtoolkit fault); {fix}"
    else:
        tail = (f"the converter's own {scheme} file runs: qtoolkit's file makes LiteRT crash; please report it "
                "with the model")
    return RuntimeAbortError(f"{error}; {tail}", error.signal_name)


def predict_explained(data: bytes, inputs, scheme: str,
                      converter_file: Optional[Callable[[], bytes]] = None, **kwargs):
    """`predict`, with a crash's message saying whether the converter's own file crashes too.

    Args:
      data: the flatbuffer bytes.
      inputs: as for `predict`.
      scheme: the scheme's name, for the message ("int16x8").
      converter_file: builds the TFLite converter's own file for the same model and scheme (called only
        after a crash; if it raises, the message says so), or None when `data` already is the converter's
        own file.
      kwargs: batch_size, num_threads, method, as for `predict`.
    """
    try:
        return predict(data, inputs, what=f"the {scheme} file", **kwargs)
    except RuntimeAbortError as e:
        if converter_file is None:
            raise with_baseline(e, None, scheme) from None
        try:
            baseline = aborts(converter_file(), inputs, kwargs.get("batch_size", 32))
        except Exception as failed:  # noqa: BLE001  (the comparison is a courtesy; the crash is the error)
            first = (str(failed).strip().splitlines() or [type(failed).__name__])[0]
            raise RuntimeAbortError(f"{e}; the converter's own {scheme} file could not be made or run to "
                                    f"compare ({first})", e.signal_name) from None
        raise with_baseline(e, baseline, scheme) from None


# --- the child --------------------------------------------------------------------------------------------------

def _child_work(request) -> bytes:
    """Runs the request; the pickled ("ok", outputs) or ("error", exception). Never raises."""
    data, inputs, batch_size, num_threads = request
    try:
        from qtoolkit import verify

        outputs = verify.LiteRTModel(data, num_threads=num_threads, batch_size=batch_size).predict(inputs)
        return pickle.dumps(("ok", outputs), protocol=pickle.HIGHEST_PROTOCOL)
    except BaseException as e:  # noqa: BLE001  (everything goes back to the parent)
        try:
            return pickle.dumps(("error", e), protocol=pickle.HIGHEST_PROTOCOL)
        except Exception:  # noqa: BLE001  (an exception that does not pickle: its type name and text)
            return pickle.dumps(("error", RuntimeError(f"{type(e).__name__}: {e}")))


def _quiet_crash() -> None:
    """A crash in this (child) process writes no core file and no faulthandler traceback."""
    try:
        import resource

        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    except (ImportError, ValueError, OSError):
        pass
    import faulthandler

    faulthandler.disable()


def _run_forked(request) -> tuple[Optional[int], int, bytes]:
    """(signal that killed the child or None, its exit code, the bytes it wrote)."""
    import ai_edge_litert.interpreter  # noqa: F401  (imported once here, not in every child)

    _reap_finished()
    parent = os.getpid()
    read_fd, write_fd = os.pipe()
    # No garbage collection in the child, from its first instruction (Python's own after-fork hooks allocate):
    # the parent's garbage includes TensorFlow objects whose finalizers crash there.
    with _forking:  # two threads forking at once must not turn the collector back on for each other
        collecting = gc.isenabled()
        gc.disable()
        try:
            with warnings.catch_warnings():
                # Python 3.12+ warns on fork() in a multi-threaded process; the child touches no other thread's state.
                warnings.filterwarnings("ignore", "This process .* is multi-threaded", DeprecationWarning)
                pid = os.fork()
        except BaseException:
            os.close(read_fd)
            os.close(write_fd)
            raise
        finally:
            if collecting and os.getpid() == parent:
                gc.enable()
    if pid == 0:  # the child: never returns
        try:
            os.close(read_fd)
            _quiet_crash()
            signal.signal(signal.SIGINT, signal.SIG_DFL)  # Ctrl-C ends the child at once, even inside invoke
            payload = _DONE + _child_work(request)
            view = memoryview(payload)
            while view:
                view = view[os.write(write_fd, view):]
        finally:
            os._exit(0)
    os.close(write_fd)
    try:
        payload = _read_all(read_fd)
        if payload.startswith(_DONE):
            # A whole answer: the child only has to exit; it is reaped on a later call rather than waited for.
            _unreaped.append(pid)
            return None, 0, payload[len(_DONE):]
        _, status = os.waitpid(pid, 0)
    except BaseException:
        # Ctrl-C or SIGTERM in the parent: end the child too, and reap it.
        _kill_and_reap(pid)
        raise
    finally:
        os.close(read_fd)
    if os.WIFSIGNALED(status):
        return os.WTERMSIG(status), -1, payload
    return None, os.WEXITSTATUS(status) if os.WIFEXITED(status) else -1, payload


def _reap_finished() -> None:
    for pid in list(_unreaped):
        try:
            done, _ = os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:  # reaped by someone else's os.wait()
            done = pid
        if done:
            _unreaped.remove(pid)


def _kill_and_reap(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
    except (ProcessLookupError, ChildProcessError):
        pass


def _read_all(fd: int) -> bytes:
    chunks = []
    while True:
        chunk = os.read(fd, 1 << 20)
        if not chunk:
            return b"".join(chunks)
        chunks.append(chunk)


def _run_spawned(request) -> tuple[Optional[int], int, bytes]:
    """A fresh `python` that imports only qtoolkit.verify (NumPy, LiteRT); the request on stdin."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")])))
    code = "from qtoolkit.contained import _spawned_main; _spawned_main()"
    proc = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env)
    try:
        payload, _ = proc.communicate(pickle.dumps(request, protocol=pickle.HIGHEST_PROTOCOL))
    except BaseException:
        proc.kill()
        proc.wait()
        raise
    code = proc.returncode  # -N: killed by signal N (POSIX)
    return (-code, -1, payload) if code < 0 else (None, code, payload)


def _spawned_main() -> None:
    _quiet_crash()
    answer = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)  # anything LiteRT prints goes to stderr, not into the answer
    request = pickle.loads(sys.stdin.buffer.read())
    answer.write(_child_work(request))
    answer.flush()


def _result(signum: Optional[int], code: int, payload: bytes, what: str):
    """The child's outputs, its exception raised again, or a RuntimeAbortError for a crash."""
    if signum is not None:
        try:
            name = signal.Signals(signum).name
        except ValueError:
            name = f"signal {signum}"
        if name in ("SIGINT", "SIGTERM"):  # Ctrl-C reaches the child too: the run was interrupted
            raise KeyboardInterrupt(name)
        verb = {"SIGABRT": "aborted", "SIGKILL": "was killed"}.get(name, "crashed")
        hint = " (out of memory?)" if name == "SIGKILL" else ""
        raise RuntimeAbortError(f"LiteRT {verb} ({name}{hint}) while running {what}", name)
    try:
        kind, value = pickle.loads(payload)
    except Exception:  # noqa: BLE001  (nothing, or half an answer: the child ended another way)
        raise RuntimeAbortError(f"LiteRT's process ended (exit code {code}) without a result while running "
                                f"{what}") from None
    if kind == "error":
        raise value
    return value
