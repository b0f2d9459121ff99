"""From a raw Gutenberg file to clean Portuguese paragraphs: decode, strip boilerplate, normalise, detect language.

Every step is a plain function on bytes or str so it can be tested alone and
reused from Python; `clean_book` chains them. The rules come from reading the
real mirror: ~80% of the Portuguese books are ISO-8859-1 with CRLF line ends,
the rest UTF-8 with or without BOM; START/END markers come as
``*** START OF THIS PROJECT ...``, ``*** START OF THE ...``, ``***START OF ...``,
wrapped over two lines, and the 1990s ``*END*THE SMALL PRINT!`` header; dialogue
is written with a leading ``--`` or ``—``; quotes mix « », “ ”, „ and ".
"""

from __future__ import annotations

import codecs
import re
import unicodedata
from collections import Counter
from dataclasses import dataclass, field

# ----------------------------------------------------------------------------------------
# 1. Decoding

_DECLARED_CHARSET = re.compile(rb"(?im)^[ \t]*character set encoding:[ \t]*([A-Za-z0-9_.:-]+)")


def declared_charset(raw: bytes) -> str | None:
    """The charset named in a Gutenberg header (`Character set encoding: ISO-8859-1`), if any."""
    match = _DECLARED_CHARSET.search(raw[:20000])
    if not match:
        return None
    name = match.group(1).decode("ascii", "ignore").strip()
    try:
        return codecs.lookup(name).name
    except LookupError:
        return None


def decode(raw: bytes) -> tuple[str, str]:
    """Bytes -> (NFC text with LF line ends, encoding used).

    Order: UTF-8 strictly (BOM or not), then the header's declared charset, then
    CP1252 (a superset of Latin-1's printable range that Windows-made files use),
    then Latin-1, which never fails.
    """
    candidates = ["utf-8-sig"]
    declared = declared_charset(raw)
    # Files labelled ISO-8859-1 are often CP1252 (curly quotes at 0x93/0x94), as browsers assume.
    if declared in ("latin-1", "iso8859-1"):
        declared = "cp1252"
    if declared and declared not in ("utf-8", "utf-8-sig"):
        candidates.append(declared)
    candidates += ["cp1252", "latin-1"]
    for encoding in candidates:
        try:
            text = raw.decode(encoding)
            break
        except (UnicodeDecodeError, LookupError):
            continue
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    return unicodedata.normalize("NFC", text), ("utf-8" if encoding == "utf-8-sig" else encoding)


# ----------------------------------------------------------------------------------------
# 2. Gutenberg boilerplate

# `[^*]{0,300}?` lets the marker's title wrap onto the next line before its closing stars.
_START = re.compile(
    r"^[ \t]*\*{3}[ \t]*START[ \t]+OF[ \t]+(?:THE|THIS)[ \t]+PROJECT[ \t]+GUTENBERG\b[^*]{0,300}?\*{3}[^\n]*$",
    re.IGNORECASE | re.MULTILINE,
)
_END = re.compile(
    r"^[ \t]*\*{3}[ \t]*END[ \t]+OF[ \t]+(?:THE|THIS)[ \t]+PROJECT[ \t]+GUTENBERG\b",
    re.IGNORECASE | re.MULTILINE,
)
# 1990s header: the licence ("small print") comes first and ends with this line.
_SMALL_PRINT_END = re.compile(r"^[^\n]*\*[ \t]*END[ \t*]+THE[ \t]+SMALL[ \t]+PRINT[^\n]*$", re.IGNORECASE | re.MULTILINE)
# "End of the Project Gutenberg EBook of X", "End of Project Gutenberg's X", "End of Project Gutenberg Etext".
_END_LINE = re.compile(r"^[ \t]*End[ \t]+of[ \t]+(?:the[ \t]+)?Project[ \t]+Gutenberg", re.IGNORECASE | re.MULTILINE)
_CREDIT = re.compile(
    r"^(?:produced[ \t]+by|e-?text[ \t]+prepared[ \t]+by|this[ \t]+(?:project[ \t]+gutenberg[ \t]+)?e-?text[ \t]+(?:was[ \t]+)?prepared"
    r"|transcribed[ \t]+(?:from[^\n]*?)?by|this[ \t]+file[ \t]+was[ \t]+produced|digitized[ \t]+by|updated[ \t]+editions[ \t]+will)",
    re.IGNORECASE,
)


