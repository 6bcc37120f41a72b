"""Write a small synthetic dataset (images and mp4 clips of moving coloured shapes, with captions).

    python tools/make_synthetic_data.py OUT_DIR [--seed 0] [--images 8] [--videos 4] [--frames 17 33]
"""

from __future__ import annotations

import argparse
import sys

from wantrainer.devkit.synthetic import make_synthetic_dataset


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", help="folder to write images/, videos/, images.jsonl and videos.jsonl into")
    parser.add_argument("--seed", type=int, default=0, help="random seed (same seed, same files)")
    parser.add_argument("--images", type=int, default=8, help="number of images")
    parser.add_argument("--videos", type=int, default=4, help="number of mp4 clips")
    parser.add_argument("--frames", type=int, nargs=2, default=(17, 33), metavar=("MIN", "MAX"),
                        help="frame count range of the clips")
    parser.add_argument("--with-bad-files", action="store_true",
                        help="also write a corrupt image, a truncated mp4 and a too-short clip")
    args = parser.parse_args(argv)
    if args.images < 0 or args.videos < 0 or not 1 <= args.frames[0] <= args.frames[1]:
        parser.error("counts must be >= 0 and 1 <= MIN <= MAX")
    data = make_synthetic_dataset(
        args.out_dir, seed=args.seed, num_images=args.images, num_videos=args.videos,
        video_frames=tuple(args.frames), with_corrupt_image=args.with_bad_files,
        with_truncated_video=args.with_bad_files, with_short_video=args.with_bad_files,
    )
    sys.stdout.write(f"wrote {len(data.captions)} files to {data.root}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
