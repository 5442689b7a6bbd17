"""The pipeline commands, files in and files out:

    latentspace encode MODEL DATA --out Z.npy            rows -> latent codes
    latentspace index build Z.npy --out IDX              codes -> a FlatIndex file
    latentspace search IDX QUERIES.npy -k 10 --out R.npz  queries -> distances, indices

Inputs are read in chunks, with memory bounded by a chunk: a .npy, an .npz member or an HDF5
dataset is read a block of rows at a time (_streamed_inputs; not mapped: a mapped file cut
short while read killed the process with SIGBUS). Outputs are written atomically (a temporary file beside the target,
renamed over it at the end). A tqdm bar shows progress on
stderr when it is a terminal (never with --quiet). Bad input raises ValueError / OSError,
which cli.main turns into one error line and exit status 2; it names the Python API's
parameters in them as the flags the user typed, through each command's `api_names`
(see renamed).
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import re
import sys
import time
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from . import datasets
from ._arrays import (STORED_ROWS_NAME, as_matrix, check_int, check_k, check_rows_usable, check_sample_shape,
                      check_weighted_rows, check_weights, empty_results)
from ._memory_limit import memory_limit
from ._atomic import atomic_path, atomic_write, unwritable
from ._paths import too_long
from ._thread_stacks import stack_room_error
from ._streamed_inputs import ArrayRows, open_rows
from .indexes import load_index
from .indexes.flat import check_rows_for_index, save_rows_as_index
from .runtime import set_num_threads

__all__ = ["add_commands", "check_out", "check_out_folder", "clip_typed", "echoed", "made_folder", "make_folder",
           "option_array", "option_labels", "renamed", "seed_number", "thread_count", "whole_number"]

_ROWS_PER_CHUNK = 65536  # index build: rows read, checked and copied per step
_QUERIES_PER_CHUNK = 4096  # search: queries per native call (results are (Q, k): small)
INDEX_SUFFIX = ".lsidx"  # index build --out: the suffix of the docs' index files

# The Python API's parameter names in each command's errors -> the flag the user typed
# (cli.main renames them; see renamed). "path" is in none: the readers name an input file so
# too, so --out is checked by the commands themselves (check_out).
_ENCODE_NAMES = {"key": "--key", "device": "--device"}
_INDEX_BUILD_NAMES = {"key": "--key", "weights": "--weights"}
# (STORED_ROWS_NAME: FlatIndex.search's name for the index's vectors, which weights can make
# unusable; "database": knn's.)
_SEARCH_NAMES = {"key": "--key", "k": "-k", "weights": "--weights", "device": "--device", "database": "{index}",
                 STORED_ROWS_NAME: "{index}"}


# The most of a value the user typed that an error message shows (a 10,000-character --out,
# or a list of thousands of items, filled the terminal): its start and its end.
ECHO_CHARS = 200
_ECHO_HEAD = 150


def echoed(value: Any, *, quoted: bool = False) -> str:
    """A value the user typed, as an error message shows it: its text (its repr() when
    quoted). One longer than ECHO_CHARS keeps its first and last characters (a path's file
    name), with an ellipsis between and its whole length after."""
    text = str(value)
    shown = repr(text) if quoted else text
    if len(text) <= ECHO_CHARS:
        return shown
    return f"{shown[:_ECHO_HEAD]}...{shown[_ECHO_HEAD - ECHO_CHARS:]} ({len(text):,} characters)"


def clip_typed(message: str, typed: Any) -> str:
    """The message with each long value of `typed` (the command line's strings) that it holds
    whole clipped by echoed: for the messages latentspace's API, the OS and argparse word
    themselves ("[Errno 2] No such file or directory: '...'", "invalid choice: '...'")."""
    values = {str(v) for v in typed if isinstance(v, str) and len(v) > ECHO_CHARS}
    values |= {str(Path(v)) for v in values}  # as a path reads it back ("a//b/" -> "a/b")
    for value in sorted(values, key=len, reverse=True):
        if len(value) > ECHO_CHARS:
            message = message.replace(repr(value), echoed(value, quoted=True)).replace(value, echoed(value))
    return message


def _show_progress(args: argparse.Namespace) -> bool:
    return not args.quiet and sys.stderr.isatty()


def whole_number(minimum: int, maximum: int | None = None):
    """An argparse type: a whole number >= minimum (and <= maximum), refused while the command
    line is parsed (one line, exit 2, naming the flag)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = minimum - 1
        if value < minimum:
            raise argparse.ArgumentTypeError(f"expected an integer >= {minimum}, got {echoed(text, quoted=True)}")
        if maximum is not None and value > maximum:
            raise argparse.ArgumentTypeError(f"expected an integer <= {maximum}, got {echoed(text, quoted=True)}")
        return value

    return parse


_whole_thread_count = whole_number(1, 2**31 - 1)


# Every --threads at most this many a processor the process may run on (and at least 256 in
# all): the commands hand the count to torch too, whose OpenMP pool could not start 20,000
# threads on a 2-core machine (the process ended: "libgomp: Thread creation failed") and with
# 100,000 `latentspace train` segfaulted (exit 139); 4,096 started. Past a few a processor more
# threads only slow the work down.
THREADS_PER_PROCESSOR = 64
FEWEST_THREADS_ALLOWED = 256


def most_threads() -> int:
    """The largest --threads the commands take on this machine."""
    try:
        processors = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # (no sched_getaffinity: macOS, Windows)
        processors = os.cpu_count() or 1
    return max(FEWEST_THREADS_ALLOWED, THREADS_PER_PROCESSOR * processors)


def thread_count(text: str) -> int:
    """Every --threads: a C int (the native count), at most most_threads(), whose stacks fit
    the address space a `ulimit -v` leaves (set_num_threads would name its own `n` for both)."""
    value = _whole_thread_count(text)
    too_many = stack_room_error(value)
    if too_many is not None:
        raise argparse.ArgumentTypeError(too_many.removeprefix("n: "))  # argparse names --threads
    most = most_threads()
    if value > most:
        raise argparse.ArgumentTypeError(
            f"expected at most {most:,} threads ({THREADS_PER_PROCESSOR} a processor this process may use), got {value:,}")
    return value


# Every --seed: what training takes (torch.manual_seed gave 'Overflow when unpacking long
# long' for 2**64, naming nothing, and train named its own `seed`).
seed_number = whole_number(0, 2**63 - 1)


def _set_threads(args: argparse.Namespace) -> None:
    if args.threads is not None:
        set_num_threads(args.threads)
        if "torch" in sys.modules:  # only the encoding commands load torch
            sys.modules["torch"].set_num_threads(args.threads)


def renamed(message: str, names: dict[str, str]) -> str:
    """An API error's message in the command line's words: a leading "name: " (a Python
    parameter) becomes names[name], what the user typed (a flag, or a file); every flag's
    "name=" in the rest of the message too ("pass key= to pick one" -> "pass --key to pick
    one", "val_fraction=0.5" -> "--val-fraction 0.5"), and a leading "name[i]: " (one value
    of a list) becomes "FLAG: item i+1: " (counted from 1, as a user counts the
    comma-separated values typed).
    Messages that name something else are returned as they are."""
    head, sep, rest = message.partition(": ")
    item = re.fullmatch(r"(\w+)\[(\d+)\]", head)  # "hidden[1]: ...", one value of a list flag
    if sep and item and item[1] in names and names[item[1]].startswith("-"):
        return f"{names[item[1]]}: item {int(item[2]) + 1}: {rest}"
    if not sep or head not in names:
        return message
    for name, flag in names.items():  # "val_fraction=0.5" -> "--val-fraction 0.5", for every flag
        if flag.startswith("-"):
            rest = re.sub(rf"(?<!\S){re.escape(name)}= ?", f"{flag} ", rest)
    return f"{names[head]}: {rest}"


def _check_suffix(path: str, suffix: str, option: str) -> Path:
    if not path:  # (an unset shell variable: "got ''" read as a wrong suffix, not a missing name)
        raise ValueError(f"{option}: empty; expected a file name ending in {suffix}")
    if not path.lower().endswith(suffix):
        raise ValueError(f"{option}: expected a file name ending in {suffix}, got {echoed(path, quoted=True)}")
    return Path(path)


def check_out(path: str, suffix: str, *inputs: str | None) -> Path:
    """--out, checked before any work, naming --out (atomic_path checks the folder again when
    it writes, naming its own `path`): its suffix, its length (a name too long for the file
    system), its folder, and that it is none of the command's input files, which the atomic
    rename would replace without a word."""
    out = _check_suffix(path, suffix, "--out")
    problem = unwritable(out)
    if problem is not None:
        raise ValueError(f"--out: {problem[1]}")
    for given in inputs:
        if given is not None and out.exists() and os.path.exists(given) and os.path.samefile(out, given):
            raise ValueError(f"--out: {echoed(out)} would replace the input {echoed(given)}; write to another file")
    return out


def check_out_folder(path: str) -> Path:
    """--out FOLDER's name, checked against the file system's limits before it is looked at
    (Path.exists raised '[Errno 36] File name too long' with the whole name, naming nothing),
    and refused when empty: Path("") is the current folder, into which an unset shell variable
    scattered the files."""
    if not path:
        raise ValueError("--out: empty; expected a folder's path")
    problem = too_long(path)
    if problem is not None:
        raise ValueError(f"--out: {problem}")
    return Path(path)


def make_folder(path: str) -> Path:
    """--out FOLDER, created (with its parents) if missing; an error naming --out when it
    cannot be (a file there or above it: OSError's '[Errno 17] File exists' named nothing)."""
    out = check_out_folder(path)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise ValueError(f"--out: {echoed(out)} cannot be made a folder ({error.strerror or error})") from None
    return out


@contextlib.contextmanager
def made_folder(path: str) -> Iterator[Path]:
    """make_folder(path) for the block's work; the folders it made (the leaf and any missing
    parents) are removed again when the block ends with them empty, however it ends."""
    out = check_out_folder(path)
    missing = [folder for folder in (out, *out.parents) if not folder.exists()]  # deepest first
    out = make_folder(path)
    try:
        yield out
    finally:
        for folder in missing:
            try:
                folder.rmdir()  # only an empty folder; a parent goes only once its child has
            except OSError:
                break


@contextlib.contextmanager
def _input_rows(path: str, key: str | None) -> Iterator[Any]:
    """The rows of a .npy, .npz or HDF5 (--key), for the block, read a block at a time
    (open_rows; an array for the few it reads whole)."""
    if Path(path).suffix.lower() == ".npy" and key is not None:
        raise ValueError(f"--key: a .npy file holds one array; got --key {echoed(key, quoted=True)}")
    with open_rows(path, key) as rows:
        yield rows


@contextlib.contextmanager
def _damage_first(rows: Any) -> Iterator[None]:
    """An error about the rows read so far (a NaN row) may be the garbage of a damaged
    compressed member, whose CRC is known only at its end: the rest is read first (a block at a
    time; a whole read took as long before any row was used), and damage reported instead.
    (The rows' own damage errors are raised again as they are.)"""
    try:
        yield
    except ValueError:
        rows.verify_rest()
        raise


def option_array(path: str, option: str, key: str | None = None, key_option: str | None = None) -> np.ndarray:
    """An array file named by a CLI option (--labels, --weights), read by the data's own loader:
    it refuses a FIFO up front (np.load would block on one forever), reads .npz archives
    safely and never unpickles. Its ValueErrors are prefixed with the option, or name
    key_option (--labels-key), the flag that picks the archive's array, when they are about it."""
    try:
        return datasets.load_array(path, key)
    except ValueError as error:
        message = str(error)
        if key_option is not None and message.startswith("key: "):
            raise ValueError(renamed(message, {"key": key_option})) from None
        if message.startswith("key: "):  # an archive of several arrays, and no flag to pick one
            held = message[len("key: "):].partition("; pass key=")[0]
            raise ValueError(f"{option}: {held}; pass a .npy, or an .npz of one array") from None
        raise ValueError(f"{option}: {message}") from None


# The loader's refusals of an array's dtype ("has dtype <U1; expected real numbers", "an array
# of Python objects (dtype object)"), whose dtype option_labels names in its own words.
_REFUSED_DTYPE = re.compile(r"has dtype (.+?); expected real numbers|\(dtype (.+?)\), stored pickled")


def option_labels(path: str, rows: int, data: str, key: str | None = None,
                  key_option: str | None = None) -> np.ndarray:
    """--labels FILE (or the --labels-key array of the data's .npz, `path` then the data's):
    one integer class label per row of the data (`rows` of them; `data` names it), read as
    option_array reads it. Every other dtype is refused naming --labels, the dtype and the
    file: the loader's own refusal asked strings for "real numbers" (floats, which are no
    class labels either) and objects for "an array of numbers"."""
    try:
        labels = option_array(path, "--labels", key, key_option)
    except ValueError as error:
        refused = _REFUSED_DTYPE.search(str(error))
        if refused is None:
            raise
        _refuse_label_dtype(refused[1] or refused[2], path)
    if labels.ndim != 1 or labels.shape[0] != rows:
        raise ValueError(f"--labels: expected {rows} labels (one per row of {data}), got shape {labels.shape}")
    if labels.dtype.kind not in "iu":
        _refuse_label_dtype(str(labels.dtype), path)
    return labels


def _refuse_label_dtype(dtype: str, path: str) -> None:
    if dtype.startswith(("<U", ">U", "|S", "object")):  # class names: the user's step is to number them
        hint = "; number the class names first, e.g. np.unique(names, return_inverse=True)[1]"
    elif dtype.startswith("float"):
        hint = "; save whole-number labels as integers, e.g. labels.astype(np.int64)"
    else:
        hint = ""
    raise ValueError(f"--labels: expected integer class labels, got dtype {dtype} in {echoed(path)}{hint}")


def _model_shape(shape: tuple[int, ...], input_shape: tuple[int, ...], path: str) -> tuple[int, ...]:
    """The shape of the rows as the model takes them, as `latentspace train` shaped them:
    images (n, H, W) gain a channel axis for a ConvAutoencoder, image rows are flattened for
    an MLP."""
    if len(shape) < 2:
        raise ValueError(f"{echoed(path)}: expected rows of samples (n, ...), got shape {shape}")
    if len(input_shape) == 3 and len(shape) == 3:
        return (shape[0], 1, *shape[1:])
    if len(input_shape) == 1 and len(shape) > 2:
        return (shape[0], math.prod(shape[1:]))
    return shape


def _check_model_rows(encoder: Any, shape: tuple[int, ...], path: str) -> None:
    """Refuses rows (shaped for the model: _model_shape) that the model cannot take before any
    codes are made for them: the encoder sees them only with the first block, and the codes of
    all the rows came first (search --model allocated them: "Unable to allocate 14.6 TiB" for a
    file of 10**12 rows of no values, naming nothing; encode made a 16 TB output file)."""
    sample_shapes = encoder._sample_shapes  # (None: a module of unknown input shape)
    if sample_shapes is not None:
        try:
            check_sample_shape(shape, "X", sample_shapes)
        except ValueError as error:
            raise _in_file(path, error) from None


def _model_input(rows: Any, encoder: Any, path: str, batch_size: int) -> tuple[Any, tuple[int, ...]]:
    """(what the encoder reads, its shape, _model_shape): the rows' array reshaped (a view, no
    copy, for C-ordered rows), or for rows read a block at a time, a BlockSource of blocks of
    batch_size rows, each reshaped (the encoder's own chunks: the codes and errors are those
    of the array)."""
    from ._encode_stream import BlockSource

    shape = _model_shape(tuple(rows.shape), encoder.input_shape, path)
    _check_model_rows(encoder, shape, path)
    if rows.array is not None:
        return rows.array.reshape(shape), shape
    return BlockSource((block.reshape(len(block), *shape[1:]) for block in rows.blocks(batch_size)), shape), shape


def _encode_into(encoder: Any, X: Any, codes: np.ndarray, batch_size: int | None, progress: bool) -> np.ndarray:
    """encoder.encode(X, out=codes, ...) for an array, or for a BlockSource (which encode does
    not take: it is the CLI's own reader) the same steps on its blocks."""
    from ._encode_stream import BlockSource, UserOut

    if not isinstance(X, BlockSource):
        return encoder.encode(X, out=codes, batch_size=batch_size, progress=progress)
    batch_size = encoder.default_batch_size if batch_size is None else batch_size
    return encoder._encode_to(X, UserOut(codes, X.rows, encoder.latent_dim), batch_size, progress)


def _backend_line(encoder: Any) -> str:
    if encoder.backend == "native":
        return f"backend: native ({encoder.kernel} kernel, {encoder.precision})"
    return f"backend: torch on {encoder.device}, {encoder.precision} (not native: {encoder.reason})"


def _encoder(args: argparse.Namespace) -> Any:
    from .encoding import Encoder
    from .models import load_model

    return Encoder(load_model(args.model), device=args.device, precision=args.precision)


def _in_file(path: str, error: ValueError) -> ValueError:
    """The encoder's error about its input X, told about the file instead (rows read a block at
    a time are named as the array's: _model_input's BlockSource)."""
    message = str(error)
    return ValueError(f"{echoed(path)}: {message[3:] if message.startswith('X: ') else message}")


def _rate(count: int, seconds: float, unit: str) -> str:
    return f"{seconds:.2f} s, {count / seconds:,.0f} {unit}/s" if seconds > 0 and count else f"{seconds:.2f} s"


# ---------------------------------------------------------------------------------------
# latentspace encode


def _command_encode(args: argparse.Namespace) -> int:
    out_path = check_out(args.out, ".npy", args.model, args.data)
    batch_size = None if args.batch_size is None else check_int(args.batch_size, "--batch-size")
    with _input_rows(args.data, args.key) as rows:
        encoder = _encoder(args)
        _set_threads(args)
        chunk_rows = encoder.default_batch_size if batch_size is None else batch_size
        X, shape = _model_input(rows, encoder, args.data, chunk_rows)
        n = int(shape[0])
        started = time.perf_counter()
        with atomic_path(out_path) as tmp:
            codes = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float32, shape=(n, encoder.latent_dim))
            try:
                _encode_into(encoder, X, codes, batch_size, _show_progress(args))
            except ValueError as error:
                rows.verify_rest()  # the file's damage first (see _damage_first)
                raise _in_file(args.data, error) from None
            codes.flush()
            del codes  # unmapped before the file is fsynced and renamed
    seconds = time.perf_counter() - started
    print(f"latentspace encode: {n:,} rows of {args.data} -> {out_path}, ({n}, {encoder.latent_dim}) float32")
    print(f"  {_backend_line(encoder)}")
    print(f"  {_rate(n, seconds, 'rows')}")
    return 0


