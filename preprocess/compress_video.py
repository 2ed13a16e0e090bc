"""Re-encode every video under a folder to 3 fps with short side 224 and no audio (SPEC §8).

    python preprocess/compress_video.py --input_root raw_videos --output_root compressed_videos

Every file found by a recursive walk of ``--input_root`` goes to ``--output_root/<file name>`` (flat, same name and
extension). Outputs that already exist and are non-empty are skipped, so an interrupted run can be resumed.
Where ffmpeg fails, the source file is copied in its place, as the original tool does; each such failure is
reported with ffmpeg's last error line and listed in the final summary.

Differences from the original:
- portrait videos get width 224 and height 224/aspect (the original computed 224*aspect and squashed them);
- two inputs with the same file name are refused before anything is written (the original overwrote one);
- outputs are written under a temporary name and renamed, so an interrupted run leaves no truncated file behind
  that a later run would skip; a folder for the outputs inside ``--input_root`` is not itself walked;
- exit status 1 when any file failed (its source was still copied), 0 otherwise, 2 for bad arguments.
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

from tqdm import tqdm

FPS = 3
SHORT_SIDE = 224

# a = input width / height. Landscape (a > 1): height 224, width the even number at or below 224*a.
# Otherwise: width 224, height the even number at or below 224/a. The quotes protect the commas inside the
# expressions from ffmpeg's filter-graph parser.
SCALE_FILTER = (
    f"scale='if(gt(a,1),trunc(oh*a/2)*2,{SHORT_SIDE})'"
    f":'if(gt(a,1),{SHORT_SIDE},trunc(ow/a/2)*2)'"
)


class NameCollisionError(ValueError):
    """Two input files would be written to the same output path."""


@dataclass(frozen=True)
class Outcome:
    """What happened to one input file."""

    src: Path
    dst: Path
    status: str  # "compressed", "skipped" or "copied" (ffmpeg failed, the source was copied)
    error: str = ""  # ffmpeg's last error line when status == "copied"


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


def build_ffmpeg_command(ffmpeg: str, src: Path, dst: Path) -> List[str]:
    """The ffmpeg call that writes ``src`` re-encoded to ``dst``: 3 fps, short side 224, video streams only."""
    return [
        ffmpeg, "-nostdin", "-hide_banner", "-loglevel", "error", "-y",
        "-i", str(src),
        "-filter:v", SCALE_FILTER,
        "-map", "0:v", "-an",
        "-r", str(FPS),
        str(dst),
    ]


def _walk_files(root: Path, exclude: Path) -> Iterable[Path]:
    for dirpath, dirnames, filenames in os.walk(root):
        # Never treat our own outputs as inputs when the output folder sits inside the input folder.
        dirnames[:] = sorted(d for d in dirnames if Path(dirpath, d).resolve() != exclude)
        for name in sorted(filenames):
            yield Path(dirpath, name)


def plan_outputs(input_root: Path, output_root: Path) -> List[Tuple[Path, Path]]:
    """(source, output) for every file under ``input_root``; raises NameCollisionError on clashing names."""
    input_root, output_root = Path(input_root), Path(output_root)
    if not input_root.is_dir():
        raise FileNotFoundError(f"--input_root {input_root} is not a folder")
    if input_root.resolve() == output_root.resolve():
        raise ValueError(f"--input_root and --output_root must differ (both are {input_root})")
    by_name: Dict[str, List[Path]] = {}
    for src in _walk_files(input_root, output_root.resolve()):
        by_name.setdefault(src.name, []).append(src)
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


def _partial_path(dst: Path) -> Path:
    # Keep the extension: ffmpeg picks the container from it.
    return dst.with_name(f".{dst.stem}.partial{dst.suffix}")


def compress_one(ffmpeg: str, src: Path, dst: Path) -> Outcome:
    """Re-encode ``src`` to ``dst`` unless ``dst`` is already non-empty; copy ``src`` there if ffmpeg fails."""
    if dst.is_file() and dst.stat().st_size > 0:
        return Outcome(src, dst, "skipped")
    tmp = _partial_path(dst)
    proc = subprocess.run(build_ffmpeg_command(ffmpeg, src, tmp), capture_output=True, text=True, errors="replace")
    if proc.returncode == 0 and tmp.is_file() and tmp.stat().st_size > 0:
        os.replace(tmp, dst)
        return Outcome(src, dst, "compressed")
    error = _last_line(proc.stderr) if proc.returncode != 0 else "ffmpeg wrote an empty file"
    tmp.unlink(missing_ok=True)
    shutil.copyfile(src, tmp)
    os.replace(tmp, dst)
    return Outcome(src, dst, "copied", error)


def default_num_workers() -> int:
    """All cores this process may use."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def compress_all(
    input_root: Path, output_root: Path, num_workers: Optional[int] = None, ffmpeg: Optional[str] = None
) -> List[Outcome]:
    """Compress every file under ``input_root`` into ``output_root``, ``num_workers`` ffmpeg processes at a time."""
    pairs = plan_outputs(Path(input_root), Path(output_root))  # raises before anything is written
    ffmpeg = ffmpeg or find_ffmpeg()
    Path(output_root).mkdir(parents=True, exist_ok=True)
    num_workers = num_workers or default_num_workers()
    outcomes: List[Outcome] = []
    # Threads suffice: the work happens in the ffmpeg child processes.
    with ThreadPoolExecutor(max_workers=num_workers) as pool:
        jobs = pool.map(lambda pair: compress_one(ffmpeg, *pair), pairs)
        for outcome in tqdm(jobs, total=len(pairs), desc="compress", unit="file"):
            if outcome.status == "copied":
                tqdm.write(f"ffmpeg failed on {outcome.src}: {outcome.error} (copied the source instead)")
            outcomes.append(outcome)
    return outcomes


def summarize(outcomes: Sequence[Outcome]) -> str:
    """A short report: counts per status, then every file whose source had to be copied."""
    count = {status: sum(o.status == status for o in outcomes) for status in ("compressed", "skipped", "copied")}
    lines = [
        f"{len(outcomes)} files: {count['compressed']} compressed, {count['skipped']} skipped (output existed), "
        f"{count['copied']} failed and copied unchanged"
    ]
    lines += [f"  failed: {o.src}: {o.error}" for o in outcomes if o.status == "copied"]
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description="Re-encode videos to 3 fps, short side 224, no audio.")
    parser.add_argument("--input_root", required=True, help="folder searched recursively for videos")
    parser.add_argument("--output_root", required=True, help="flat output folder (created); must differ from input")
    parser.add_argument("--num_workers", type=int, default=default_num_workers(),
                        help="parallel ffmpeg processes (default: all cores)")
    args = parser.parse_args(argv)
    if args.num_workers < 1:
        parser.error("--num_workers must be at least 1")
    try:
        outcomes = compress_all(Path(args.input_root), Path(args.output_root), args.num_workers)
    except (ValueError, FileNotFoundError, RuntimeError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(summarize(outcomes))
    return 1 if any(o.status == "copied" for o in outcomes) else 0


if __name__ == "__main__":
    sys.exit(main())
