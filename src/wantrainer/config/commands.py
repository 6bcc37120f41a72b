"""``wantrainer config template|import``: the config tools that take no config."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..errors import UserError


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("action", choices=["template", "import"],
                   help="template: print the full config template; import: convert another trainer's files")
    p.add_argument("files", nargs="*", metavar="FILE",
                   help="import: the files to convert (musubi-tuner: dataset TOML, --config_file TOML and / or a "
                        "text file with the training command line; takenoko: its config TOML)")
    p.add_argument("--from", dest="source", choices=["musubi", "takenoko"], default=None,
                   help="import: the trainer the files come from")
    p.add_argument("--output", "-o", default=None, metavar="FILE",
                   help="template: write to this file instead of stdout; import: the new config (required)")
    p.add_argument("--force", action="store_true", help="import: replace an existing --output file")


def run_import(args: argparse.Namespace) -> int:
    from ..config.toml_writer import dump_toml
    from ..utils.atomic import write_text_atomic
    from .importers import import_files

    if not args.files or args.source is None or args.output is None:
        raise UserError("usage: wantrainer config import FILE... --from musubi|takenoko -o new.toml")
    output = Path(args.output).expanduser().resolve()
    if output.exists() and not args.force:
        raise UserError(f"{output} exists: choose another --output or add --force to replace it")
    result = import_files([Path(f).expanduser() for f in args.files], args.source, output)
    names = ", ".join(Path(f).name for f in args.files)
    header = f"# Converted by `wantrainer config import --from {args.source}` from {names}.\n"
    if result.dropped:
        header += "# Not carried over (no equivalent here):\n" + "".join(
            f"#   {d.line()}\n" for d in result.dropped)
    output.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(output, header + dump_toml(result.data))
    kept = len([k for k in result.data if k != "datasets"])
    datasets = result.data.get("datasets", {})
    print(f"wrote {output}: {kept} top-level key(s), {len(datasets.get('train', []))} training dataset(s), "
          f"{len(datasets.get('val', []))} validation dataset(s)")
    if result.dropped:
        print(f"{len(result.dropped)} setting(s) without an equivalent (also listed at the top of the file):")
        for dropped in result.dropped:
            print(f"  - {dropped.line()}")
    for note in result.notes:
        print(f"note: {note}")
    print(f"next: wantrainer validate --config {args.output}")
    return 0


def run(args: argparse.Namespace) -> int:
    if args.action == "import":
        return run_import(args)
    if args.files or args.source:
        raise UserError("`wantrainer config template` takes no files and no --from")
    from .template import render_template

    text = render_template()
    if args.output:
        from ..utils.atomic import write_text_atomic

        write_text_atomic(args.output, text)
    else:
        sys.stdout.write(text)
    return 0
