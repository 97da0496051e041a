r"""Final answers of math solutions: ``extract_answer`` finds one in a text (the last
``\\boxed{}``, GSM8K's ``####``, "the answer is", else the last number) and
``math_equal`` compares two as numbers (integers with separators, decimals, fractions,
``\\frac``, percentages, units and LaTeX dropped), exactly where both are exact. Used by
``flowgraph.rl.rewards.math_reward``; nothing here raises on garbage.

    >>> extract_answer("so the total is $\\boxed{\\frac{3}{4}}$")
    '\\frac{3}{4}'
    >>> math_equal("0.75", "\\dfrac{3}{4}"), math_equal("1,000", "1000"), math_equal("7", "8")
    (True, True, False)
"""

from __future__ import annotations

import re
from fractions import Fraction

# -- final answers ------------------------------------------------------------------
_BOXED = re.compile(r"\\(?:boxed|fbox)\b\s*")
_BRACE = {"{": 1, "}": -1}
_GSM8K = re.compile(r"####\s*(.+)")
_PHRASE = re.compile(r"\banswer\s*(?:is\b\s*[:=]?|[:=])[\s*]*(.*)", re.IGNORECASE)
_TEXT_NUMBER = re.compile(
    r"-?\\[dt]?frac\{[^{}]*\}\{[^{}]*\}|-?\\[dt]?frac\d\d"  # \frac{3}{4}, \frac34
    r"|[-+]?\d{1,3}(?:,\d{3})+(?:\.\d+)?"  # 1,000,000.5
    r"|[-+]?\d+(?:\.\d+)?(?:/\d+)?|[-+]?\.\d+"  # 42, 3.5, 3/4, .5
)


def _last_boxed(text: str) -> str | None:
    """The content of the last ``\\boxed{...}`` (nested braces) or ``\\boxed x``."""
    for m in reversed(list(_BOXED.finditer(text))):
        start = m.end()
        if text[start : start + 1] != "{":
            token = re.match(r"[^\s$]+", text[start:])
            if token:
                return token.group()
            continue
        depth = 0
        for i in range(start, len(text)):
            depth += _BRACE.get(text[i], 0)
            if depth == 0:
                return text[start + 1 : i].strip()
    return None  # none, or only unbalanced ones (an answer cut off mid-box)


def marked_answer(text: str) -> str | None:
    """The answer the text marks as final: ``\\boxed``, ``####`` or "the answer is"."""
    boxed = _last_boxed(text)
    if boxed is not None:
        return boxed
    gsm8k = _GSM8K.findall(text)
    if gsm8k:
        return gsm8k[-1].strip().rstrip(".").strip()
    for phrase in reversed(_PHRASE.findall(text)):
        phrase = re.split(r"\.(?=\s|$)", phrase, maxsplit=1)[0]  # the sentence; 3.5 stays
        phrase = phrase.strip(" \t*$`.,;:!")
        if phrase:
            return phrase
    return None


def last_number(text: str) -> str | None:
    numbers_ = _TEXT_NUMBER.findall(text)
    return numbers_[-1] if numbers_ else None


def extract_answer(text: str) -> str | None:
    """The final answer of a solution text: the last ``\\boxed{...}`` (nested braces), else
    a GSM8K ``#### x``, else "the answer is x" / "Answer: x", else the last number
    (fractions such as ``\\frac{3}{4}`` and ``3/4`` included); None if there is none.

    >>> extract_answer("#### 1,234"), extract_answer("The answer is -2.5."), extract_answer("x")
    ('1,234', '-2.5', None)
    >>> extract_answer("\\\\boxed{\\\\frac{1}{\\\\sqrt{2}}} or so")
    '\\\\frac{1}{\\\\sqrt{2}}'
    """
    if not isinstance(text, str):
        return None
    marked = marked_answer(text)
    return marked if marked is not None else last_number(text)


_NUMBER = r"(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d{1,3})?"
_NUMERIC = re.compile(rf"([+-]?)\(?([+-]?{_NUMBER})\)?(?:/\(?([+-]?{_NUMBER})\)?)?")
_GROUPED = re.compile(r"[+-]?\d{1,3}(?:[, ]\d{3})+(?:\.\d+)?")  # 1,000,000 and 1 000
_WITH_UNIT = re.compile(r"(.*?[\d)])\s+[a-zA-Z]+(?:\^?\d)?(?:/[a-zA-Z]+)?\.?")  # 5 cm, 3 m/s
_LATEX_TEXT = re.compile(r"\\(?:text|textbf|textrm|mathrm|mathbf|mbox|operatorname)\{([^{}]*)\}")
_FRAC = re.compile(r"\\frac\{([^{}]*)\}\{([^{}]*)\}")
_DROPPED = ("\\left", "\\right", "\\displaystyle", "\\!", "\\,", "\\;", "\\:", "\\$", "$",
            "^\\circ", "^{\\circ}", "°")  # fmt: skip
REL_TOL = Fraction(1, 10_000)  # relative tolerance when either side is a decimal


