"""Peak memory of image-folder runs as the number of images grows.

    python3 scripts/image_folder_memory.py [--counts 3000 12000] [--size 96] [--image-size N] [--format png|jpg]
                                           [--csv] [--work DIR] [--code CHECKOUT]

For each count, writes that many PNG photos-to-be (random colour blocks,
sizes around --size, 4 classes) into a folder, then times a separate
`finetune run` process on it (MobileNetV2 alpha 0.35, random init, frozen
backbone, one epoch, feature cache off so that training reads the images
themselves), sampling its /proc status. Prints each run's peak RSS and peak
anonymous RSS next to the size of its decoded images, and the ratio of the
growths: a run that held its images in memory would grow its anonymous memory
by at least the decoded size (Keras copies an array into a tensor), a
streaming run by much less. Plain RSS also counts the resident pages of the
memory-mapped image file, which the kernel can drop at any time. ``--code``
runs another checkout of finetune (e.g. a `git worktree` of an older commit)
on the same folders, for a side-by-side comparison.

``--csv`` also lists the same files in ``labels.csv`` (inside the folder: class_0/000001.jpg,class_0)
and runs the same recipe on it with ``data.source=csv`` right after the folder's run, so the two
sources' peaks are measured side by side on the very same images; ``--image-size`` is the recipe's
(stored) size when it differs from the files' (``--size``); ``--format jpg`` writes JPEG files.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def write_folder(folder: Path, count: int, size: int, seed: int = 0, suffix: str = "png") -> None:
    from PIL import Image

    rng = np.random.default_rng(seed)
    colours = np.array([[200, 40, 40], [40, 200, 40], [40, 40, 200], [200, 200, 40]])
    for index in range(count):
        label = index % len(colours)
        side = int(size * rng.uniform(0.8, 1.3))
        pixels = np.clip(colours[label] + rng.normal(0, 40, (side, side, 3)), 0, 255).astype(np.uint8)
        target = folder / f"class_{label}"
        target.mkdir(parents=True, exist_ok=True)
        Image.fromarray(pixels).save(target / f"{index:06d}.{suffix}")


def write_table(folder: Path) -> Path:
    """``labels.csv`` inside ``folder``, listing its images (class folder order, as the folder source sorts them)."""
    table = folder / "labels.csv"
    rows = ["image,label"] + [
        f"{path.relative_to(folder).as_posix()},{path.parent.name}"
        for path in sorted(folder.glob("class_*/*"))
        if path.is_file()
    ]
    table.write_text("\n".join(rows) + "\n")
    return table


def measure(
    folder: Path, size: int, cache_dir: Path, out: Path, code: Path, source: tuple[str, ...] = ()
) -> tuple[int, int, int, str]:
    """Peak RSS and peak anonymous RSS (``/proc``, sampled every 50 ms) of one run, and its accuracy.

    RSS counts the pages of a memory-mapped file that are resident (page cache the kernel can drop);
    anonymous RSS is the memory the process itself holds.
    """
    command = [
        sys.executable,
        "-m",
        "finetune",
        "run",
        str(ROOT / "recipes" / "image_folder_example.yaml"),
        "--out",
        str(out),
        "--set",
        f"data.data_dir={folder}",
        "--set",
        f"data.image_size={size}",
        "--set",
        "model.backbone.weights=null",
        "--set",
        "model.backbone.options={alpha: 0.35}",
        "--set",
        "phases.head.epochs=1",
        "--set",
        "phases.finetune.epochs=0",
        "--set",
        "training.cache=off",
        "--set",
        "training.verbose=0",
        "--set",
        "export.formats=[keras]",
        "--set",
        "precision=float32",
        *source,
    ]
    with open(out.parent / "stderr.txt", "w") as errors:
        # `python -m` imports the package from its working directory first: the checkout measured.
        process = subprocess.Popen(
            command,
            stdout=subprocess.DEVNULL,
            stderr=errors,
            cwd=code,
            env={**os.environ, "FINETUNE_CACHE_DIR": str(cache_dir)},
        )
        peak_rss = peak_anon = 0
        while process.poll() is None:
            status = _proc_status(process.pid)
            peak_rss = max(peak_rss, status.get("VmHWM", 0))
            peak_anon = max(peak_anon, status.get("RssAnon", 0))
            time.sleep(0.05)
    text = (out.parent / "stderr.txt").read_text()
    if process.returncode != 0:
        raise SystemExit(f"run failed: {text.strip().splitlines()[-1]}")
    accuracy = re.search(r"test accuracy ([0-9.]+)", text).group(1)
    return peak_rss, peak_anon, count_bytes(cache_dir), accuracy


def _proc_status(pid: int) -> dict[str, int]:
    values = {}
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            key, _, rest = line.partition(":")
            if rest.strip().endswith("kB"):
                values[key] = int(rest.split()[0]) * 1024
    except OSError:
        pass
    return values


def count_bytes(cache_dir: Path) -> int:
    return sum(path.stat().st_size for path in cache_dir.rglob("images.npy"))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--counts", type=int, nargs="+", default=[3000, 12000])
    parser.add_argument("--size", type=int, default=96, help="the files' size (about: 0.8-1.3x)")
    parser.add_argument("--image-size", type=int, default=None, help="the recipe's image size (default: --size)")
    parser.add_argument("--format", choices=["png", "jpg"], default="png")
    parser.add_argument("--csv", action="store_true", help="also run on the same files listed in labels.csv")
    parser.add_argument("--work", type=Path, default=Path("/tmp/finetune-image-folder-memory"))
    parser.add_argument("--code", type=Path, default=ROOT, help="the finetune checkout to run (default: this one)")
    args = parser.parse_args()
    image_size = args.image_size or args.size
    rows, table_rows = [], []
    for count in args.counts:
        base = args.work / f"n{count}-{args.size}-{args.format}"
        folder, cache_dir = base / "images", base / "cache"
        if not folder.exists():
            write_folder(folder, count, args.size, suffix=args.format)
        sources = {"image_folder": ()}
        if args.csv:
            table = write_table(folder)
            sources["csv"] = ("--set", "data.source=csv", "--set", f"data.data_dir={table}")
        for name, source in sources.items():
            for leftover in [*base.glob("run*"), cache_dir]:  # every measured run decodes the images afresh
                subprocess.run(["rm", "-rf", str(leftover)], check=True)
            peak, anonymous, decoded, accuracy = measure(
                folder, image_size, cache_dir, base / "run", args.code.resolve(), source
            )
            (rows if name == "image_folder" else table_rows).append((count, decoded, peak, anonymous, accuracy))
            print(
                f"{count} images ({name}): decoded {decoded / 1e6:.0f} MB, peak RSS {peak / 1e6:.0f} MB, "
                f"peak anonymous RSS {anonymous / 1e6:.0f} MB, test accuracy {accuracy}",
                file=sys.stderr,
                flush=True,
            )
    print("| images | source | decoded images (MB) | peak RSS (MB) | peak anonymous RSS (MB) | test accuracy |")
    print("| --- | --- | --- | --- | --- | --- |")
    for source, measured in (("image_folder", rows), ("csv", table_rows)):
        for count, decoded, peak, anonymous, accuracy in measured:
            print(
                f"| {count} | {source} | {decoded / 1e6:.0f} | {peak / 1e6:.0f} | {anonymous / 1e6:.0f} | {accuracy} |"
            )
    for folder_row, table_row in zip(rows, table_rows, strict=True):
        print(
            f"{folder_row[0]} images: the CSV's peak RSS is {table_row[2] / folder_row[2]:.3f}x the folder's, "
            f"its peak anonymous RSS {table_row[3] / folder_row[3]:.3f}x"
        )
    if len(rows) < 2:
        return 0
    (small, small_data, small_peak, small_anon, _), (large, large_data, large_peak, large_anon, _) = rows[0], rows[-1]
    grew = max(large_data - small_data, 1)
    print(
        f"\nfrom {small} to {large} images the decoded data grew by {grew / 1e6:.0f} MB, peak RSS by "
        f"{(large_peak - small_peak) / 1e6:.0f} MB (ratio {(large_peak - small_peak) / grew:.2f}) and peak "
        f"anonymous RSS by {(large_anon - small_anon) / 1e6:.0f} MB (ratio {(large_anon - small_anon) / grew:.2f})"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
