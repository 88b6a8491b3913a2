r"""The result store: per-image results of an evaluation, crash-safe, resumable and checked on open.

A store at ``PATH`` (``results.h5`` in an evaluation's folder) is:

- ``PATH``: the **committed store**, one HDF5 file (h5py) with a group per method and a column
  per score (Fletcher-32 checksummed chunks, so a damaged chunk fails on read instead of returning
  wrong numbers). It is only ever replaced whole: written to ``PATH.tmp<pid>``, synced, then
  renamed over ``PATH`` (``os.replace`` is atomic on POSIX), so it is either the old file or the
  new one, never a mixture.
- ``PATH.parts/``: one ``.npz`` file per batch computed since the last commit, each written to a
  temporary name, synced and renamed into place, so a batch is either fully there or absent.
  Parts are named by their first dataset index, not by process, so a run with any number of
  processes reuses the rows of a run with any other number.
- ``PATH.lock``: an exclusive ``flock`` held by the writing run, so two evaluations never write
  one store, and a run that finds it held is told another is writing, not that the file is bad.

A run appends parts as it goes and, at its end, merges the committed store and the parts into a
new committed store and removes the merged parts. A kill at any point therefore loses at most the
batch in flight: the next run of the same command reads the committed store and every complete
part, ignores (and removes) temporary files, and continues. Per-batch parts keep each commit small
(in-place HDF5 appends are not atomic: a kill inside an HDF5 flush can leave a file whose
structure is unreadable), and one HDF5 file at the end keeps what users and reports read a single
file with random access.

The file also holds a fingerprint of what produced it; a store written under another fingerprint
is refused, naming what differs, because mixing its rows with new ones would average two
experiments. A store with an impossible structure (an index outside the dataset, a duplicate or
negative index, maps of another grid, a missing column) is refused by name.
"""

from __future__ import annotations

import contextlib
import errno
import glob
import json
import os
import zipfile
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence

import numpy as np

__all__ = [
    "FORMAT_VERSION",
    "ID_COLUMNS",
    "MAP_COLUMNS",
    "STORE_NAME",
    "ResultStore",
    "StoreCorruptError",
    "StoreLockedError",
    "StoreMismatchError",
    "StoreVersionError",
    "StoreWriteError",
    "load_store",
]

FORMAT_VERSION = 2
#: the file name of the store inside an evaluation's output folder
STORE_NAME = "results.h5"
#: columns every method stores: the dataset index, labels, probabilities and whether logits and maps were finite
ID_COLUMNS = ("index", "label", "pred", "prob_pred", "prob_label", "finite")
_INT_COLUMNS = ("index", "label", "pred", "finite")
MAP_COLUMNS = ("map_pred", "map_label")
_SKIPPED = "skipped"  # root dataset: indices counted as skipped (unreadable files under on_error="skip")
_MOVE_AWAY = "move it away (or give another --out) to start afresh"


class StoreVersionError(ValueError):
    """The result store was written by a version of captum-vit with another store format."""


class StoreMismatchError(ValueError):
    """The result store was written by another model, checkpoint, method set, metric options or dataset."""


class StoreCorruptError(ValueError):
    """The result store cannot be read, or its structure is impossible (e.g. an index outside the dataset)."""


class StoreLockedError(RuntimeError):
    """Another running evaluation is writing the result store."""


class StoreWriteError(RuntimeError):
    """Writing the result store failed (e.g. the disk is full); the rows committed before are kept."""


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_failed(path: str, e: BaseException, kept: str) -> StoreWriteError:
    why = "the disk is full" if getattr(e, "errno", None) in (errno.ENOSPC, errno.EDQUOT) else str(e)
    return StoreWriteError(f"writing the result store {path!r} failed: {why}. {kept} Free some space (or give "
                           "another --out) and run the same command again to resume")


def _empty(column: str) -> np.ndarray:
    return np.zeros(0, dtype=np.int64 if column in _INT_COLUMNS else np.float64)