def strip_boilerplate(text: str) -> str:
    """Keep only the book: drop the header and licence before START, everything from END on,
    the "End of the Project Gutenberg EBook" line and producer credits. A text without any
    marker is returned unchanged (apart from surrounding blank lines)."""
    start = 0
    starts = list(_START.finditer(text))
    if starts:
        start = starts[0].end()
    else:
        small_print = list(_SMALL_PRINT_END.finditer(text))
        if small_print:
            start = small_print[0].end()
    end = len(text)
    ends = [m for m in _END.finditer(text) if m.start() >= start]
    if ends:
        end = ends[0].start()
    body = text[start:end]
    # The "End of ..." line sits just before the END marker, or replaces it in old files;
    # only trust it in the last part of the book so a quotation of it cannot cut a book in half.
    end_lines = [m for m in _END_LINE.finditer(body) if m.start() >= len(body) * 0.8 or len(body) - m.start() < 3000]
    if end_lines:
        body = body[: end_lines[0].start()]
    return _strip_credits(body).strip("\n")


def _strip_credits(body: str) -> str:
    """Drop producer-credit paragraphs among the first few paragraphs (and the last one)."""
    paragraphs = re.split(r"\n[ \t]*\n", body.strip("\n"))
    kept_from = 0
    for index, paragraph in enumerate(paragraphs[:6]):
        if _CREDIT.match(paragraph.strip()):
            kept_from = index + 1
    if paragraphs and _CREDIT.match(paragraphs[-1].strip()) and len(paragraphs) > kept_from + 1:
        paragraphs = paragraphs[:-1]
    return "\n\n".join(paragraphs[kept_from:])


# ----------------------------------------------------------------------------------------
# 3. Paragraphs and punctuation

_MARKUP = [
    # Illustration/figure placeholders and side notes are not running text.
    (re.compile(r"\[(?:Illustra|Ilustra|Figura|Sidenote|Gravura)[^\]]{0,2000}\]", re.IGNORECASE), ""),
    (re.compile(r"\[\d{1,3}\]"), ""),  # footnote anchors
    (re.compile(r"_(?<![\w_]_)(?=\S)([^_\n]{1,200}?)(?<=\S)_(?![\w_])"), r"\1"),  # _italics_
    (re.compile(r"=(?<![\w=]=)(?=\S)([^=\n]{1,200}?)(?<=\S)=(?![\w=])"), r"\1"),  # =bold=
]
_PUNCTUATION = [
    (re.compile(r"[“”„‟«»〝〞＂]"), '"'),
    (re.compile(r"[‘’‚‛′]"), "'"),
    (re.compile(r"…|\.(?: \.){2,}"), "..."),
    (re.compile(r"--(?<!---)-?(?!-)"), "—"),  # typewriter em dash
    (re.compile(r"[―‒]"), "—"),
    (re.compile(r"–(?<!\S–)(?=\s)"), "—"),  # spaced en dash is an em dash
    (re.compile(r"[ \t\u00a0\u2000-\u200a\u202f]{2,}|[\t\u00a0\u2000-\u200a\u202f]"), " "),
]
_DIALOGUE = re.compile(r"^(?:—|-|–)\s*(?=\S)")
_WORD = re.compile(r"[^\W\d_]+(?:['’-][^\W\d_]+)*")
_TERMINAL = re.compile(r"[.!?…:;\"')»]$")


def normalise_punctuation(text: str) -> str:
    """Quotes -> straight ASCII, ellipses -> "...", every em-dash form -> "—", runs of spaces -> one."""
    for pattern, replacement in _MARKUP + _PUNCTUATION:
        text = pattern.sub(replacement, text)
    return text


def _is_verse(lines: list[str]) -> bool:
    """Hard-wrapped prose fills lines to ~70 columns; verse and lists leave every line short."""
    if len(lines) < 2:
        return False
    if max(len(line) for line in lines[:-1]) >= 56 or sum(len(line) for line in lines) / len(lines) >= 48:
        return False
    # A narrow prose column continues in lower case; verse lines mostly start with a capital.
    capitalised = sum(not line[:1].islower() for line in lines[1:])
    return len(lines) >= 4 or capitalised * 2 >= len(lines) - 1


