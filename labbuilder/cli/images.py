"""Image commands: images list, pull, build, show, prune."""

from __future__ import annotations

import argparse
import json

from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TimeRemainingColumn,
    TransferSpeedColumn,
)

from labbuilder.cli.common import Subparsers, add_plain_row, plain_table
from labbuilder.cli.watch import UpWatch, watching
from labbuilder.common.paths import default_cache_dir, state_root
from labbuilder.images import store as imagestore


def register(commands: Subparsers) -> None:
    images = commands.add_parser(
        "images",
        help="list, pull, build, show and prune base images",
        description=(
            "Base images come from the catalog (images/): downloaded and verified against their "
            "published checksums, or built locally from the distribution's archive with "
            "mmdebstrap. Both are cached per user ($LABBUILDER_CACHE_DIR, else the XDG cache) "
            "and shared by every lab."
        ),
    )
    verbs = images.add_subparsers(dest="verb", metavar="VERB", required=True)
    listing = verbs.add_parser("list", help="the catalog and what is cached")
    listing.add_argument("--json", action="store_true", help="print the list as JSON")
    listing.set_defaults(handler=cmd_list)
    pull = verbs.add_parser("pull", help="download and verify an image")
    pull.add_argument("name", help="a catalog name, e.g. ubuntu-14.04")
    pull.add_argument("--json", action="store_true", help="print the image as JSON")
    pull.set_defaults(handler=cmd_pull)
    build = verbs.add_parser(
        "build",
        help="build an image locally from the distribution's archive",
        description="Build a bootable cloud image natively with mmdebstrap (no emulated "
        "installer). Rebuilt only when its recipe changes.",
    )
    build.add_argument("name", help="a catalog name with a build recipe, e.g. debian-12")
    build.add_argument("--force", action="store_true", help="build again even if cached")
    build.add_argument("--json", action="store_true", help="print the image as JSON")
    build.set_defaults(handler=cmd_build)
    show = verbs.add_parser("show", help="print a cached image's manifest (provenance)")
    show.add_argument("name")
    show.add_argument("--packages", action="store_true", help="include the package list")
    show.add_argument("--json", action="store_true", help="JSON (the manifest is JSON anyway)")
    show.set_defaults(handler=cmd_show)
    prune = verbs.add_parser("prune", help="remove cached images no lab uses")
    prune.add_argument("--json", action="store_true", help="print what was removed as JSON")
    prune.set_defaults(handler=cmd_prune)


def cmd_list(args: argparse.Namespace, console: Console) -> int:
    rows = imagestore.image_rows(default_cache_dir())
    if args.json:
        console.print_json(json.dumps([row.__dict__ for row in rows]))
        return 0
    columns = ("name", "sources", "cached", "description")
    table = plain_table(f"images (cache: {default_cache_dir()})", columns)
    for row in rows:
        add_plain_row(table, row.name, row.sources, "\n".join(row.cached) or "-", row.description)
    console.print(table)
    return 0


def cmd_pull(args: argparse.Namespace, console: Console) -> int:
    columns = (BarColumn(), DownloadColumn(), TransferSpeedColumn(), TimeRemainingColumn())
    status = Console(stderr=True, emoji=False, highlight=False, markup=False)
    with Progress(*columns, console=status, transient=True) as progress:
        task = progress.add_task(args.name, total=None)
        image = imagestore.pull_image(
            args.name,
            default_cache_dir(),
            lambda done, total: progress.update(task, completed=done, total=total),
        )
    if args.json:
        console.print_json(
            json.dumps(
                {
                    "name": image.name,
                    "path": str(image.path),
                    "bytes_downloaded": image.bytes_downloaded,
                    "algorithm": image.algorithm,
                    "digest": image.digest,
                }
            )
        )
        return 0
    fetched = "already cached" if image.bytes_downloaded == 0 else f"{image.bytes_downloaded} bytes"
    console.print(f"{image.name}: {image.path} ({fetched}; {image.algorithm} {image.digest[:16]}…)")
    return 0


def cmd_build(args: argparse.Namespace, console: Console) -> int:
    # Phases on stderr (stdout holds only the result), tools' output in the images' log.
    log = state_root() / "logs" / "images.log"
    with watching(log, f"labbuilder images build {args.name}") as progress:
        built = imagestore.build(
            args.name, default_cache_dir(), force=args.force, log=UpWatch(progress).on_log
        )
    if args.json:
        console.print_json(
            json.dumps(
                {
                    "name": built.name,
                    "disk": str(built.disk),
                    "from_cache": built.from_cache,
                    "file_size": built.file_size,
                    "virtual_size": built.virtual_size,
                }
            )
        )
        return 0
    state = "cached" if built.from_cache else "built"
    console.print(
        f"{built.name}: {state} {built.disk} ({built.file_size / 2**20:.0f} MB file, "
        f"{built.virtual_size / 2**30:.1f} GB virtual)"
    )
    return 0


def cmd_show(args: argparse.Namespace, console: Console) -> int:
    manifest = imagestore.show(args.name, default_cache_dir())
    if not args.packages:
        manifest.pop("packages", None)
    console.print_json(json.dumps(manifest))
    return 0


def cmd_prune(args: argparse.Namespace, console: Console) -> int:
    removed = imagestore.prune_images(default_cache_dir())
    if args.json:
        console.print_json(json.dumps({"removed": [str(path) for path in removed]}))
        return 0
    for path in removed:
        console.print(f"removed {path}")
    if not removed:
        console.print("nothing to remove")
    return 0
