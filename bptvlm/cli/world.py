"""Command-line hooks of the embedded world, for `bptvlm`'s own parser.

    add_commands(subparsers)   # registers: tasks list | tasks export NAME DIR | model build

Every registered leaf sets `func`: call `args.func(args)`; it returns an exit code.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path


def _tasks_list(args: argparse.Namespace) -> int:
    from bptvlm.world.tasks import list_tasks

    for task in list_tasks():
        suite = "suite" if task.suite else "check"
        print(f"{task.name}\t{len(task.class_names)} classes\t{suite}\t{task.description}")
    return 0


def _tasks_export(args: argparse.Namespace) -> int:
    from .common import run_command

    def body() -> int:
        import shutil

        from bptvlm.data import check_source
        from bptvlm.world.tasks import export_task

        from .common import check_out

        check_source(args.name, folder=False)
        check_out(args.dir, overwrite=args.overwrite, what="export")
        if args.overwrite:  # an export is its train/ and test/ trees: the old ones go whole
            for split in ("train", "test"):
                shutil.rmtree(Path(args.dir) / split, ignore_errors=True)
        out = export_task(args.name, args.dir, shots=args.shots, seed=args.seed)
        print(f"wrote {args.name} to {out} (train/ and test/ ImageFolders)")
        return 0

    return run_command(body)


def _model_build(args: argparse.Namespace) -> int:
    from bptvlm.world.pretrain import build

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    recipe = build(args.out, minutes=args.minutes, seed=args.seed)
    print(f"saved to {args.out} in {recipe['wall_time_s']:.0f} s "
          f"({recipe['train_config']['steps']} steps, seed {args.seed})")
    return 0


def add_commands(subparsers: argparse._SubParsersAction) -> None:
    """Register `tasks list`, `tasks export NAME DIR [--shots --seed]`, `model build --minutes --out [--seed]`."""
    tasks = subparsers.add_parser(
        "tasks", help="the built-in few-shot task suite",
        description="The built-in few-shot tasks of the embedded world: procedurally generated images "
        "(shapes, colours, counts, textures, digits) with class names, a hand-written template and "
        "seeded train/val/test splits. `list` prints them; `export` writes one as an ImageFolder.")
    tasks_sub = tasks.add_subparsers(dest="tasks_command", required=True)
    p = tasks_sub.add_parser("list", help="one task per line, its name first")
    p.set_defaults(func=_tasks_list)
    p = tasks_sub.add_parser("export", help="write a task as an ImageFolder (train/, test/)")
    p.add_argument("name")
    p.add_argument("dir", type=Path)
    p.add_argument("--shots", type=int, default=16, help="training images per class (default 16)")
    p.add_argument("--seed", type=int, default=0, help="seed of the train split (default 0)")
    p.add_argument("--overwrite", action="store_true", help="replace an export already in DIR (default: refuse a non-empty DIR)")
    p.set_defaults(func=_tasks_export)

    model = subparsers.add_parser(
        "model", help="the embedded CLIP",
        description="The project's own small CLIP. `build` runs the recipe that produced the shipped "
        "weights in server/embedded (see its MODEL_CARD.md): procedural captioned images, a caption "
        "tokenizer, contrastive pretraining from a fixed seed.")
    model_sub = model.add_subparsers(dest="model_command", required=True)
    p = model_sub.add_parser("build", help="pretrain the embedded CLIP from scratch (the shipped recipe)")
    p.add_argument("--minutes", type=float, required=True,
                   help="nominal training time; fixes the number of steps (700 pairs/s nominal)")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=_model_build)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bptvlm-world")
    add_commands(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    raise SystemExit(main())
