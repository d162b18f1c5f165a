"""Per-class attribute phrases for FedMVP's PromptFormer, and the sentences made from them.

An attribute file is JSON: an object from each class name to a list of short phrases describing
what the class looks like ("short sleeves", "a collar"). A sentence is "a photo of a {class},
which has {phrase}." ("which is {phrase}" for a phrase starting with "a", "an" or "used", "which
{phrase}" for one starting with "has", "often", "typically", "may" or "can"), as the official code
words them. Where to take the phrases from, first found wins:

1. the file the device was given (`--attributes FILE`), copied into its state folder so that
   later rounds and `fedprompt predict` read the same phrases;
2. a file shipped with fedprompt whose classes are exactly the device's classes (this package:
   `fashion-mnist.json` for the built-in data set);
3. none: one sentence per class, "a photo of a {class}.", said once in the log.

For an ImageFolder tree, write one key per class folder name (all of them, no others), each with
a few phrases; CLIP's context length truncates long sentences.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from fedprompt.common.files import write_atomically

log = logging.getLogger(__name__)
STATE_FILE = "attributes.json"
_IS = ("a", "an", "used")
_VERB = ("has", "often", "typically", "may", "can")


class AttributeFileError(ValueError):
    """An attribute file that cannot be used; the message is one line."""


@dataclass(frozen=True)
class Sentences:
    """The sentences of every class, and the class index of each."""

    texts: tuple[str, ...]
    classes: tuple[int, ...]
    source: str  # where the phrases came from (a file, or "class names")


def read_attributes(path: str | Path, class_names: Sequence[str]) -> dict[str, list[str]]:
    """Parse and check an attribute file against the device's classes."""
    path = Path(path)
    try:
        values = json.loads(path.read_text(encoding="utf-8"))
    except OSError as error:
        raise AttributeFileError(f"cannot read the attribute file {path}: {error.strerror}") from None
    except ValueError as error:
        raise AttributeFileError(f"{path} is not JSON ({error})") from None
    return check_attributes(values, class_names, str(path))


def check_attributes(values: object, class_names: Sequence[str], where: str) -> dict[str, list[str]]:
    if not isinstance(values, dict) or not all(
        isinstance(v, list) and v and all(isinstance(p, str) and p.strip() for p in v)
        for v in values.values()
    ):
        raise AttributeFileError(f"{where} must map each class name to a non-empty list of phrases")
    missing = [name for name in class_names if name not in values]
    extra = sorted(set(values) - set(class_names))
    if missing or extra:
        raise AttributeFileError(
            f"{where} does not fit the classes: missing {missing or 'none'}, unknown {extra or 'none'}"
        )
    return {name: [p.strip() for p in values[name]] for name in class_names}


def sentence(class_name: str, phrase: str) -> str:
    first = phrase.split(maxsplit=1)[0].lower()
    clause = (
        f"which is {phrase}"
        if first in _IS
        else f"which {phrase}"
        if first in _VERB
        else f"which has {phrase}"
    )
    return f"a photo of a {class_name}, {clause}."


def sentences(
    class_names: Sequence[str], attributes: Mapping[str, Sequence[str]] | None, source: str
) -> Sentences:
    """The classifier's and PromptFormer's sentences; class-name sentences without attributes."""
    if attributes is None:
        texts = [f"a photo of a {name}." for name in class_names]
        return Sentences(tuple(texts), tuple(range(len(class_names))), "class names")
    pairs = [(sentence(name, p), k) for k, name in enumerate(class_names) for p in attributes[name]]
    return Sentences(tuple(t for t, _ in pairs), tuple(k for _, k in pairs), source)


def install(path: str | Path, state_dir: Path, class_names: Sequence[str]) -> None:
    """Check the device's attribute file and keep a copy in its state folder."""
    checked = read_attributes(path, class_names)
    state_dir.mkdir(parents=True, exist_ok=True)
    write_atomically(state_dir / STATE_FILE, json.dumps(checked, indent=1).encode())


def device_sentences(state_dir: Path, class_names: Sequence[str]) -> Sentences:
    """The sentences this device uses (see the module docstring for the order)."""
    own = state_dir / STATE_FILE
    if own.exists():
        return sentences(class_names, read_attributes(own, class_names), str(own))
    for shipped in resources.files(__package__).iterdir():
        if shipped.name.endswith(".json"):
            values = json.loads(shipped.read_text(encoding="utf-8"))
            if isinstance(values, dict) and set(values) == set(class_names):
                return sentences(
                    class_names, check_attributes(values, class_names, shipped.name), shipped.name
                )
    log.warning(
        "FedMVP: no attribute file for these classes (give one with --attributes FILE); "
        "using one class-name sentence per class"
    )
    return sentences(class_names, None, "class names")