class ResultStore:
    r"""Per-image results of one evaluation, one row per (method, image), crash-safe and resumable.

    Columns per method: ``index`` (dataset index), ``label``, ``pred``, ``prob_pred`` and
    ``prob_label`` (softmax probabilities of the predicted and the ground-truth class),
    ``finite`` (1 when the logits and both maps were finite; a 0 row's scores are NaN), one
    float64 column per metric of the selected groups (NaN where the protocol does not score the
    image, e.g. localization of a misclassified image) and, when maps are kept, ``map_pred`` and
    ``map_label`` (float16 ``[n, gh, gw]``: the raw maps for the predicted and the ground-truth
    class on the patch grid). Images skipped as unreadable are recorded by index
    (:meth:`skipped`). See the module docstring for the files and what a kill leaves.

    Args:
        path (str, optional): the committed HDF5 file; ``None`` keeps the rows in memory.
        fingerprint (dict): what produced the results.
        methods (sequence of str): the method names.
        columns (sequence of str): the metric columns.
        keep_maps (bool, optional): store the maps too. Default: True
        mode (str, optional): ``"a"`` (create or resume; takes the store's lock) or ``"r"``
            (read; with an empty fingerprint, whatever its fingerprint, as :func:`load_store`
            does). Default: ``"a"``
        lock (bool, optional): in mode ``"a"``, take the exclusive lock (under torchrun only
            rank 0 does; the ranks write disjoint parts). Default: True
    """

    def __init__(self, path: Optional[str], fingerprint: Mapping[str, Any], methods: Sequence[str],
                 columns: Sequence[str], keep_maps: bool = True, mode: str = "a", lock: bool = True) -> None:
        self.path = path
        self.fingerprint = dict(fingerprint)
        self.methods = list(methods)
        self.columns = list(ID_COLUMNS) + list(columns)
        self.maps = list(MAP_COLUMNS) if keep_maps else []
        self.attrs: Dict[str, Any] = {}
        self._mode = mode
        self._h5 = None  # the committed file, read-only
        self._base_index: Dict[str, np.ndarray] = {}
        self._base_skipped: np.ndarray = np.zeros(0, np.int64)
        self._new: Dict[str, Dict[str, List[np.ndarray]]] = {}  # rows from parts and appends, not yet committed
        self._new_skipped: List[np.ndarray] = []
        self._parts: List[str] = []
        self._lock_fd: Optional[int] = None
        self.grid: Optional[tuple] = None  # the maps' patch grid, once a map is stored
        self._reset_new()
        if path is None:
            return
        try:
            if mode == "a" and lock:
                self._take_lock()
            self._open()
        except BaseException:
            self.close()
            raise

    # -- opening ---------------------------------------------------------------------------------
    @property
    def parts_dir(self) -> str:
        return f"{self.path}.parts"

    @property
    def _path(self) -> str:
        """The store's file (only file-backed stores reach the code that asks)."""
        assert self.path is not None
        return self.path

    def _reset_new(self) -> None:
        self._new = {m: {c: [] for c in self.columns + self.maps} for m in self.methods}
        self._new_skipped = []
        self._parts = []

    def _take_lock(self) -> None:
        import fcntl

        lock_path = f"{self.path}.lock"
        os.makedirs(os.path.dirname(os.path.abspath(self._path)), exist_ok=True)
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise StoreLockedError(f"result store {self.path!r} is being written by another running evaluation "
                                   f"(pid {holder}, holding {lock_path!r}): wait for it to finish, or give another "
                                   "--out. The store itself is fine") from e
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        self._lock_fd = fd
        # only the lock holder removes temporary files: they are what an earlier run was killed writing
        for tmp in glob.glob(glob.escape(self._path) + ".tmp*") + glob.glob(
                os.path.join(glob.escape(self.parts_dir), ".*.tmp*")):
            with contextlib.suppress(OSError):
                os.remove(tmp)

    def _open(self) -> None:
        has_base = os.path.exists(self._path)
        part_files = sorted(glob.glob(os.path.join(glob.escape(self.parts_dir), "*.npz")))
        if self._mode == "r" and not has_base and not part_files:
            raise FileNotFoundError(f"result store {self.path!r} does not exist")
        if has_base:
            self._open_base()
        elif self._mode == "r" and not self.fingerprint:
            self._adopt_from_part(part_files[0])
        self._load_parts(part_files)
        self._check_structure()

    def _where(self) -> str:
        return f"result store {self.path!r}"

    def _open_base(self) -> None:
        import h5py

        if os.path.isdir(self._path):
            raise StoreCorruptError(f"{self._where()} is a folder, not a result store: {_MOVE_AWAY}")
        try:
            f = h5py.File(self.path, "r")
        except OSError as e:
            raise StoreCorruptError(
                f"{self._where()} cannot be opened as HDF5 ({e}): it is truncated, damaged or not a captum-vit result "
                f"store (captum-vit replaces its store atomically, so an interrupted run does not leave one like "
                f"this): {_MOVE_AWAY}") from e
        self._h5 = f
        stored = self._stored_fingerprint(f.attrs, self._where())
        if not self.fingerprint:
            self._adopt(f, stored)
        else:
            self._compare(stored, self._where())
        self.attrs = {k: f.attrs[k] for k in f.attrs.keys()}
        for m in self.methods:
            self._check_base_group(f, m)
        if _SKIPPED in f:
            self._base_skipped = f[_SKIPPED][...].astype(np.int64)

    def _adopt(self, f: Any, stored: Dict[str, Any]) -> None:
        """Read mode: take the fingerprint, methods and columns from the committed file."""
        self.fingerprint = stored
        order = json.loads(f.attrs["methods"]) if "methods" in f.attrs else []
        self.methods = list(order) if sorted(order) == sorted(stored.get("methods", {})) \
            else sorted(stored.get("methods", {}))
        if not self.methods or any(m not in f for m in self.methods):
            raise StoreCorruptError(f"{self._where()} lacks the groups of its methods {self.methods}; it is "
                                    f"damaged: {_MOVE_AWAY}")
        first = f[self.methods[0]]
        self.maps = [c for c in MAP_COLUMNS if c in first]
        # every method's columns: a column one of them lacks is then named by _check_base_group
        scores = [c for m in self.methods for c in f[m].keys() if c not in ID_COLUMNS and c not in MAP_COLUMNS]
        self.columns = list(ID_COLUMNS) + list(dict.fromkeys(scores))
        self._reset_new()

    def _check_base_group(self, f: Any, m: str) -> None:
        """Method ``m``'s group holds every column, all of one length; its indices are read."""
        if m not in f:
            raise StoreCorruptError(f"{self._where()} lacks the group of method {m!r}: it is damaged or was "
                                    f"edited: {_MOVE_AWAY}")
        g = f[m]
        for c in self.columns + self.maps:
            if c not in g and (c == "finite" or (c in MAP_COLUMNS and "index" in g and g["index"].shape[0] == 0)):
                continue  # derived on read (stores written before the column existed); no rows, no grid
            if c not in g:
                raise StoreCorruptError(f"{self._where()} lacks column {c!r} of method {m!r}: it is damaged or "
                                        f"was edited: {_MOVE_AWAY}")
        lengths = {g[c].shape[0] for c in self.columns + self.maps if c in g}
        if len(lengths) > 1:
            raise StoreCorruptError(f"{self._where()} is inconsistent: the columns of method {m!r} hold "
                                    f"{sorted(lengths)} rows; it is damaged or was edited: {_MOVE_AWAY}")
        try:
            self._base_index[m] = g["index"][...].astype(np.int64)
        except OSError as e:
            raise StoreCorruptError(f"{self._where()}: reading method {m!r} failed ({e}); the file is damaged: "
                                    f"{_MOVE_AWAY}") from e

    @staticmethod
    def _stored_fingerprint(attrs: Mapping[str, Any], where: str) -> Dict[str, Any]:
        if "fingerprint" not in attrs or "format_version" not in attrs:
            raise StoreCorruptError(f"{where} has no fingerprint: it is not a captum-vit result store: {_MOVE_AWAY}")
        version = int(attrs["format_version"])
        if version != FORMAT_VERSION:
            from captum_vit import __version__

            raise StoreVersionError(f"{where} has store format {version}, this captum-vit ({__version__}) reads "
                                    f"format {FORMAT_VERSION}: it was written by another version of captum-vit. "
                                    "Run the evaluation again into another --out, or use the version that wrote it")
        try:
            return json.loads(str(attrs["fingerprint"]))
        except (TypeError, ValueError) as e:
            raise StoreCorruptError(f"{where} has an unreadable fingerprint ({e}): {_MOVE_AWAY}") from e

    def _compare(self, stored: Mapping[str, Any], where: str) -> None:
        current = json.loads(json.dumps(self.fingerprint, sort_keys=True))
        if stored != current:
            diffs = [f"{k}: stored {stored.get(k)!r}, now {current.get(k)!r}"
                     for k in sorted(set(stored) | set(current)) if stored.get(k) != current.get(k)]
            raise StoreMismatchError(f"{where} was written by another run; its results cannot be resumed or mixed "
                                     "with this one. Differences: " + "; ".join(diffs)
                                     + ". Give another --out (or move the store away) to start afresh.")

    def _read_part(self, path: str) -> Dict[str, np.ndarray]:
        try:
            with np.load(path, allow_pickle=False) as z:
                return {k: z[k] for k in z.files}
        except (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile) as e:
            raise StoreCorruptError(f"result store part {path!r} cannot be read ({e}); parts are renamed into place "
                                    "only when complete, so it was damaged or edited: move it away to recompute "
                                    "its batch") from e

    def _adopt_from_part(self, path: str) -> None:
        z = self._read_part(path)
        where = f"result store part {path!r}"
        meta = json.loads(str(z["meta"])) if "meta" in z else {}
        self.fingerprint = self._stored_fingerprint(meta, where)
        self.methods = list(meta.get("methods", []))
        self.columns = list(meta.get("columns", self.columns))
        self.maps = list(meta.get("maps", []))
        self.attrs = dict(meta.get("attrs", {}))
        self._reset_new()

    def _load_parts(self, part_files: Sequence[str]) -> None:
        for path in part_files:
            z = self._read_part(path)
            where = f"result store part {path!r}"
            if "meta" not in z:
                raise StoreCorruptError(f"{where} has no fingerprint: it is not a captum-vit part: move it away")
            meta = json.loads(str(z["meta"]))
            self._compare(self._stored_fingerprint(meta, where), where)
            if self._merged_already(z):
                self._parts.append(path)  # removed with the next commit, like the parts merged into it
                continue
            for m in self.methods:
                missing = [c for c in self.columns + self.maps if f"{m}/{c}" not in z]
                if missing:
                    raise StoreCorruptError(f"{where} lacks column(s) {missing} of method {m!r}: move it away to "
                                            "recompute its batch")
                for c in self.columns + self.maps:
                    self._new[m][c].append(z[f"{m}/{c}"])
            self._new_skipped.append(z.get(_SKIPPED, np.zeros(0, np.int64)).astype(np.int64))
            self.attrs.update(meta.get("attrs", {}))
            self._parts.append(path)

    def _merged_already(self, z: Mapping[str, np.ndarray]) -> bool:
        """A part whose rows the committed store holds: a kill between a commit and the removal of its parts."""
        have = {m: set(self._base_index.get(m, _empty("index")).tolist()) for m in self.methods}
        known = set(self._base_skipped.tolist())
        rows = [(m, set(np.asarray(z.get(f"{m}/index", _empty("index"))).tolist())) for m in self.methods]
        skipped = set(np.asarray(z.get(_SKIPPED, _empty("index"))).tolist())
        return all(r <= have[m] for m, r in rows) and skipped <= known and bool(any(r for _, r in rows) or skipped)

    def _check_structure(self) -> None:
        """Refuse what no run can write: indices outside the dataset or twice, maps of mixed grids."""
        n = (self.fingerprint.get("dataset") or {}).get("length")
        grids = set()
        for m in self.methods:
            idx = self._index(m)
            lengths = {len(self._base_index.get(m, ())) + sum(len(v) for v in self._new[m][c])
                       for c in self.columns + self.maps}
            if len(lengths) > 1:
                raise StoreCorruptError(f"{self._where()} is inconsistent: the columns of method {m!r} hold "
                                        f"{sorted(lengths)} rows: {_MOVE_AWAY}")
            if len(idx) and idx.min() < 0:
                raise StoreCorruptError(f"{self._where()} holds a negative image index ({idx.min()}) for method "
                                        f"{m!r}; no run writes one: {_MOVE_AWAY}")
            if n is not None and len(idx) and idx.max() >= int(n):
                raise StoreCorruptError(f"{self._where()} holds image index {idx.max()} for method {m!r}, outside its "
                                        f"dataset of {n} images: {_MOVE_AWAY}")
            if len(np.unique(idx)) != len(idx):
                raise StoreCorruptError(f"{self._where()} stores an image twice for method {m!r}; it is damaged or was "
                                        f"edited: {_MOVE_AWAY}")
            for c in self.maps:
                if self._h5 is not None and len(self._base_index.get(m, ())):
                    grids.add(tuple(self._h5[m][c].shape[1:]))
                grids |= {tuple(v.shape[1:]) for v in self._new[m][c] if len(v)}
        if len(grids) > 1 or any(len(g) != 2 for g in grids):
            raise StoreCorruptError(f"{self._where()} holds maps of grids {sorted(grids)}; every map of one run has "
                                    f"the model's patch grid: {_MOVE_AWAY}")
        self.grid = next(iter(grids)) if grids else None

    # -- reading ---------------------------------------------------------------------------------
    def done(self) -> set:
        """Dataset indices stored for every method."""
        sets = [set(self._index(m).tolist()) for m in self.methods]
        return set.intersection(*sets) if sets else set()

    def skipped(self) -> set:
        """Dataset indices counted as skipped (unreadable files under ``on_error="skip"``)."""
        return set(np.concatenate([self._base_skipped] + self._new_skipped).tolist())

    def _index(self, method: str) -> np.ndarray:
        return np.concatenate([self._base_index.get(method, _empty("index"))]
                              + [np.asarray(v, np.int64) for v in self._new[method]["index"]])

    def _base_column(self, method: str, c: str) -> np.ndarray:
        if self._h5 is None or method not in self._base_index:
            return _empty(c)
        g = self._h5[method]
        try:
            if c in g:
                return g[c][...]
            if c == "finite":  # derived for stores written before the column existed
                ok = np.isfinite(g["prob_pred"][...]) & np.isfinite(g["prob_label"][...])
                for mc in MAP_COLUMNS:
                    if mc in g:
                        ok &= np.isfinite(g[mc][...].reshape(len(ok), -1)).all(1)
                return ok.astype(np.int64)
        except OSError as e:
            raise StoreCorruptError(f"{self._where()}: reading {method}/{c} failed ({e}); the file is damaged: "
                                    f"{_MOVE_AWAY}") from e
        return _empty(c)

    def read(self, method: str, maps: bool = True) -> Dict[str, np.ndarray]:
        """All rows of one method, as ``{column: array}``, sorted by dataset index."""
        names = self.columns + (self.maps if maps else [])
        out = {}
        for c in names:
            pieces = [self._base_column(method, c)] + list(self._new[method][c])
            pieces = [p for p in pieces if len(p)]
            out[c] = np.concatenate(pieces) if pieces else _empty(c)
        order = np.argsort(out["index"], kind="stable")
        return {c: v[order] if len(v) == len(order) else v for c, v in out.items()}

    def read_maps(self, method: str, indices: Iterable[int]) -> Dict[str, np.ndarray]:
        """The map columns of the rows with these dataset indices (in the given order), read without the rest.

        Raises:
            KeyError: an index the store does not hold for ``method``.
        """
        want = [int(i) for i in indices]
        pos_base = {int(i): p for p, i in enumerate(self._base_index.get(method, _empty("index")))}
        pos_new = {int(i): p for p, i in enumerate(np.concatenate(
            [_empty("index")] + [np.asarray(v, np.int64) for v in self._new[method]["index"]]))}
        missing = [i for i in want if i not in pos_base and i not in pos_new]
        if missing:
            raise KeyError(f"{self._where()} holds no maps of images {missing[:5]} for method {method!r}")
        in_base = sorted(((k, pos_base[i]) for k, i in enumerate(want) if i in pos_base), key=lambda t: t[1])
        out = {}
        for c in self.maps:
            rows = np.zeros((len(want),) + tuple(self.grid or (0, 0)), np.float16)
            if in_base:
                assert self._h5 is not None  # rows in the committed store: it is open
                ks, ps = zip(*in_base)
                rows[list(ks)] = self._h5[method][c][list(ps)]  # h5py reads increasing positions
            if pos_new:
                stacked = np.concatenate(self._new[method][c])
                for k, i in enumerate(want):
                    if i in pos_new:
                        rows[k] = stacked[pos_new[i]]
            out[c] = rows
        return out

    # -- writing ---------------------------------------------------------------------------------
    def set_attrs(self, **attrs: Any) -> None:
        """Facts about the run that do not identify its results; written with the next part or commit."""
        self.attrs.update(attrs)

    def _meta(self) -> str:
        return json.dumps({"format_version": FORMAT_VERSION, "fingerprint": json.dumps(self.fingerprint,
                                                                                       sort_keys=True),
                           "methods": self.methods, "columns": self.columns, "maps": self.maps,
                           "attrs": {k: (v.item() if hasattr(v, "item") else v) for k, v in self.attrs.items()}},
                          sort_keys=True)

    def append(self, rows: Mapping[str, Mapping[str, np.ndarray]], skipped: Sequence[int] = ()) -> None:
        """Commit one batch, ``{method: {column: array[n, ...]}}``, plus the indices it skipped, as one part."""
        cols = {m: {c: np.asarray(rows[m][c]) if m in rows else _empty(c) for c in self.columns + self.maps}
                for m in self.methods}
        for m in self.methods:
            for c in self.maps:
                if len(cols[m][c]) and self.grid is not None and tuple(cols[m][c].shape[1:]) != tuple(self.grid):
                    raise StoreCorruptError(f"{self._where()} holds maps of grid {tuple(self.grid)}, this model gives "
                                            f"{tuple(cols[m][c].shape[1:])}: it belongs to another model: {_MOVE_AWAY}")
                if len(cols[m][c]):
                    self.grid = tuple(cols[m][c].shape[1:])
        skipped_arr = np.asarray(sorted(skipped), dtype=np.int64)
        if self.path is not None:
            first = min([int(cols[m]["index"].min()) for m in self.methods if len(cols[m]["index"])]
                        + skipped_arr.tolist())
            os.makedirs(self.parts_dir, exist_ok=True)
            final = os.path.join(self.parts_dir, f"{first:010d}.npz")
            tmp = os.path.join(self.parts_dir, f".{first:010d}.tmp{os.getpid()}")
            arrays = {f"{m}/{c}": v for m in self.methods for c, v in cols[m].items()}
            arrays[_SKIPPED] = skipped_arr
            arrays["meta"] = np.array(self._meta())
            try:
                with open(tmp, "wb") as fh:
                    np.savez(fh, **arrays)  # type: ignore[arg-type]  # numpy's stub types **kwds as its own options
                    fh.flush()
                    os.fsync(fh.fileno())
                os.replace(tmp, final)
                _fsync_dir(self.parts_dir)
            except OSError as e:
                with contextlib.suppress(OSError):
                    os.remove(tmp)
                raise _write_failed(self.path, e, "The batches committed before this one are kept.") from e
            self._parts.append(final)
        for m in self.methods:
            for c, v in cols[m].items():
                self._new[m][c].append(v)
        self._new_skipped.append(skipped_arr)

    def reload_parts(self) -> None:
        """Read the parts other processes wrote since this store was opened (torchrun's rank 0, before merging)."""
        if self.path is None:
            return
        seen = set(self._parts)
        self._load_parts([p for p in sorted(glob.glob(os.path.join(glob.escape(self.parts_dir), "*.npz")))
                          if p not in seen])
        self._check_structure()

    def commit(self) -> None:
        """Merge the committed store and every part into a new committed store, atomically; remove the parts."""
        if self.path is None:
            return
        import h5py

        data = {m: self.read(m, maps=True) for m in self.methods}
        skipped = np.asarray(sorted(self.skipped()), dtype=np.int64)
        need = sum(v.nbytes for d in data.values() for v in d.values()) * 1.1 + (1 << 20)
        folder = os.path.dirname(os.path.abspath(self.path))
        st = os.statvfs(folder)
        if st.f_bavail * st.f_frsize < need:
            raise _write_failed(self.path, OSError(errno.ENOSPC, "disk full"),
                                f"Every computed batch is kept in {self.parts_dir!r} (about {need / 1e6:.1f} MB are "
                                "needed to merge them).")
        tmp = f"{self.path}.tmp{os.getpid()}"
        try:
            with h5py.File(tmp, "w") as f:
                f.attrs["format_version"] = FORMAT_VERSION
                f.attrs["fingerprint"] = json.dumps(self.fingerprint, sort_keys=True)
                for k, v in self.attrs.items():
                    if k not in ("format_version", "fingerprint"):
                        f.attrs[k] = v
                for m, cols in data.items():
                    g = f.create_group(m)
                    for c, v in cols.items():
                        if c in self.maps:
                            v = v.astype(np.float16).reshape((len(cols["index"]),) + tuple(self.grid or (0, 0)))
                            g.create_dataset(c, data=v, maxshape=(None,) + v.shape[1:],
                                             chunks=(64,) + v.shape[1:] if v.shape[1:] != (0, 0) else None,
                                             fletcher32=True)
                        else:
                            g.create_dataset(c, data=v.astype("i8" if c in _INT_COLUMNS else "f8"),
                                             maxshape=(None,), chunks=(256,), fletcher32=True)
                f.create_dataset(_SKIPPED, data=skipped, maxshape=(None,), chunks=(256,))
            with open(tmp, "rb") as fh:
                os.fsync(fh.fileno())
            if self._h5 is not None:
                self._h5.close()
                self._h5 = None
            os.replace(tmp, self.path)
            _fsync_dir(folder)
        except (OSError, RuntimeError, ValueError) as e:
            with contextlib.suppress(OSError):
                os.remove(tmp)
            raise _write_failed(self.path, e, f"Every computed batch is kept in {self.parts_dir!r}.") from e
        for p in self._parts:  # merged: a kill before this is harmless, the next open skips their rows as duplicates
            with contextlib.suppress(OSError):
                os.remove(p)
        with contextlib.suppress(OSError):
            os.rmdir(self.parts_dir)
        self._parts = []
        self._base_index, self._base_skipped = {}, np.zeros(0, np.int64)
        self._reset_new()
        self._open_base()
        self._check_structure()

    def close(self) -> None:
        if self._h5 is not None:
            self._h5.close()
            self._h5 = None
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # releases the flock
            self._lock_fd = None

    def __enter__(self) -> ResultStore:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def load_store(path: str, name: str = STORE_NAME) -> ResultStore:
    r"""Open an existing result store read-only, whatever run wrote it (a folder: its ``results.h5``).

    The fingerprint, methods and columns are taken from the file; committed rows and the parts of
    an interrupted run are read and checked as when a run resumes it. ``store.attrs`` holds the
    run's facts: ``n_total`` (the images the run was asked for), ``run`` (JSON: model name,
    checkpoint, dataset name and root) and ``complete``.

    Raises:
        FileNotFoundError: no such store.
        StoreVersionError: written by a version of captum-vit with another store format.
        StoreCorruptError: damaged, of an impossible structure, or not a result store.
    """
    if os.path.isdir(path) and not path.endswith(".h5"):
        store = os.path.join(path, name)
        if not os.path.exists(store) and not os.path.isdir(store + ".parts"):
            raise FileNotFoundError(f"no result store in folder {path!r} (expected {name} there): give the "
                                    "--out folder of a `captum-vit evaluate` run, or run the evaluation first")
        path = store
    elif not os.path.exists(path) and not os.path.isdir(path + ".parts"):
        raise FileNotFoundError(f"no result store at {path!r}: give the --out folder of a `captum-vit evaluate` run "
                                f"(or its {name}), or run the evaluation first")
    return ResultStore(path, {}, [], [], mode="r")

