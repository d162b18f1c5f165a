"""`fedprompt verify BUNDLE`: hashes, signature, files, every manifest field against the open_clip
model rebuilt from the manifest, the tokenizer, and the graphs and torch towers against that model
on fresh random inputs. Prints one line per check."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import onnx
import open_clip
import torch
from open_clip.tokenizer import default_bpe
from safetensors.torch import load_file

from edge_client.bundle import (
    MANIFEST,
    MANIFEST_FIELDS,
    Bundle,
    BundleError,
    check_signature,
    referenced_files,
    sha256_file,
)
from edge_client.bundle_signature import SIGNATURE_FILE
from export.decoder import DecoderSource, LoadedDecoder, decoder_tensors, load_decoder
from export.errors import ExportError
from export.manifest import describe_model
from export.models import WeightsSource, build_model
from export.parity import ParityCheck, measure_parity, parity_checks
from export.towers import image_tower_spec, image_tower_tensors, text_parts

LABEL = 20  # width of the check-name column
VERSIONED = ("torch", "open_clip", "onnx", "onnxruntime")
# Texts the bundle's tokenizer must turn into open_clip's ids: class names with punctuation and
# unicode, escapes, contractions, text longer than the context.
TOKENIZER_PROBES = (
    "a photo of a cat.",
    "X X X X golden_retriever.",
    "it's a dog's life, isn't it? we'll see; they're here, you've won, I'm done, he'd go",
    "Café crème brûlée, jalapeño, Škoda, Øresund, İstanbul, ß",
    "東京タワー, 서울, Москва, Αθήνα, القاهرة, मुंबई",
    "ＬＯＵＤ　ＮＯＩＳＥＳ, ﬂuﬃeﬆ, “quoted” ‘single’",
    "&lt;b&gt;bold&lt;/b&gt; &amp;amp; &EACUTE;t&eacute; &#x2019; &#8217;",
    "emoji 👍🏽 🏳️‍🌈 🐈‍⬛",
    "n°5 — 3½ cups, 1,000.50 €, 42nd, ²³, Ⅷ, ١٢٣",
    "tab\there\r\nnew line\u2028and\x85more\x1b[31m red\x1b[0m\x00",
    "<start_of_text>already marked<end_of_text>",
    "a very long caption " * 30,
)


def verify_bundle(path: Path, echo: Callable[[str], None] = print, trusted_keys: Sequence[Path] = ()) -> bool:
    """Run every check, print a line for each, return True when all pass."""
    try:
        bundle = Bundle.open(path)
        echo(f"{'hashes':<{LABEL}}ok, {len(bundle.manifest['files'])} files match {MANIFEST}")
        if trusted_keys:
            signer = check_signature(bundle.path, (bundle.path / MANIFEST).read_bytes(), trusted_keys)
            echo(f"{'signature':<{LABEL}}ok, {MANIFEST} signed by trusted key {signer}")
        model = rebuild_model(bundle)
        decoder = rebuild_decoder(bundle, model)
    except (BundleError, ExportError) as error:
        echo(f"FAILED: {error}")
        echo("verify: FAILED")
        return False
    manifest = bundle.manifest
    echo(
        f"{'model':<{LABEL}}{manifest['model']} rebuilt from weights {manifest['weights']} "
        f"(seed {manifest['seed']}); tower tensors identical to the bundle's"
    )
    ok = True
    try:
        for label, problems, success in _static_checks(bundle, model, decoder):
            for problem in problems:
                echo(f"{label:<{LABEL}}FAILED: {problem}")
            if not problems:
                echo(f"{label:<{LABEL}}ok, {success}")
            ok &= not problems
    except (KeyError, TypeError, ValueError, AttributeError) as error:
        echo(f"{'manifest':<{LABEL}}FAILED: {MANIFEST} is malformed ({type(error).__name__}: {error})")
        ok = False
    if not ok:
        echo("verify: FAILED (graphs not compared: the manifest does not describe this model)")
        return False
    measured = parity_checks(measure_parity(model, bundle))
    for check in measured:
        echo(f"{check.label:<{LABEL}}{check.detail}")
        ok &= check.passed
    problems = _recorded_parity_problems(manifest["parity"], measured)
    for problem in problems:
        echo(f"{'recorded parity':<{LABEL}}FAILED: {problem}")
    if not problems:
        echo(f"{'recorded parity':<{LABEL}}ok, the export's {len(measured)} results pass their limits")
    ok &= not problems
    echo("verify: all checks passed" if ok else "verify: FAILED")
    return ok


def _static_checks(
    bundle: Bundle, model: torch.nn.Module, decoder: LoadedDecoder | None
) -> Iterator[tuple[str, list[str], str]]:
    """(label, problems, what passing means) for every check that needs no graph run."""
    manifest = bundle.manifest
    expected = describe_model(
        manifest["model"],
        model,
        WeightsSource(**manifest["weights_source"]),
        manifest["seed"],
        manifest["opset"],
        manifest["precisions"],
        decoder,
    )
    yield (
        "files",
        _file_problems(bundle),
        f"the files on disk are exactly the {len(manifest['files'])} listed",
    )
    problems = [
        f"{MANIFEST} has a field verify does not know: {key}"
        for key in manifest
        if key not in MANIFEST_FIELDS
    ]
    problems += [p for key in expected for p in _differences(key, manifest.get(key), expected[key])]
    problems += _version_problems(manifest.get("versions"), decoder is not None)
    yield (
        "manifest",
        problems,
        f"{len(expected)} fields match the rebuilt model, versions recorded "
        f"(capabilities: {', '.join(manifest['capabilities'])})",
    )
    opsets = {name: _opset(bundle.path / name) for name in manifest["files"] if name.endswith(".onnx")}
    wrong = [
        f"{name} is opset {o}, the manifest says {manifest['opset']}"
        for name, o in opsets.items()
        if o != manifest["opset"]
    ]
    yield "opset", wrong, f"every graph is opset {manifest['opset']}"
    if decoder is not None:
        yield (
            "decoder tokenizer",
            _decoder_tokenizer_problems(bundle, decoder),
            "tokenizer.json identical to the decoder's",
        )
    yield (
        "tokenizer",
        _tokenizer_problems(bundle),
        (f"vocabulary identical to open_clip's; ids equal open_clip's on {len(TOKENIZER_PROBES)} texts"),
    )


def _file_problems(bundle: Bundle) -> list[str]:
    """Listed files = the parts' files and the vocabulary = files on disk (besides the manifest
    and its signature), with the recorded sizes. (Whether the parts are the model's is a
    manifest check.)"""
    listed, needed = set(bundle.manifest["files"]), set(referenced_files(bundle.manifest))
    on_disk = {f.name for f in bundle.path.iterdir() if f.is_file()} - {MANIFEST, SIGNATURE_FILE}
    problems = [f"{name} is on disk but not listed in {MANIFEST}" for name in sorted(on_disk - listed)]
    problems += [f"{name} is listed but belongs to no part" for name in sorted(listed - needed)]
    problems += [
        f"{name} is {(bundle.path / name).stat().st_size} bytes, the manifest says {entry.get('bytes')}"
        for name, entry in bundle.manifest["files"].items()
        if (bundle.path / name).stat().st_size != entry.get("bytes")
    ]
    return problems


def _differences(path: str, actual: Any, expected: Any) -> Iterator[str]:
    """One line per leaf where the manifest differs from what the model gives."""
    if isinstance(expected, dict) and isinstance(actual, dict):
        for key in sorted(set(actual) | set(expected)):
            if key not in expected:
                yield f"{path}.{key} is in the manifest but not a field of this model"
            elif key not in actual:
                yield f"{path}.{key} is missing (the model has {expected[key]!r})"
            else:
                yield from _differences(f"{path}.{key}", actual[key], expected[key])
    elif _normalised(actual) != _normalised(expected):
        yield f"{path} is {actual!r} in the manifest, {_normalised(expected)!r} in the rebuilt model"


def _normalised(value: Any) -> Any:
    """JSON's view of a value (tuples are lists)."""
    if isinstance(value, tuple | list):
        return [_normalised(v) for v in value]
    return value


