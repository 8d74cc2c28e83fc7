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
from rich.table import Table

from labbuilder import imagestore
from labbuilder.commands.common import Subparsers
from labbuilder.imagecache import default_cache_dir


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
    pull.set_defaults(handler=cmd_pull)
    build = verbs.add_parser(
        "build",
        help="build an image locally from the distribution's archive",
        description="Build a bootable cloud image natively with mmdebstrap (no emulated "
        "installer). Rebuilt only when its recipe changes.",
    )
    build.add_argument("name", help="a catalog name with a build recipe, e.g. debian-12")
    build.add_argument("--force", action="store_true", help="build again even if cached")
    build.set_defaults(handler=cmd_build)
    show = verbs.add_parser("show", help="print a cached image's manifest (provenance)")
    show.add_argument("name")
    show.add_argument("--packages", action="store_true", help="include the package list")
    show.set_defaults(handler=cmd_show)
    prune = verbs.add_parser("prune", help="remove cached images no lab uses")
    prune.set_defaults(handler=cmd_prune)


def cmd_list(args: argparse.Namespace, console: Console) -> int:
    rows = imagestore.image_rows(default_cache_dir())
    if args.json:
        console.print_json(json.dumps([row.__dict__ for row in rows]))
        return 0
    table = Table(title=f"images (cache: {default_cache_dir()})")
    for column in ("name", "sources", "cached", "description"):
        table.add_column(column)
    for row in rows:
        table.add_row(row.name, row.sources, "\n".join(row.cached) or "-", row.description)
    console.print(table)
    return 0


def cmd_pull(args: argparse.Namespace, console: Console) -> int:
    columns = (BarColumn(), DownloadColumn(), TransferSpeedColumn(), TimeRemainingColumn())
    with Progress(*columns, console=console, transient=True) as progress:
        task = progress.add_task(args.name, total=None)
        image = imagestore.pull_image(
            args.name,
            default_cache_dir(),
            lambda done, total: progress.update(task, completed=done, total=total),
        )
    fetched = "already cached" if image.bytes_downloaded == 0 else f"{image.bytes_downloaded} bytes"
    console.print(f"{image.name}: {image.path} ({fetched}; {image.algorithm} {image.digest[:16]}…)")
    return 0


def cmd_build(args: argparse.Namespace, console: Console) -> int:
    built = imagestore.build(
        args.name, default_cache_dir(), force=args.force, log=lambda m: console.print(m)
    )
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
    for path in removed:
        console.print(f"removed {path}")
    if not removed:
        console.print("nothing to remove")
    return 0