# ---------------------------------------------------------------------------------------
# latentspace index build


def _load_weights(path: str | None, metric: str, dim: int):
    """--weights W.npy (or a one-array .npz): per-dimension weights for metric weighted_l2,
    checked like the API's."""
    if path is None:
        return None
    if metric != "weighted_l2":
        raise ValueError(f"--weights: only the weighted_l2 metric takes weights (this index uses {metric})")
    return check_weights(option_array(path, "--weights"), dim)


def _command_index_build(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    # .lsidx only: `index build Z.npy --out Z.npy` replaced the vectors with their index
    check_out(args.out, INDEX_SUFFIX, args.vectors, args.weights)
    _set_threads(args)
    batch_size = check_int(args.batch_size, "--batch-size")
    with _input_rows(args.vectors, args.key) as Z:
        if Z.ndim != 2 or Z.shape[1] < 1:
            raise ValueError(f"{echoed(args.vectors)}: expected a 2-d array of vectors (n, dim), got shape {Z.shape}")
        n, dim = (int(s) for s in Z.shape)
        started = time.perf_counter()
        weights = _load_weights(args.weights, args.metric, dim)

        def checked_chunks():
            start = 0
            for block in Z.blocks(batch_size):  # a block read, checked and converted at a time
                chunk, _ = as_matrix(block, echoed(args.vectors), dim=dim)
                check_rows_for_index(chunk, echoed(args.vectors), weights, first_row=start)  # row numbers of the file
                yield np.ascontiguousarray(chunk, dtype="<f4")
                bar.update(chunk.shape[0])
                start += chunk.shape[0]

        # Streamed into the file chunk by chunk (the index is never held: an input larger than
        # memory makes an index that search --mmap searches), the same bytes index.save writes.
        with tqdm(total=n, unit="row", unit_scale=True, desc="index build", disable=not _show_progress(args),
                  file=sys.stderr, dynamic_ncols=True, leave=True) as bar, _damage_first(Z):
            save_rows_as_index(args.out, n, checked_chunks(), dim, args.metric, weights=weights)
    seconds = time.perf_counter() - started
    built = f"FlatIndex(dim={dim}, metric={args.metric!r}, ntotal={n})"
    print(f"latentspace index build: {built} from {args.vectors} -> {args.out} "
          f"({os.path.getsize(args.out):,} bytes)")
    print(f"  {_rate(n, seconds, 'rows')}")
    return 0


# ---------------------------------------------------------------------------------------
# latentspace search


def _command_search(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    out_path = check_out(args.out, ".npz", args.index, args.queries, args.model, args.weights)
    k = check_k(args.k)
    batch_size = check_int(args.batch_size, "--batch-size")
    if args.model is None and (args.device is not None or args.precision != "fp32"):
        raise ValueError("--device, --precision: they choose how --model encodes the queries; without --model "
                         "they would be ignored (the search runs on the CPU)")
    index = load_index(args.index, mmap=args.mmap)
    weights = _load_weights(args.weights, index.metric, index.dim)
    search_weights = index.weights if weights is None else weights  # None unless weighted_l2
    with _input_rows(args.queries, args.key) as rows:
        encoder = None
        if args.model is not None:
            encoder = _encoder(args)
            if encoder.latent_dim != index.dim:
                raise ValueError(f"--model: its codes have {encoder.latent_dim} dimensions but {echoed(args.index)} "
                                 f"holds {index.dim}-dimensional vectors")
            _model_shape(rows.shape, encoder.input_shape, args.queries)
        elif rows.ndim != 2 or rows.shape[1] != index.dim:
            hint = "; pass --model MODEL to encode raw queries first" if rows.ndim == 2 else ""
            raise ValueError(f"{echoed(args.queries)}: expected queries of shape (n, {index.dim}) (the index's dim), "
                             f"got {rows.shape}{hint}")
        _set_threads(args)
        nq = int(rows.shape[0])
        started = time.perf_counter()
        queries = rows if encoder is None else ArrayRows(_encoded_queries(args, rows, encoder, nq))
        name = f"{echoed(args.queries)} (encoded)" if encoder is not None else echoed(args.queries)
        distances, indices, _, _ = _results(nq, k)
        with tqdm(total=nq, unit="query", unit_scale=True, desc="search", disable=not _show_progress(args),
                  file=sys.stderr, dynamic_ncols=True, leave=True) as bar, _damage_first(queries):
            start = 0
            for block in queries.blocks(batch_size):
                chunk, _ = as_matrix(block, name, dim=index.dim)
                # (row numbers of the file; the search would name "queries", numbered in the chunk)
                if search_weights is None:
                    check_rows_usable(chunk, name, first_row=start)
                else:  # the first refused row whichever its kind, in the words knn uses
                    check_weighted_rows(chunk, search_weights, name, start)
                stop = start + chunk.shape[0]
                distances[start:stop], indices[start:stop] = index.search(chunk, k, weights=weights)
                bar.update(chunk.shape[0])
                start = stop
    with atomic_write(out_path) as f:
        np.savez(f, distances=distances, indices=indices)
    seconds = time.perf_counter() - started
    print(f"latentspace search: {nq:,} queries of {args.queries}, k={k}, in {index!r} -> {out_path} "
          "(distances, indices)")
    if encoder is not None:
        print(f"  queries encoded first, {_backend_line(encoder)}")
    print(f"  {_rate(nq, seconds, 'queries')}")
    return 0


def _encoded_queries(args: argparse.Namespace, rows: Any, encoder: Any, nq: int) -> np.ndarray:
    """search --model: the codes of all the queries at once ((q, latent_dim) codes are small,
    and rows keep their numbers), read as encode reads its rows."""
    X, _ = _model_input(rows, encoder, args.queries, encoder.default_batch_size)
    codes = np.empty((nq, encoder.latent_dim), np.float32)
    try:
        return _encode_into(encoder, X, codes, None, _show_progress(args))
    except ValueError as error:
        rows.verify_rest()  # the file's damage first (see _damage_first)
        raise _in_file(args.queries, error) from None


def _results(nq: int, k: int) -> tuple[np.ndarray, np.ndarray, Any, Any]:
    """empty_results for -k: one that could never fit is a usage error (exit 2), refused
    before numpy's lazy allocation of a part of it succeeds and the search is killed."""
    nbytes = nq * k * 12  # float32 distances and int64 indices (no queries need none)
    memory = memory_limit()
    if memory is not None and nbytes > memory.nbytes:
        raise ValueError(f"-k: {nq:,} queries x {k:,} neighbours need {nbytes / 2**30:,.1f} GiB of results, more "
                         f"than {memory}; lower -k")
    try:
        return empty_results("numpy", nq, k)
    except MemoryError as error:  # it fits the machine, not the memory free now: still -k's doing
        raise ValueError(str(error)) from None


# ---------------------------------------------------------------------------------------
# Parsers


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--key", default=None, help="array in an .npz, or hdf5 part (default: the only one / train)")
    parser.add_argument("--threads", type=thread_count, default=None, help="threads (latentspace and torch)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")


def _encoding_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--precision", choices=("fp32", "bf16"), default="fp32",
                        help="fp32 (default) or bf16 (weights and activations rounded to bfloat16)")
    parser.add_argument("--device", default=None,
                        help="cpu, cuda, cuda:N (default cpu; the native encoder runs on the CPU)")


def add_commands(sub: Any) -> None:
    """Adds `encode`, `index build` and `search` to cli.py's subparsers."""
    encode = sub.add_parser("encode", help="encode the rows of a data file with a saved model, into a .npy")
    encode.add_argument("model", help="a model file written by latentspace train / save_model")
    encode.add_argument("data", help="a .npy, .npz (--key) or ann-benchmarks .hdf5 file (read a block at a time)")
    encode.add_argument("--out", required=True, help="the codes, (n, latent_dim) float32 .npy (written atomically)")
    encode.add_argument("--batch-size", type=int, default=None,
                        help="rows per chunk (default 65536 native, 4096 torch; fewer for wide samples)")
    _encoding_options(encode)
    _common(encode)
    encode.set_defaults(run=_command_encode, api_names=_ENCODE_NAMES)

    index = sub.add_parser("index", help="build an index file from vectors")
    index_sub = index.add_subparsers(dest="index_command", required=True)
    build = index_sub.add_parser("build", help="a FlatIndex over the rows of a .npy of vectors (e.g. codes)")
    build.add_argument("vectors", help="(n, dim) vectors: .npy, .npz (--key) or .hdf5 (read a block at a time)")
    build.add_argument("--out", required=True, help=f"the index file, a {INDEX_SUFFIX} (written atomically)")
    build.add_argument("--metric", choices=("l2", "ip", "cosine", "weighted_l2"), default="l2", help="default l2")
    build.add_argument("--weights", default=None,
                       help="weighted_l2: a .npy of dim non-negative weights, stored as the index's default "
                            "(default: all ones)")
    build.add_argument("--batch-size", type=int, default=_ROWS_PER_CHUNK, help="rows per chunk (default 65536)")
    _common(build)
    build.set_defaults(run=_command_index_build, error_name="index build", api_names=_INDEX_BUILD_NAMES)

    search = sub.add_parser("search", help="the k nearest indexed vectors of each query, into an .npz")
    search.add_argument("index", help="an index file written by latentspace index build / index.save")
    search.add_argument("queries", help="(q, dim) queries (or raw rows with --model): .npy, .npz, .hdf5")
    search.add_argument("-k", type=int, default=10, help="neighbours per query (default 10)")
    search.add_argument("--out", required=True, help="an .npz with distances (q, k) float32 and indices (q, k) int64")
    search.add_argument("--model", default=None, help="encode the queries with this model file first")
    search.add_argument("--batch-size", type=int, default=_QUERIES_PER_CHUNK,
                        help="queries searched per chunk (default 4096)")
    search.add_argument("--mmap", action="store_true", help="map the index instead of reading it")
    search.add_argument("--weights", default=None,
                        help="weighted_l2 index: a .npy of per-dimension weights for this search "
                             "(default: the index's own)")
    _encoding_options(search)
    _common(search)
    search.set_defaults(run=_command_search, api_names=_SEARCH_NAMES)
