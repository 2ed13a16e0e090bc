"""Re-encode every video under a folder to 3 fps with short side 224 and no audio, as the original's script.

    python preprocess/compress_video.py --input_root raw_videos --output_root compressed_videos

Every file found by a recursive walk of ``--input_root`` goes to ``--output_root/<file name>`` (flat, same name and
extension). Outputs that already exist and are non-empty are skipped, so an interrupted run can be resumed.
Where ffmpeg fails, the source file is copied in its place, as the original tool does; each such failure is
reported with ffmpeg's last error line, listed in the final summary, and recorded in
``--output_root/.compress_video.failed.json`` (an input of that name is refused: the record never overwrites an
output), so that a re-run reports it again (and exits 1) instead of counting the copy as done. Delete a copied output
to have it re-encoded. An input that cannot be read at all (a symlink loop, a dangling symlink) is reported and
nothing is written for it.

Differences from the original:
- portrait videos get width 224 and height 224/aspect (the original computed 224*aspect and squashed them);
- two inputs with the same file name are refused before anything is written (the original overwrote one);
- outputs are written under a temporary name and renamed, so an interrupted run leaves no truncated file behind
  that a later run would skip; a folder for the outputs inside ``--input_root`` is not itself walked;
- Ctrl-C (or an ffmpeg killed by a signal) is not a failure to copy over: the run stops, removes its partial
  outputs and exits 130;
- exit status 1 when any file failed (its source was still copied), 0 otherwise, 2 for bad arguments.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:  # run as a script from anywhere: the package root is this file's parent folder
    sys.path.insert(0, ROOT)

from util import UsageError, atomic_path, atomic_write_text, remove_stale_temporaries  # noqa: E402

FPS = 3
# The failure record, in the output folder. The name is reserved (an input of that name is refused), so the record
# never overwrites an output; earlier versions wrote ``.failed.json``, still read when it is a record.
FAILED_MANIFEST = ".compress_video.failed.json"
LEGACY_MANIFEST = ".failed.json"
# ffmpeg exits 255 when a signal (Ctrl-C reaches the whole process group) stopped it.
FFMPEG_INTERRUPTED = 255
SHORT_SIDE = 224

# a = input width / height. Landscape (a > 1): height 224, width the even number at or below 224*a.
# Otherwise: width 224, height the even number at or below 224/a. The quotes protect the commas inside the
# expressions from ffmpeg's filter-graph parser.
SCALE_FILTER = f"scale='if(gt(a,1),trunc(oh*a/2)*2,{SHORT_SIDE})':'if(gt(a,1),{SHORT_SIDE},trunc(ow/a/2)*2)'"


class NameCollisionError(ValueError):
    """Two input files would be written to the same output path."""


class Interrupted(Exception):
    """The run was stopped (Ctrl-C, or ffmpeg killed by a signal); not a failure of the file."""


@dataclass(frozen=True)
class Outcome:
    """What happened to one input file."""

    src: Path
    dst: Path
    # "compressed", "skipped", "copied" (ffmpeg failed, the source was copied) or "unreadable" (nothing written)
    status: str
    error: str = ""  # ffmpeg's last error line when "copied", the reason when "unreadable"


def find_ffmpeg() -> str:
    """The ffmpeg on PATH, else the binary shipped by the ``imageio-ffmpeg`` package."""
    exe = shutil.which("ffmpeg")
    if exe:
        return exe
    try:
        import imageio_ffmpeg
    except ImportError:
        raise RuntimeError(
            "no ffmpeg found: put an ffmpeg binary on PATH, or `pip install imageio-ffmpeg` (ships one)"
        ) from None
    return imageio_ffmpeg.get_ffmpeg_exe()


def build_ffmpeg_command(ffmpeg: str, src: Path, dst: Path) -> list[str]:
    """The ffmpeg call that writes ``src`` re-encoded to ``dst``: 3 fps, short side 224, video streams only."""
    return [
        ffmpeg,
        "-nostdin",
        "-hide_banner",
        "-loglevel",
        "error",
        "-y",
        "-i",
        str(src),
        "-filter:v",
        SCALE_FILTER,
        "-map",
        "0:v",
        "-an",
        "-r",
        str(FPS),
        str(dst),
    ]


def _walk_files(root: Path, exclude: Path) -> Iterable[Path]:
    for dirpath, dirnames, filenames in os.walk(root):
        # Never treat our own outputs as inputs when the output folder sits inside the input folder.
        dirnames[:] = sorted(d for d in dirnames if Path(dirpath, d).resolve() != exclude)
        for name in sorted(filenames):
            yield Path(dirpath, name)


def plan_outputs(input_root: Path, output_root: Path) -> list[tuple[Path, Path]]:
    """(source, output) for every file under ``input_root``; raises NameCollisionError on clashing names."""
    input_root, output_root = Path(input_root), Path(output_root)
    if not input_root.is_dir():
        raise FileNotFoundError(f"--input_root {input_root} is not a folder")
    if input_root.resolve() == output_root.resolve():
        raise ValueError(f"--input_root and --output_root must differ (both are {input_root})")
    if output_root.exists() and not output_root.is_dir():
        raise UsageError(f"--output_root {output_root}: expected a folder (or a path to create), found a file")
    by_name: dict[str, list[Path]] = {}
    for src in _walk_files(input_root, output_root.resolve()):
        by_name.setdefault(src.name, []).append(src)
    if FAILED_MANIFEST in by_name:
        raise NameCollisionError(
            f"{by_name[FAILED_MANIFEST][0]}: {FAILED_MANIFEST} is the name of this tool's failure record in "
            f"{output_root}; rename this input"
        )
    clashes = {name: srcs for name, srcs in by_name.items() if len(srcs) > 1}
    if clashes:
        lines = [f"  {name}: " + ", ".join(str(s) for s in srcs) for name, srcs in sorted(clashes.items())]
        raise NameCollisionError(
            f"{len(clashes)} output name(s) in {output_root} would be written by more than one input "
            "(outputs are flat, named like the input file); rename these inputs:\n" + "\n".join(lines)
        )
    return [(srcs[0], output_root / name) for name, srcs in sorted(by_name.items())]


def _last_line(text: str) -> str:
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[-1] if lines else "no error message"


class _Runs:
    """The ffmpeg processes running now, so that a Ctrl-C can stop them all and start no more."""

    def __init__(self) -> None:
        self.stopped = threading.Event()
        self._lock = threading.Lock()
        self._procs: set = set()

    def run(self, command: list[str]) -> tuple[int, str]:
        """(return code, stderr) of ``command``; Interrupted when the run was stopped or ffmpeg was killed."""
        with self._lock:
            if self.stopped.is_set():
                raise Interrupted()
            proc = subprocess.Popen(
                command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, errors="replace"
            )
            self._procs.add(proc)
        try:
            _, stderr = proc.communicate()
        finally:
            with self._lock:
                self._procs.discard(proc)
        if self.stopped.is_set() or proc.returncode < 0 or proc.returncode == FFMPEG_INTERRUPTED:
            raise Interrupted()
        return proc.returncode, stderr

    def stop(self) -> None:
        with self._lock:
            self.stopped.set()
            for proc in self._procs:
                proc.send_signal(signal.SIGINT)


def compress_one(ffmpeg: str, src: Path, dst: Path, runs: _Runs | None = None) -> Outcome:
    """Re-encode ``src`` to ``dst`` unless ``dst`` is already non-empty; copy ``src`` there if ffmpeg fails.

    Interrupted (and nothing written) when ffmpeg was stopped by a signal rather than failing on the file.
    """
    if dst.is_file() and dst.stat().st_size > 0:
        return Outcome(src, dst, "skipped")
    if not src.is_file():  # followed symlinks: a loop or a dangling link has nothing to read
        return Outcome(src, dst, "unreadable", "not a file (a symlink loop or a dangling symlink)")
    runs = runs or _Runs()
    try:
        with atomic_path(dst, sync=False) as tmp:
            code, stderr = runs.run(build_ffmpeg_command(ffmpeg, src, tmp))
            if code == 0 and tmp.is_file() and tmp.stat().st_size > 0:
                return Outcome(src, dst, "compressed")
            error = _last_line(stderr) if code != 0 else "ffmpeg wrote an empty file"
            shutil.copyfile(src, tmp)
    except OSError as exc:  # the source vanished or cannot be read: this file fails, the run goes on
        return Outcome(src, dst, "unreadable", f"cannot copy it ({exc.strerror or exc})")
    return Outcome(src, dst, "copied", error)


def _read_failures(output_root: Path, outputs: set[str]) -> dict[str, dict]:
    """{output name: {src, error, size, mtime_ns}} of the copies earlier runs made; {} when there is no record.

    An earlier version's ``.failed.json`` is read when this run writes no output of that name.
    """
    path = output_root / FAILED_MANIFEST
    if not path.exists() and LEGACY_MANIFEST not in outputs and (output_root / LEGACY_MANIFEST).is_file():
        path = output_root / LEGACY_MANIFEST
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {}
    except (ValueError, UnicodeDecodeError) as exc:
        raise ValueError(
            f"{path}: not the JSON this tool writes ({exc}); delete it and the outputs it lists to redo them"
        ) from None
    if not isinstance(record, dict) or not all(
        isinstance(v, dict) and {"src", "error", "size", "mtime_ns"} <= set(v) for v in record.values()
    ):
        raise ValueError(
            f"{path}: expected {{output name: {{src, error, size, mtime_ns}}}}; delete it and the "
            f"outputs it lists to redo them"
        )
    return record


def _recorded_failure(src: Path, dst: Path, failures: dict[str, dict]) -> Outcome | None:
    """The earlier run's failure for ``dst``, when ``dst`` is still that run's copy (not replaced since)."""
    entry = failures.get(dst.name)
    if entry is None or not dst.is_file():
        return None
    st = dst.stat()
    if (st.st_size, st.st_mtime_ns) != (entry["size"], entry["mtime_ns"]):
        return None
    return Outcome(src, dst, "copied", f"{entry['error']} (recorded by an earlier run)")


def _write_failures(
    output_root: Path, outcomes: Sequence[Outcome], earlier: dict[str, dict], legacy: bool = False
) -> None:
    """Record this run's copies, and the earlier ones this run did not reach (stopped before them)."""
    done = {o.dst.name for o in outcomes}
    record = {
        name: entry
        for name, entry in earlier.items()
        if name not in done and _recorded_failure(Path(entry["src"]), output_root / name, earlier)
    }
    for o in outcomes:
        if o.status == "copied":
            if _recorded_failure(o.src, o.dst, earlier):
                record[o.dst.name] = earlier[o.dst.name]
            else:
                st = o.dst.stat()
                record[o.dst.name] = {
                    "src": str(o.src),
                    "error": o.error,
                    "size": st.st_size,
                    "mtime_ns": st.st_mtime_ns,
                }
    path = output_root / FAILED_MANIFEST
    if record:
        atomic_write_text(json.dumps(record, indent=1, sort_keys=True) + "\n", path)
    else:
        path.unlink(missing_ok=True)
    if legacy:  # its entries are in the new record now
        (output_root / LEGACY_MANIFEST).unlink(missing_ok=True)