def _clean(s: str) -> str:
    """Simple LaTeX cleanup: ``\\frac{a}{b}`` -> ``(a)/(b)``, no ``$``/``\\left``/units
    markup, no ``x =`` in front, no trailing period."""
    s = s.strip()
    boxed = _last_boxed(s)
    s = boxed if boxed is not None else s
    s = _LATEX_TEXT.sub(r" \1", s)
    s = s.replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac").replace("\\%", "%")
    for token in _DROPPED:
        s = s.replace(token, "")
    s = s.replace("\\ ", " ").replace("~", " ").replace("\u2212", "-")  # U+2212: minus
    s = re.sub(r"\\frac(\d)(\d)", r"\\frac{\1}{\2}", s)
    s = re.sub(r"\\sqrt(\w)", r"\\sqrt{\1}", s)
    while (unfolded := _FRAC.sub(r"(\1)/(\2)", s)) != s:  # innermost first
        s = unfolded
    s = re.sub(r"^[a-zA-Z]\s*=\s*(?=\S)", "", s.strip()).strip().rstrip(".").strip()
    while m := re.fullmatch(r"\{([^{}]*)\}", s):
        s = m.group(1).strip()
    return s


def _number(s: str) -> tuple[Fraction, bool, bool] | None:
    """``(value, inexact, percent)`` of a number written as an integer, decimal, ``a/b``
    or percentage, with thousands separators or one unit word; None if it is not one."""
    if len(s) > 100:
        return None
    percent = s.endswith("%")
    s = s[:-1].strip() if percent else s
    if _GROUPED.fullmatch(s):
        s = re.sub(r"[, ]", "", s)
    m = _NUMERIC.fullmatch(_tight(s))
    if not m and (unit := _WITH_UNIT.fullmatch(s)):
        m = _NUMERIC.fullmatch(_tight(unit.group(1)))
    if not m:
        return None
    sign, numerator, denominator = m.groups()
    try:
        value = Fraction(numerator) / Fraction(denominator or 1)
    except ZeroDivisionError:
        return None
    inexact = any(c in numerator + (denominator or "") for c in ".eE")
    return (-value if sign == "-" else value), inexact, percent


def _tight(s: str) -> str:
    """``s`` without the spaces a number may hold (after a sign, around ``/``), keeping
    those between digits: ``"1 2"`` is no number (not 12), ``"1 1/2"`` no fraction."""
    return re.sub(r"\s*/\s*", "/", re.sub(r"^([+-])\s+", r"\1", s.strip()))


def _close(a: Fraction, b: Fraction, inexact: bool) -> bool:
    return abs(a - b) <= REL_TOL * max(abs(a), abs(b)) if inexact else a == b


def _equal(p: str, r: str) -> bool:
    a, b = _number(p), _number(r)
    if a and b:
        (va, ia, pa), (vb, ib, pb) = a, b
        pairs = [(va, vb)] + [(va / 100, vb)] * (pa and not pb) + [(va, vb / 100)] * (pb and not pa)
        return any(_close(x, y, ia or ib) for x, y in pairs)
    ta, tb = _tuple(p), _tuple(r)
    if ta and tb and ta[0] == tb[0] and len(ta[1]) == len(tb[1]):
        return all(_equal(x, y) for x, y in zip(ta[1], tb[1], strict=True))
    if re.fullmatch(r"[\d\s.,]+", p) or re.fullmatch(r"[\d\s.,]+", r):  # "1 2" is not "12"
        return " ".join(p.split()) == " ".join(r.split())
    return bool(p) and re.sub(r"\s+", "", p).lower() == re.sub(r"\s+", "", r).lower()


def _tuple(s: str) -> tuple[str, list[str]] | None:
    """``("()", ["1", "(1)/(2)"])`` for ``(1, (1)/(2))``: the brackets and the items of a
    tuple or interval, split at its top-level commas; None if ``s`` is not one."""
    if len(s) < 2 or s[0] not in "([" or s[-1] not in ")]":
        return None
    items, depth, start = [], 0, 1
    for i, ch in enumerate(s):
        depth += (ch in "([{") - (ch in ")]}")
        if depth == 0 and i < len(s) - 1:
            return None  # the first bracket closes early: (1)/(2) is no tuple
        if depth == 1 and ch == ",":
            items.append(s[start:i].strip())
            start = i + 1
    items.append(s[start:-1].strip())
    return (s[0] + s[-1], items) if len(items) > 1 else None


def math_equal(predicted: str, reference: str) -> bool:
    """Whether two final answers are the same number or expression.

    Numbers compare exactly as fractions (integers with ``,`` or space separators,
    decimals, ``3/4``, ``\\frac{3}{4}``/``\\dfrac``, negatives, ``$``, units, ``x =``);
    when either side is a decimal, within a relative ``REL_TOL`` (1e-4). A percentage
    equals its number and its hundredth (``50%`` is ``50`` and ``0.5``). Flat tuples
    compare item by item; anything else as text without spaces, case ignored. Garbage is
    unequal, never an exception.

    >>> math_equal("\\\\$1,000.00", "1000"), math_equal("-\\\\frac{1}{2}", "-0.5")
    (True, True)
    >>> math_equal("0.333", "1/3"), math_equal("50\\\\%", "0.5"), math_equal("(1, 2)", "(1,3)")
    (False, True, False)
    """
    if predicted is None or reference is None:
        return False
    try:
        return _equal(_clean(str(predicted)), _clean(str(reference)))
    except (ValueError, ArithmeticError, RecursionError):
        return False
