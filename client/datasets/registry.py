"""The data-set registry: one ``DatasetSpec`` a data set, found by name (no if/elif chain).

A spec says where the data set lives under a root (CoOp's layout: ``ROOT/<folder>/...``), how to read
it (a ``Reader``: split file, ImageNet folders, Aircraft's text files), CoOp's hand-written template and
where to download what is missing. ``catalog.py`` registers the eleven data sets of CoOp's DATASETS.md.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from ..data import DataError

SPLITS = ("train", "val", "test")


@dataclass(frozen=True)
class Item:
    """One image of a split: its file and its label (an index into the data set's class names)."""

    path: Path
    label: int


@dataclass
class Splits:
    """What a reader returns: class names by label and the items of each split (``val`` may be empty:
    ImageNet has none, its validation set is CoOp's test set)."""

    class_names: list[str]
    items: dict[str, list[Item]]


Reader = Callable[["DatasetSpec", Path], Splits]
"""(spec, dataset folder) -> Splits; raises ``DatasetMissingError`` naming the file it looked for."""


@dataclass(frozen=True)
class DatasetSpec:
    """A data set in CoOp's layout.

    name: the display name (``OxfordPets``); folder: under the root (``oxford_pets``); image_dir: the
    images under the folder, which split-file paths are relative to; split_file: CoOp's
    ``split_zhou_*.json`` (or None for readers with their own files); template: CoOp's hand-written
    prompt; download: where each file comes from (file -> URL), named in the error when it is missing.
    """

    name: str
    folder: str
    reader: Reader
    template: str
    image_dir: str = ""
    split_file: str | None = None
    download: dict[str, str] = field(default_factory=dict)
    aliases: tuple[str, ...] = ()

    def root_of(self, data_root: str | Path) -> Path:
        return Path(data_root).expanduser() / self.folder

    def where_to_get(self, missing: str) -> str:
        """The download hint for a missing file or folder (its own URL, else every URL of the set)."""
        url = self.download.get(missing)
        links = f"{missing} from {url}" if url else "; ".join(f"{k} from {v}" for k, v in self.download.items())
        return f"get {links} (the layout of CoOp's DATASETS.md, https://github.com/KaiyangZhou/CoOp/blob/main/DATASETS.md)"


class DatasetMissingError(DataError):
    """A data set's file or folder is not where CoOp's layout puts it."""


def missing(spec: DatasetSpec, path: Path, what: str) -> DatasetMissingError:
    """The error for ``path`` (the file or folder ``what`` of ``spec``) not found."""
    return DatasetMissingError(f"{spec.name}: {path} not found; {spec.where_to_get(what)} and put it at {path}")


def _key(name: str) -> str:
    return re.sub(r"[^a-z0-9]", "", name.lower())


_REGISTRY: dict[str, DatasetSpec] = {}
_BY_KEY: dict[str, str] = {}


def register(spec: DatasetSpec) -> DatasetSpec:
    """Add a data set; a name or alias already taken (case, '-' and '_' ignored) is refused."""
    keys = {_key(n) for n in (spec.name, spec.folder, *spec.aliases)}
    taken = sorted(k for k in keys if k in _BY_KEY)
    if taken:
        raise ValueError(f"data set {spec.name!r}: the name {taken[0]!r} is already {_BY_KEY[taken[0]]!r}'s")
    _REGISTRY[spec.name] = spec
    _BY_KEY.update({k: spec.name for k in keys})
    return spec


def dataset_names() -> list[str]:
    """The registered data sets' names, in registration order."""
    return list(_REGISTRY)


def is_dataset(name: str) -> bool:
    """``name`` (or an alias: ``oxford_pets``, ``oxfordpets``) is a registered data set."""
    return _key(name) in _BY_KEY


def get_dataset(name: str) -> DatasetSpec:
    """The spec of ``name``; ``DataError`` listing the known names (and the closest) otherwise."""
    key = _key(name)
    if key not in _BY_KEY:
        import difflib

        close = difflib.get_close_matches(name, dataset_names(), n=3, cutoff=0.5)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise DataError(f"unknown data set {name!r}{hint} (data sets: {', '.join(dataset_names())})")
    return _REGISTRY[_BY_KEY[key]]