def default_num_workers() -> int:
    """All cores this process may use."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def compress_all(
    input_root: Path, output_root: Path, num_workers: int | None = None, ffmpeg: str | None = None
) -> list[Outcome]:
    """Compress every file under ``input_root`` into ``output_root``, ``num_workers`` ffmpeg processes at a time.

    Raises Interrupted (or KeyboardInterrupt) when stopped; the files finished so far stay, with their failures
    recorded, and no partial output is left.
    """
    output_root = Path(output_root)
    pairs = plan_outputs(Path(input_root), output_root)  # raises before anything is written
    ffmpeg = ffmpeg or find_ffmpeg()
    _check_writable(output_root)
    remove_stale_temporaries(output_root)  # partial outputs of a run that was killed outright
    outputs = {dst.name for _, dst in pairs}
    failures = _read_failures(output_root, outputs)
    legacy = not (output_root / FAILED_MANIFEST).exists() and bool(failures)
    num_workers = num_workers or default_num_workers()
    runs = _Runs()
    outcomes: list[Outcome] = []

    def one(pair: tuple[Path, Path]) -> Outcome:
        return _recorded_failure(*pair, failures) or compress_one(ffmpeg, *pair, runs)

    # Threads suffice: the work happens in the ffmpeg child processes.
    pool = ThreadPoolExecutor(max_workers=num_workers)
    futures: list = []
    try:
        futures = [pool.submit(one, pair) for pair in pairs]
        for future in tqdm(futures, desc="compress", unit="file"):
            outcome = future.result()
            if outcome.status == "copied":
                tqdm.write(f"ffmpeg failed on {outcome.src}: {outcome.error} (copied the source instead)")
            elif outcome.status == "unreadable":
                tqdm.write(f"cannot read {outcome.src}: {outcome.error} (nothing written)")
            outcomes.append(outcome)
    except BaseException:
        runs.stop()
        pool.shutdown(wait=True, cancel_futures=True)
        # Files finished while stopping count too: a copy made then must be recorded like any other.
        outcomes += [
            f.result() for f in futures[len(outcomes) :] if f.done() and not f.cancelled() and f.exception() is None
        ]
        raise
    finally:
        pool.shutdown()
        _write_failures(output_root, outcomes, failures, legacy)
    return outcomes


def _check_writable(output_root: Path) -> None:
    """Create ``output_root`` and write a file there, so that a read-only or full folder is one error up front."""
    try:
        output_root.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=output_root):
            pass
    except OSError as exc:
        raise UsageError(f"--output_root {output_root}: cannot write there ({exc.strerror or exc})") from None


def summarize(outcomes: Sequence[Outcome]) -> str:
    """A short report: counts per status, then every file whose source had to be copied."""
    statuses = ("compressed", "skipped", "copied", "unreadable")
    count = {status: sum(o.status == status for o in outcomes) for status in statuses}
    lines = [
        f"{len(outcomes)} files: {count['compressed']} compressed, {count['skipped']} skipped (output existed), "
        f"{count['copied']} failed and copied unchanged"
        + (f", {count['unreadable']} unreadable (nothing written)" if count["unreadable"] else "")
    ]
    lines += [f"  failed: {o.src}: {o.error}" for o in outcomes if o.status in ("copied", "unreadable")]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Re-encode videos to 3 fps, short side 224, no audio.")
    parser.add_argument("--input_root", required=True, help="folder searched recursively for videos")
    parser.add_argument("--output_root", required=True, help="flat output folder (created); must differ from input")
    parser.add_argument(
        "--num_workers", type=int, default=default_num_workers(), help="parallel ffmpeg processes (default: all cores)"
    )
    args = parser.parse_args(argv)
    if args.num_workers < 1:
        parser.error("--num_workers must be at least 1")
    sys.stdout.reconfigure(errors="backslashreplace")  # a file name that is not UTF-8 is shown, not a crash
    try:
        outcomes = compress_all(Path(args.input_root), Path(args.output_root), args.num_workers)
    except (ValueError, FileNotFoundError, RuntimeError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except (KeyboardInterrupt, Interrupted):
        print(
            "interrupted: partial outputs removed, finished files kept; run the same command again to go on",
            file=sys.stderr,
        )
        return 130
    print(summarize(outcomes))
    return 1 if any(o.status in ("copied", "unreadable") for o in outcomes) else 0


if __name__ == "__main__":
    sys.exit(main())