def unwrap(paragraph: str) -> str:
    """Join a hard-wrapped paragraph into one line; keep the line breaks of verse."""
    lines = [line.strip() for line in paragraph.split("\n") if line.strip()]
    if _is_verse(lines):
        return "\n".join(lines)
    out = lines[0] if lines else ""
    for line in lines[1:]:
        # "rio-\ngrandenses": a compound split at its hyphen keeps the hyphen and no space.
        if out.endswith("-") and not out.endswith("--") and out[-2:-1].isalpha() and line[:1].islower():
            out += line
        else:
            out += " " + line
    return out


def word_count(text: str) -> int:
    return len(_WORD.findall(text))


def _keep(paragraph: str, words: int, min_words: int) -> bool:
    """Long enough to be running text (`words` of it). Dialogue lines and short complete sentences are kept:
    Portuguese novels are full of "— Não sei." which a plain word floor would delete."""
    if words >= min_words:
        return True
    if words == 0:
        return False
    if _DIALOGUE.match(paragraph):
        return True
    # A short sentence in lower case ("Ficou calado."), not a heading ("CAPITULO II.").
    return words >= 2 and bool(_TERMINAL.search(paragraph)) and any(c.islower() for c in paragraph)


def normalise(text: str, min_words: int = 5) -> str:
    """Boilerplate-free text -> paragraphs separated by one blank line."""
    return _normalise_counted(text, min_words)[0]


def _normalise_counted(text: str, min_words: int) -> tuple[str, int]:
    """`normalise` plus the word count of its result, summed from the per-paragraph counts
    the filter needs anyway (no word spans the blank line between paragraphs)."""
    text = normalise_punctuation(text)
    paragraphs = []
    total_words = 0
    for block in re.split(r"\n[ \t]*\n", text):
        paragraph = unwrap(block)
        if not paragraph:
            continue
        paragraph = _DIALOGUE.sub("— ", paragraph)
        words = word_count(paragraph)
        if _keep(paragraph, words, min_words):
            paragraphs.append(paragraph)
            total_words += words
    return "\n\n".join(paragraphs), total_words


# ----------------------------------------------------------------------------------------
# 4. Language

# The most frequent function words of each language, in old and new spellings. Words shared
# by several languages ("de", "a", "que") are fine: what decides is which set covers most.
STOPWORDS: dict[str, frozenset[str]] = {
    "pt": frozenset(
        "o os a as um uma uns umas de do da dos das em no na nos nas ao aos à às pelo pela pelos pelas "
        "e que não nao se por para com como mas mais muito ou quando já ja também tambem ainda "
        "é he eu tu ele elle ela ella nós nos vós eles elles elas ellas seu sua seus suas meu minha "
        "lhe lhes isto isso aquillo aquilo este esta esse essa aquelle aquele aquella aquela "
        "foi era são sao ser estava tinha ha há tem está esta onde porque pois sem sobre entre "
        "depois então entao assim d'elle d'ella n'um n'uma n'este n'esta do dum duma num numa "
        "hum huma sua vez coisa".split()
    ),
    "es": frozenset(
        "el la los las un una de del en y que no se por para con como pero más muy o cuando ya también "
        "es soy yo él ella nosotros ellos ellas su sus mi lo le les esto eso este esta ese esa fue era son "
        "ser estaba tenía hay tiene está donde porque pues sin sobre entre después entonces así al "
        "usted dijo había hasta muy".split()
    ),
    "en": frozenset(
        "the of and to in a is that it was he for on are as with his they i at be this have from or one "
        "had by but not what all were we when your can said there an which she do their if will would "
        "him her my me so no".split()
    ),
    "fr": frozenset(
        "le la les un une de du des et en que qui ne pas se par pour avec comme mais plus très ou quand "
        "est je tu il elle nous vous ils elles son sa ses mon ma ce cette était sont être avait dans sur "
        "au aux où lui leur y a été".split()
    ),
    "it": frozenset(
        "il lo la i gli le un una di del della dei delle e che non si per con come ma più molto o quando "
        "è io tu egli ella noi voi essi suo sua miei questo questa quello quella era sono essere aveva "
        "nel nella sul sulla al alla ho ha anche".split()
    ),
    "la": frozenset(
        "et in est non ad cum quod ut sed qui quae quam enim autem etiam atque ac per esse sunt erat "
        "nec vel hoc haec eius ab ex de sibi se ipse neque tamen igitur".split()
    ),
    "de": frozenset(
        "der die das und ist nicht ein eine zu den von mit sich des auf für im dem es an auch als "
        "wie er sie wir ich du aber oder wenn so bei nach war sind hat werden".split()
    ),
}
LANGUAGES = tuple(STOPWORDS)