def _version_problems(versions: Any, captioning: bool) -> list[str]:
    names = (*VERSIONED, "transformers") if captioning else VERSIONED
    if not isinstance(versions, dict) or set(versions) != set(names):
        return [f"versions must name exactly {', '.join(names)}"]
    return [f"versions.{k} is not a version string" for k, v in versions.items() if not isinstance(v, str)]


def _opset(path: Path) -> int:
    graph = onnx.load(str(path), load_external_data=False)
    return next(o.version for o in graph.opset_import if o.domain in ("", "ai.onnx"))


def _tokenizer_problems(bundle: Bundle) -> list[str]:
    """The bundle's vocabulary must be open_clip's file and its tokenizer must give open_clip's ids."""
    vocab = bundle.path / bundle.manifest["tokenizer"]["vocab"]
    if sha256_file(vocab) != sha256_file(Path(default_bpe())):
        return [f"{vocab.name} differs from open_clip's vocabulary"]
    reference = open_clip.get_tokenizer(bundle.manifest["model"])
    ours = bundle.tokenizer()(list(TOKENIZER_PROBES))
    theirs = reference(list(TOKENIZER_PROBES), context_length=bundle.context_length)
    return [
        f"ids differ from open_clip's for {text[:40]!r}"
        for text, a, b in zip(TOKENIZER_PROBES, ours, theirs, strict=True)
        if not torch.equal(a, b)
    ]


