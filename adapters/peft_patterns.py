"""PEFT's module-selection rules (`target_modules`, `exclude_modules`, `feedforward_modules`, `layers_pattern`, the
keys of `rank_pattern` / `alpha_pattern`), matched without a regex engine.

In PEFT a string `target_modules` is a regular expression (`re.fullmatch(target_modules, key)`) and a pattern key
is a regex fragment (`re.match(rf"(.*\\.)?({p})$", key)`). An uploaded regex run by Python's `re` can spend minutes
of CPU backtracking, or raise on an invalid pattern. So only the small subset that real configs use is accepted,
compiled to plain string tests (`Pattern.matches`: set lookups over a key's suffixes, linear in the key):

    pattern := ["^"] [prefix] piece* ["$"]
    prefix  := ".*" | ".*?" | "(.*\\.)?" | "(?:.*\\.)?"     anything / nothing or anything ending in a dot, before
    piece   := char | "(" ["?:"] char* ("|" char*)* ")"   a literal, or a flat alternation of literals
    char    := [A-Za-z0-9_-] | "." | "\\." | "\\-" | "\\_"

`.` is matched as a dot only (PEFT's regex would also let it match any other character: a narrower selection, so a
module PEFT would select and we do not is refused, never served wrongly). Where a narrower selection would not be
refused by itself (a `rank_pattern` / `alpha_pattern` key that misses a module only gives it the default rank or
alpha), `Pattern.matches_any_char` tells what PEFT's `.` would match: a key it matches and `matches` does not is
refused by the caller. Alternations expand to at most
MAX_ALTERNATIVES literals. e.g. `.*\\.(q_proj|v_proj)`, `(.*\\.)?(layers\\.0\\.self_attn\\.q_proj|...)` (what
`export_peft_lora` writes), `model.layers.0.mlp.down_proj`. Anything else is refused, saying what is accepted.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from adapters.errors import ArtifactError
from adapters.files import MAX_STRING_CHARS, short

MAX_ALTERNATIVES = 4096
_LITERAL = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_-")
_ESCAPED = frozenset(".-_")
_ANY_CHAR = "\x00"  # an unescaped '.' while a pattern is compiled (a dot for `matches`, any character for PEFT)
# prefix -> how the rest may sit in a key: "any" (a suffix of the key) or "dot" (the key, or after a dot)
_PREFIXES = (("(.*\\.)?", "dot"), ("(?:.*\\.)?", "dot"), (".*?", "any"), (".*", "any"))
ACCEPTED = ("a list of module names, or a string that is a module name or a flat alternation such as "
            "'.*\\.(q_proj|v_proj)' (no regex engine runs on uploads: classes, quantifiers and nested groups "
            "are refused)")


@dataclass(frozen=True)
class Pattern:
    """A compiled pattern: `literals`, placed in a key as `anchor` says ("exact", "dot" or "any")."""

    anchor: str
    literals: frozenset[str]
    loose: frozenset[str] = frozenset()  # the literals with each unescaped '.' as _ANY_CHAR (empty: none has one)

    def matches(self, key: str) -> bool:
        if key in self.literals:
            return True
        if self.anchor == "dot":
            return any(key[i + 1:] in self.literals for i, c in enumerate(key) if c == ".")
        if self.anchor == "any":
            return any(key[i:] in self.literals for i in range(len(key) + 1))
        return False

    def matches_any_char(self, key: str) -> bool:
        """`matches` with each unescaped '.' of the pattern matching any one character, as in PEFT's regex."""
        if not self.loose:
            return self.matches(key)
        if self.anchor == "exact":
            places = [key]
        elif self.anchor == "dot":
            places = [key] + [key[i + 1:] for i, c in enumerate(key) if c == "."]
        else:
            places = [key[i:] for i in range(len(key) + 1)]
        return any(len(lit) == len(place) and all(a == b or a == _ANY_CHAR for a, b in zip(lit, place))
                   for place in places for lit in self.loose)


def compile_pattern(text: Any, where: str, *, anchor: str = "exact") -> Pattern:
    """A PEFT regex from a config -> Pattern; ArtifactError (naming `where`) outside the accepted subset.
    `anchor`: how a pattern with no prefix of its own sits in a key (pattern keys: "dot", as PEFT's `(.*\\.)?`)."""
    if not isinstance(text, str) or len(text) > MAX_STRING_CHARS:
        raise ArtifactError(f"{where}: expected a string of at most {MAX_STRING_CHARS} characters, got "
                            f"{type(text).__name__}")
    body = text
    if body.startswith("^"):
        body, anchor = body[1:], "exact"
    if body.endswith("$") and not body.endswith("\\$"):
        body = body[:-1]
    for prefix, kind in _PREFIXES:
        if body.startswith(prefix):
            body, anchor = body[len(prefix):], kind
            break
    literals = _expand(body, text, where)
    loose = frozenset(lit for lit in literals if _ANY_CHAR in lit)
    return Pattern(anchor, frozenset(lit.replace(_ANY_CHAR, ".") for lit in literals), loose and frozenset(literals))


def _expand(body: str, text: str, where: str) -> list[str]:
    """The literal strings a prefix-free pattern body stands for."""
    literals, i = [""], 0
    while i < len(body):
        if body[i] == "(":
            end = body.find(")", i)
            if end < 0:
                _refuse(text, where, "an unclosed '('")
            group = body[i + 1:end].removeprefix("?:")
            alternatives = [_literal(alt, text, where) for alt in group.split("|")]
            if len(literals) * len(alternatives) > MAX_ALTERNATIVES:
                _refuse(text, where, f"more than {MAX_ALTERNATIVES} alternatives")
            literals = [lit + alt for lit in literals for alt in alternatives]
            i = end + 1
        else:
            end = min((j for j in (body.find("(", i), len(body)) if j >= 0))
            piece = _literal(body[i:end], text, where)
            literals = [lit + piece for lit in literals]
            i = end
    return literals


def _literal(piece: str, text: str, where: str) -> str:
    out, i = [], 0
    while i < len(piece):
        c = piece[i]
        if c == "\\" and i + 1 < len(piece) and piece[i + 1] in _ESCAPED:
            out.append(piece[i + 1])
            i += 2
            continue
        if c not in _LITERAL and c != ".":
            _refuse(text, where, f"{c!r} at {i}" if c != "\\" else "an escape other than '\\.'")
        out.append(_ANY_CHAR if c == "." else c)
        i += 1
    return "".join(out)


def _refuse(text: str, where: str, what: str) -> None:
    raise ArtifactError(f"{where}: the regular expression {short(text)} uses {what}; accepted: {ACCEPTED}")


def plain_name(text: Any, where: str) -> str:
    """A `layers_pattern` entry: a plain module-path segment such as 'layers'."""
    if not isinstance(text, str) or not text or len(text) > 256 or not set(text) <= _LITERAL:
        raise ArtifactError(f"{where}: expected a plain name such as 'layers', got {short(text)}")
    return text


def layer_index(key: str, layers_patterns: list[str]) -> int | None:
    """PEFT's layer index of a module key: the first `<pattern>.<digits>.` segment pair (with no pattern, the first
    numbered segment after the first), i.e. `re.match(r"(?:^|.*?\\.){pattern}\\.(?P<idx>\\d+)\\.", key)`."""
    parts = key.split(".")
    for pattern in layers_patterns or [None]:
        for i in range(len(parts) - 2):
            name, idx = parts[i], parts[i + 1]
            if (name == pattern or (pattern is None and i >= 1)) and idx.isdigit() and idx.isascii():
                return int(idx)
    return None
