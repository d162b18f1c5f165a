"""The text cleaning of open_clip's tokenizer ('lower'), without ftfy, regex or open_clip.

open_clip cleans every text with `ftfy.fix_text`, then `html.unescape` twice, collapses whitespace
and lower-cases. ftfy is not a dependency of the edge client, so the fixers of its default
configuration that are rules rather than guesses are implemented here, in ftfy's order, repeated
until nothing changes, on each line separately:

- HTML entities that end in ';' (also all-caps names of lower-case entities, e.g. '&EACUTE;'),
  unless the text (from that line on) contains '<';
- C1 control characters read as Windows-1252;
- Latin ligatures ('ﬁ' -> 'fi') and fullwidth / halfwidth forms ('Ａ' -> 'A', U+3000 -> ' ');
- curly quotes made straight; CR, CRLF, U+2028, U+2029, U+0085 made '\\n';
- surrogate pairs joined, lone surrogates replaced by U+FFFD;
- ANSI terminal escapes and unintended control characters removed; NFC normalisation.

Not implemented: ftfy's mojibake repair (`fix_encoding`: guessing that text was decoded with the
wrong codec, e.g. 'cafÃ©' -> 'café'). Text that is correct Unicode, which class names and prompts
are, gives the ids open_clip gives (tests/test_tokenizer.py checks many strings).
"""

from __future__ import annotations

import html
import html.entities
import re
import unicodedata
from functools import cache

ANSI_ESCAPE = re.compile("\x1b\\[(?:\\d|;)*[a-zA-Z]")
ENTITY = re.compile(r"&#?[0-9A-Za-z]{1,24};")
SURROGATE = re.compile("[\ud800-\udfff]")
SURROGATE_PAIR = re.compile("[\ud800-\udbff][\udc00-\udfff]")
SINGLE_QUOTES = re.compile("[\u02bc\u2018-\u201b]")
DOUBLE_QUOTES = re.compile("[\u201c-\u201f]")
LINE_BREAKS = ("\r\n", "\r", "\u2028", "\u2029", "\u0085")
C1_CONTROLS = re.compile("[\x80-\x9f]")
# Latin ligatures and legacy digraphs, replaced by their compatibility decomposition.
LIGATURE_CODES = [0x132, 0x133, 0x149, *range(0x1C4, 0x1CD), *range(0x1F1, 0x1F4), *range(0xFB00, 0xFB07)]
# Control characters nobody means to type (ASCII controls except whitespace, deprecated Arabic
# format controls, the BOM, interlinear annotation and object replacement characters).
CONTROL_CODES = [*range(0x00, 0x09), 0x0B, *range(0x0E, 0x20), 0x7F, *range(0x206A, 0x2070), 0xFEFF]
CONTROL_CODES += range(0xFFF9, 0xFFFD)


def clean_lower(text: str) -> str:
    """open_clip's 'lower' cleaning of one text: fixed, unescaped twice, whitespace collapsed, lower case."""
    text = html.unescape(html.unescape(fix_text(text))).strip()
    return " ".join(text.split()).lower()


def fix_text(text: str) -> str:
    """The rule-based part of `ftfy.fix_text` with its default settings (see the module docstring)."""
    unescape = True
    fixed = []
    for line in _lines(text):
        unescape = unescape and "<" not in line  # ftfy's "auto": once a line has '<', no unescaping
        fixed.append(_fix_line(line, unescape))
    return "".join(fixed)


def _lines(text: str) -> list[str]:
    """The text cut after each '\\n' (ftfy's segments; `str.splitlines` cuts at more characters)."""
    lines, start = [], 0
    while start < len(text):
        end = text.find("\n", start) + 1 or len(text)
        lines.append(text[start:end])
        start = end
    return lines


def _fix_line(text: str, unescape: bool) -> str:
    while True:
        before = text
        if unescape:
            text = ENTITY.sub(_entity, text)
        text = C1_CONTROLS.sub(_windows_1252, text)
        text = text.translate(_character_map())
        text = SINGLE_QUOTES.sub("'", DOUBLE_QUOTES.sub('"', text))
        for line_break in LINE_BREAKS:
            text = text.replace(line_break, "\n")
        if SURROGATE.search(text):
            text = SURROGATE.sub("\ufffd", SURROGATE_PAIR.sub(_join_surrogates, text))
        text = ANSI_ESCAPE.sub("", text).translate(_control_map())
        text = unicodedata.normalize("NFC", text)
        if text == before:
            return text


def _entity(match: re.Match[str]) -> str:
    entity = match.group(0)
    if entity in _entities():
        return _entities()[entity]
    if entity.startswith("&#"):
        decoded = html.unescape(entity)
        return entity if ";" in decoded else decoded  # the semicolon must be part of the reference
    return entity


@cache
def _entities() -> dict[str, str]:
    """'&name;' -> character for HTML5's entities with a semicolon, plus the all-caps spelling of
    lower-case names that mean nothing else ('&EACUTE;' -> 'É')."""
    table = {}
    for name, char in html.entities.html5.items():
        if not name.endswith(";"):
            continue
        table[f"&{name}"] = char
        upper = f"&{name.upper()}"
        if name == name.lower() and html.unescape(upper) == upper:
            table[upper] = char.upper()
    return table


def _windows_1252(match: re.Match[str]) -> str:
    """A C1 control as the Windows-1252 character of that byte (five undefined bytes stay as they are)."""
    byte = match.group(0).encode("latin-1")
    try:
        return byte.decode("cp1252")
    except UnicodeDecodeError:
        return match.group(0)


def _join_surrogates(match: re.Match[str]) -> str:
    high, low = (ord(c) for c in match.group(0))
    return chr(0x10000 + (high - 0xD800) * 0x400 + (low - 0xDC00))


@cache
def _character_map() -> dict[int, str]:
    """Ligatures to their letters, fullwidth/halfwidth forms to normal width, U+3000 to a space."""
    table = {code: _compatibility_decomposition(chr(code)) for code in LIGATURE_CODES}
    table[0x3000] = " "
    for code in range(0xFF01, 0xFFF0):
        normal = unicodedata.normalize("NFKC", chr(code))
        if normal != chr(code):
            table[code] = normal
    return table


def _compatibility_decomposition(char: str) -> str:
    """'ﬅ' -> 'ſt': one level of the character's <compat> decomposition (not NFKC's full one)."""
    fields = unicodedata.decomposition(char).split()
    return "".join(chr(int(code, 16)) for code in fields if not code.startswith("<"))


@cache
def _control_map() -> dict[int, None]:
    return dict.fromkeys(CONTROL_CODES)
