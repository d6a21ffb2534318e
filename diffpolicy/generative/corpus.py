"""A text corpus available offline: the docstrings of Python's standard library, collected at run time.

Characters are the 95 printable ASCII symbols (space .. '~'); whitespace runs become one space and
other characters are dropped. The text depends on the running Python's version (recorded by the
callers that report numbers).
"""

from __future__ import annotations

import importlib
import inspect
import re
import warnings

import torch

from diffpolicy.errors import InvalidValueError

VOCAB = "".join(chr(c) for c in range(32, 127))
MODULES = (
    "abc", "argparse", "ast", "base64", "bisect", "calendar", "collections", "colorsys", "contextlib", "copy",
    "csv", "dataclasses", "datetime", "decimal", "difflib", "enum", "fractions", "functools", "glob", "gzip",
    "heapq", "hmac", "html", "inspect", "io", "ipaddress", "itertools", "json", "logging", "operator",
    "pathlib", "pickle", "pprint", "queue", "random", "re", "shlex", "shutil", "statistics", "string",
    "struct", "subprocess", "tempfile", "textwrap", "threading", "timeit", "typing", "unittest", "uuid",
    "warnings", "weakref", "zipfile",
)


def clean(text: str) -> str:
    """Collapse whitespace to single spaces and keep only characters of `VOCAB`."""
    return "".join(ch for ch in re.sub(r"\s+", " ", text).strip() if " " <= ch <= "~")


def stdlib_docstrings(modules: tuple[str, ...] = MODULES) -> list[str]:
    """The cleaned docstrings of each module and of the classes / functions it defines, in a fixed order."""
    docs: list[str] = []
    for name in modules:
        module = importlib.import_module(name)
        objects = [module] + [obj for _, obj in sorted(vars(module).items())
                              if (inspect.isclass(obj) or inspect.isfunction(obj))
                              and getattr(obj, "__module__", None) == module.__name__]
        for obj in objects:
            with warnings.catch_warnings():  # e.g. typing.io's deprecation, raised on attribute access
                warnings.simplefilter("ignore", DeprecationWarning)
                doc = inspect.getdoc(obj)
            if doc and len(clean(doc)) >= 32:
                docs.append(clean(doc))
    return docs


def encode(text: str) -> torch.Tensor:
    """Characters of `VOCAB` -> ids `(len,)` int64."""
    bad = sorted({ch for ch in text if not " " <= ch <= "~"})
    if bad:
        raise InvalidValueError(f"encode: characters outside printable ASCII: {bad[:5]}")
    return torch.tensor([ord(ch) - 32 for ch in text], dtype=torch.int64)


def decode(ids: torch.Tensor, mask_symbol: str = "_") -> str:
    """Ids `(len,)` -> text; the MASK id (len(VOCAB)) shows as `mask_symbol`."""
    return "".join(VOCAB[i] if i < len(VOCAB) else mask_symbol for i in ids.tolist())


def windows(docs: list[str], length: int, validation_fraction: float = 0.1) -> tuple[torch.Tensor, torch.Tensor]:
    """Non-overlapping windows of `length` characters from the joined docstrings (joined by a space):
    -> (train `(N, length)`, validation `(M, length)`), validation being the last fraction of the text."""
    if isinstance(length, bool) or not isinstance(length, int) or length < 2:
        raise InvalidValueError(f"windows: length must be an int >= 2, got {length!r}")
    ids = encode(" ".join(docs))
    count = len(ids) // length
    if count < 2:
        raise InvalidValueError(f"windows: the corpus ({len(ids)} characters) is too short for two windows of "
                                f"{length}")
    chunks = ids[:count * length].view(count, length)
    split = count - max(1, int(round(count * validation_fraction)))
    return chunks[:split], chunks[split:]
