"""Filters on a search: a folder (and its subfolders), a range of dates taken, corrected captions or not.

They apply before ranking, to the image and the caption rankings alike, so that k results are k photos that pass.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass

import numpy as np

_DATE = re.compile(r"\d{4}-\d{2}-\d{2}")


class FilterError(ValueError):
    """A filter that cannot be used; ``param`` names it (folder, from, to)."""

    def __init__(self, param: str, message: str):
        super().__init__(message)
        self.param = param


def parse_date(value: str | None, name: str) -> str | None:
    """'YYYY-MM-DD' (or None for an empty value); FilterError naming the parameter otherwise."""
    if value in (None, ""):
        return None
    value = value.strip()
    if not _DATE.fullmatch(value):
        raise FilterError(name, f"'{name}' must be a date like 2024-07-31, got {value[:40]!r}")
    return value


@dataclass(frozen=True)
class Filters:
    folder: str | None = None  # an absolute folder: photos in it or below it
    taken_from: str | None = None  # 'YYYY-MM-DD', inclusive
    taken_to: str | None = None  # 'YYYY-MM-DD', inclusive
    corrected: bool | None = None  # True: corrected captions only; False: the others

    def __post_init__(self):
        if self.folder is not None and not os.path.isabs(self.folder):
            raise FilterError("folder", f"'folder' must be an absolute folder, got {self.folder[:200]!r}")
        parse_date(self.taken_from, "from")
        parse_date(self.taken_to, "to")

    def active(self) -> bool:
        return any(v is not None for v in (self.folder, self.taken_from, self.taken_to, self.corrected))

    def sql(self, alias: str = "i") -> tuple[str, list]:
        """' AND ...' conditions on the images table (as ``alias``), and their parameters."""
        where, params = [], []
        if self.folder is not None:
            prefix = os.fsencode(self.folder.rstrip(os.sep) + os.sep)
            where.append(f"substr({alias}.path, 1, ?) = ?")
            params += [len(prefix), prefix]
        if self.taken_from is not None:
            where.append(f"{alias}.taken >= ?")
            params.append(self.taken_from)
        if self.taken_to is not None:
            where.append(f"{alias}.taken <= ?")
            params.append(self.taken_to + "T99")  # the whole last day
        if self.corrected is not None:
            where.append(f"{'' if self.corrected else 'NOT '}EXISTS (SELECT 1 FROM captions c WHERE "
                         f"c.image_id = {alias}.id AND c.corrected = 1)")
        return "".join(f" AND {w}" for w in where), params

    def row_mask(self, db, rows: int) -> np.ndarray:
        """(rows,) bool: which rows of the embedding matrix belong to photos that pass."""
        where, params = self.sql("i")
        found = np.fromiter((r for (r,) in db.execute(
            f"SELECT i.row FROM images i WHERE i.row IS NOT NULL{where}", params)), np.int64)
        mask = np.zeros(rows, bool)
        mask[found[found < rows]] = True
        return mask
