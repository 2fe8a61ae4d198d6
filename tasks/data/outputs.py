"""Names for the files ``effdense predict`` writes: one rule, shared by every task package.

Predict writes, per input image, a few files named ``<stem><suffix>`` (``img_boxes.png``,
``img_overlay.png``, ``img_trainIds.png``...) plus one json file, all flat in ``--out``. The rule:

1. ``<stem>`` is the input's stem (a task may pass its own: segmentation keeps Cityscapes'
   ``city_seq_frame``).
2. Inputs whose stems are equal (ignoring case: macOS and Windows file systems do) and whose planned
   files would clash are told apart by their parent folder(s): ``a/img.png``, ``b/img.png`` ->
   ``a_img``, ``b_img`` (as few folders as make them distinct, up to three).
3. A stem whose files would still clash with another input's, or would land on any file that already
   exists in ``--out`` (an input, an earlier run's output, anything), gets the first free numeric
   suffix: ``img-1``, ``img-2``... Nothing that exists is ever written over.
4. The json file (``predictions.json``, ``detections.json``) likewise becomes ``predictions-1.json``...
   when the name is taken; the command prints the name it wrote.

Writers open each file with exclusive creation (``write_new``): a file that appears in ``--out`` while
predict runs is reported in one line, not replaced.
"""

from __future__ import annotations

import os
from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

from backbones.errors import EffdenseError

__all__ = ["OutputError", "output_folder", "plan_output_stems", "unique_path", "write_new", "renamed_note"]

MAX_PARENTS = 3  # parent folders tried to tell apart inputs with one stem, before numeric suffixes

Suffixes = Sequence[str] | Callable[[Path], Sequence[str]]


class OutputError(EffdenseError):
    """An output location predict cannot use: one line naming the path and what to do instead."""


def output_folder(out: str | os.PathLike) -> Path:
    """``out`` as a folder, created when missing; a file there is refused in one line."""
    folder = Path(out)
    if folder.exists() and not folder.is_dir():
        raise OutputError(f"--out {folder}: is a file, expected a folder for the prediction files; "
                          "choose another --out")
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def _suffixes_of(suffixes: Suffixes, path: Path) -> list[str]:
    return list(suffixes(path) if callable(suffixes) else suffixes)


def _parents(path: Path) -> tuple[str, ...]:
    """The folder names above ``path``, outermost first (without the root or drive)."""
    parent = Path(os.path.abspath(path)).parent
    return parent.parts[1:] if parent.anchor else parent.parts


def _with_parents(stem: str, parents: tuple[str, ...], depth: int) -> str:
    return "_".join([*parents[len(parents) - depth:], stem]) if depth else stem


def _disambiguate(stems: list[str], paths: list[Path], files: list[list[str]]) -> list[str]:
    """Rule 2: inputs with one stem (ignoring case) whose planned names overlap get parent folders."""
    groups: dict[str, list[int]] = defaultdict(list)
    for index, stem in enumerate(stems):
        groups[stem.casefold()].append(index)
    names = list(stems)
    for members in groups.values():
        if len(members) < 2:
            continue
        planned = [{(stems[i] + s).casefold() for s in files[i]} for i in members]
        if all(not (a & b) for n, a in enumerate(planned) for b in planned[n + 1:]):
            continue  # img.png and img.jpg drawn as img_boxes.png and img_boxes.jpg: no clash
        parents = [_parents(paths[i]) for i in members]
        for depth in range(1, MAX_PARENTS + 1):
            candidates = [_with_parents(stems[i], p, min(depth, len(p))) for i, p in zip(members, parents)]
            if len({c.casefold() for c in candidates}) == len(candidates):
                break
        else:  # no folder tells them apart (one file given twice): one folder, then numbers (rule 3)
            candidates = [_with_parents(stems[i], p, min(1, len(p))) for i, p in zip(members, parents)]
        for i, candidate in zip(members, candidates):
            names[i] = candidate
    return names


def plan_output_stems(paths: Sequence[str | os.PathLike], out: str | os.PathLike, suffixes: Suffixes,
                      stem: Callable[[Path], str] | None = None) -> list[str]:
    """One output stem per input (see the module docstring for the rule), in the order of ``paths``.

    ``suffixes``: the endings of the files written per input (``["_boxes.png"]``), or a function of the
    input path returning them. ``stem``: the input path -> its natural stem (default ``Path.stem``).
    Every ``out/<stem><suffix>`` planned is new: no existing file (inputs included), no other input's.
    """
    folder = Path(out)
    inputs = [Path(p) for p in paths]
    stems = [stem(p) if stem is not None else p.stem for p in inputs]
    files = [_suffixes_of(suffixes, p) for p in inputs]
    names = _disambiguate(stems, inputs, files)
    taken: set[str] = set()
    result = []
    for name, endings in zip(names, files):
        candidate, number = name, 0
        while any((candidate + s).casefold() in taken or (folder / (candidate + s)).exists() for s in endings):
            number += 1
            candidate = f"{name}-{number}"
        taken.update((candidate + s).casefold() for s in endings)
        result.append(candidate)
    return result


def unique_path(path: str | os.PathLike, taken: Iterable[str | os.PathLike] = ()) -> Path:
    """``path`` when no such file exists (and it is not in ``taken``), else the first free
    ``<stem>-1<suffix>``, ``<stem>-2<suffix>``... beside it."""
    path = Path(path)
    busy = {Path(p) for p in taken}
    candidate, number = path, 0
    while candidate.exists() or candidate in busy:
        number += 1
        candidate = path.with_name(f"{path.stem}-{number}{path.suffix}")
    return candidate


def write_new(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to a file that must not exist yet (exclusive creation: nothing is replaced)."""
    path = Path(path)
    try:
        with open(path, "xb") as handle:
            handle.write(data)
    except FileExistsError:
        raise OutputError(f"{path}: appeared while predict was writing its outputs and was left as it is; "
                          "choose another --out") from None
    return path


def renamed_note(paths: Sequence[str | os.PathLike], stems: Sequence[str], shown: Sequence[str | os.PathLike],
                 stem: Callable[[Path], str] | None = None) -> str | None:
    """Lines saying where the inputs whose stem changed (rules 2 and 3) went, or None when none did.
    ``shown[i]``: the file to name for input ``i``."""
    moved = [f"  {path} -> {target}" for path, name, target in zip(paths, stems, shown)
             if name != (stem(Path(path)) if stem is not None else Path(path).stem)]
    if not moved:
        return None
    return (f"{len(moved)} output name(s) changed to stay unique (an input or a file already in --out is "
            "never written over):\n" + "\n".join(moved))