def _decoder_tokenizer_problems(bundle: Bundle, decoder: LoadedDecoder) -> list[str]:
    stored = (bundle.path / bundle.parts["decoder_tokenizer"]["file"]).read_text()
    return (
        []
        if stored == decoder.tokenizer_json
        else ["the bundle's decoder tokenizer differs from the decoder's"]
    )


def rebuild_decoder(bundle: Bundle, model: torch.nn.Module) -> LoadedDecoder | None:
    """The decoder the bundle was exported with (reloaded from its recorded source); its tensors
    and the projection's must equal the bundle's. None for a bundle without captioning."""
    if "decoder" not in bundle.parts:
        return None
    try:
        source = DecoderSource(**bundle.parts["decoder"]["source"])
    except TypeError as error:
        raise ExportError(f"{MANIFEST}: parts.decoder.source is malformed ({error})") from error
    image_spec = image_tower_spec(model)
    decoder = load_decoder(
        source, int(text_parts(model).text_projection.shape[1]), image_spec, bundle.manifest["seed"]
    )
    for name, rebuilt in decoder_tensors(decoder).items():
        stored = load_file(str(bundle.path / name))
        if rebuilt.keys() != stored.keys() or any(not torch.equal(rebuilt[k], stored[k]) for k in stored):
            raise ExportError(f"the rebuilt decoder differs from {name} (different weights or torch version)")
    return decoder


def _recorded_parity_problems(recorded: Any, measured: list[ParityCheck]) -> list[str]:
    """The export's parity results must cover the checks made now and pass their limits."""
    checks = parity_checks(recorded) if isinstance(recorded, dict) else []
    if [c.label for c in checks] != [c.label for c in measured]:
        return ["the export's parity results do not cover the same checks as this verify"]
    return [f"the export recorded {c.label} outside its limit" for c in checks if not c.passed]


def rebuild_model(bundle: Bundle) -> torch.nn.Module:
    """The open_clip model the bundle was exported from; its tower tensors must equal the bundle's."""
    try:
        source = WeightsSource(**bundle.manifest["weights_source"])
    except TypeError as error:
        raise ExportError(f"{MANIFEST}: weights_source is malformed ({error})") from error
    if source.kind == "path":
        weights_file = Path(source.value)
        if not weights_file.is_file():
            raise ExportError(
                f"weights file {weights_file} (named in the manifest) is missing; verify needs it"
            )
        if sha256_file(weights_file) != source.sha256:
            raise ExportError(f"weights file {weights_file} changed since export (sha256 differs)")
    model = build_model(bundle.manifest["model"], source, bundle.manifest["seed"])
    towers = {"text_tower": text_parts(model).state_dict()}
    if "image_tower" in bundle.parts:
        towers["image_tower"] = image_tower_tensors(model)
    for part, rebuilt in towers.items():
        name = bundle.parts[part]["file"]
        stored = load_file(str(bundle.path / name))
        if rebuilt.keys() != stored.keys() or any(not torch.equal(rebuilt[k], stored[k]) for k in stored):
            raise ExportError(
                f"the rebuilt model's {part.replace('_', ' ')} differs from {name} "
                "(different weights, or random weights drawn by another torch version)"
            )
    return model


def summary(manifest: dict[str, Any]) -> str:
    """One line that names a bundle."""
    return (
        f"{manifest['model']} (weights {manifest['weights']}, opset {manifest['opset']}, "
        f"precisions {', '.join(manifest['precisions'])}, capabilities {', '.join(manifest['capabilities'])})"
    )