# Each stop word -> the languages it belongs to, so a text is scored by counting its distinct
# words once (Counter, in C) instead of testing every word against every language's set.
_LANGUAGES_OF: dict[str, tuple[str, ...]] = {}
for _lang, _stop in STOPWORDS.items():
    for _word in _stop:
        _LANGUAGES_OF[_word] = _LANGUAGES_OF.get(_word, ()) + (_lang,)
_ALL_STOPWORDS = frozenset(_LANGUAGES_OF)


def _scores(words: list[str]) -> dict[str, float]:
    if not words:
        return {lang: 0.0 for lang in LANGUAGES}
    counts = Counter(words)
    hits = dict.fromkeys(LANGUAGES, 0)
    for word in _ALL_STOPWORDS.intersection(counts):
        for lang in _LANGUAGES_OF[word]:
            hits[lang] += counts[word]
    return {lang: hits[lang] / len(words) for lang in LANGUAGES}


def _best(scores: dict[str, float]) -> str | None:
    best = max(scores, key=scores.get)
    return best if scores[best] >= 0.12 else None


def language_scores(text: str) -> dict[str, float]:
    """Share of word tokens that are stop words of each language."""
    return _scores(_WORD.findall(text.lower()))


def detect_language(text: str) -> str | None:
    """The language whose stop words cover `text` best, or None when too few are found to say."""
    return _best(language_scores(text))


def portuguese_share(text: str, chunk_words: int = 200) -> float:
    """Fraction of the text's words that sit in ~200-word chunks detected as Portuguese.

    Chunks rather than the whole book, so a Latin appendix or a French preface counts
    for what it weighs; chunks where no language reaches the floor (tables, numbers,
    lists of names) do not vote.
    """
    return _portuguese_share(_paragraph_words(text), chunk_words)


def _paragraph_words(text: str) -> list[list[str]]:
    """The lower-cased words of each paragraph (a word never spans a blank line)."""
    return [_WORD.findall(paragraph) for paragraph in text.lower().split("\n\n")]


def _portuguese_share(paragraph_words: list[list[str]], chunk_words: int = 200) -> float:
    portuguese = voted = 0
    chunk: list[str] = []
    for index, words in enumerate(paragraph_words):
        chunk += words
        if len(chunk) >= chunk_words or (index == len(paragraph_words) - 1 and chunk):
            language = _best(_scores(chunk))
            if language is not None:
                voted += len(chunk)
                portuguese += len(chunk) if language == "pt" else 0
            chunk = []
    return portuguese / voted if voted else 0.0


# ----------------------------------------------------------------------------------------
# Putting it together


@dataclass
class CleanedBook:
    text: str
    encoding: str
    raw_bytes: int
    words: int
    portuguese_share: float
    language: str | None
    language_scores: dict[str, float] = field(default_factory=dict)


def clean_book(raw: bytes, min_words: int = 5) -> CleanedBook:
    """Raw file bytes -> cleaned text plus what the filters need to judge it."""
    text, encoding = decode(raw)
    body, words = _normalise_counted(strip_boilerplate(text), min_words)
    # Lower-case and split into words once; the whole-text scores, the language and the
    # chunked Portuguese share all come from these lists.
    paragraph_words = _paragraph_words(body)
    scores = _scores([word for words in paragraph_words for word in words])
    return CleanedBook(
        text=body,
        encoding=encoding,
        raw_bytes=len(raw),
        words=words,
        portuguese_share=_portuguese_share(paragraph_words),
        language=_best(scores),
        language_scores={k: round(v, 4) for k, v in scores.items()},
    )
