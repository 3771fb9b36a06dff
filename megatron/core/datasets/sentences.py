"""Sentence splitting for BERT data (`preprocess_data.py --split-sentences`): nltk's Punkt, offline.

Megatron-LM loads nltk's pretrained English Punkt model and downloads it when missing. Nothing here ever
downloads. The Punkt parameters come from one of (`--punkt`):

    nltk       the `punkt_tab/<lang>` model already installed in an NLTK data folder (`$NLTK_DATA`,
               `~/nltk_data`, ...); an error naming the folders when it is not there
    input      a `PunktTrainer` run on the first characters of the input corpus itself (unsupervised,
               deterministic; ~5 M characters train in a few seconds and learn the corpus' abbreviations)
    untrained  nltk's defaults: no abbreviations known, so "Mr." or "e.g." end a sentence
    auto       `nltk` when that model is installed, else `input` (the default)

`--keep-newlines` is Megatron's Punkt variant whose sentences keep the whitespace that follows them
(newlines included), so joining the sentences gives back the text (minus trailing whitespace at the very
end of the text). Without it, whitespace between sentences is dropped.
"""

import json
from typing import Iterable, Iterator, List, Optional

from nltk.tokenize.punkt import PunktLanguageVars, PunktParameters, PunktSentenceTokenizer, PunktTrainer

from megatron.core.errors import UserError

PUNKT_SOURCES = ("auto", "nltk", "input", "untrained")
MAX_CHARS_PER_CALL = 1_000_000  # Megatron hands Punkt at most this many characters at a time


class KeepNewlinesLanguageVars(PunktLanguageVars):
    """Punkt's sentence-end pattern with `\\s*` in place of `\\s+` before the next token, so the whitespace
    after a sentence end stays with that sentence (Megatron's `CustomLanguageVars`, written for nltk >= 3.9,
    whose pattern no longer starts with the word before the period)."""

    _period_context_fmt = r"""
        %(SentEndChars)s             # a potential sentence ending
        \s*                          # the whitespace after it stays with this sentence
        (?=(?P<after_tok>
            %(NonWord)s              # either other punctuation
            |
            (?P<next_tok>\S+)        # or the next token
        ))"""


def installed_punkt(lang: str) -> Optional[PunktParameters]:
    """The parameters of the `punkt_tab/<lang>` model in an installed NLTK data folder, or None.

    `nltk.data.find` only looks in local folders; it never downloads.
    """
    import nltk.data
    from nltk.tokenize.punkt import load_punkt_params

    if not lang or "/" in lang or "\\" in lang or lang.startswith("."):
        raise UserError(f"--lang {lang!r} is not a Punkt language name (e.g. english, german)")
    try:
        folder = nltk.data.find(f"tokenizers/punkt_tab/{lang}/")
    except LookupError:
        return None
    return load_punkt_params(folder)


def train_punkt(texts: Iterable[str], max_chars: int) -> PunktParameters:
    """Punkt parameters learned (unsupervised) from the first `max_chars` characters of `texts`."""
    parts, n = [], 0
    for text in texts:
        if n >= max_chars:
            break
        parts.append(text[: max_chars - n])
        n += len(parts[-1])
    trainer = PunktTrainer()
    trainer.train("\n\n".join(parts), finalize=True)
    return trainer.get_params()


def jsonl_texts(path: str, keys: List[str]) -> Iterator[str]:
    """The strings under `keys` in a JSONL file, skipping lines that do not parse (the encoding pass
    reports those with their line number)."""
    with open(path, "rb") as f:
        for raw in f:
            try:
                doc = json.loads(raw.decode("utf-8"))
            except (UnicodeDecodeError, json.JSONDecodeError):
                continue
            if not isinstance(doc, dict):
                continue
            for key in keys:
                value = doc.get(key)
                for text in value if isinstance(value, list) else [value]:
                    if isinstance(text, str):
                        yield text


def punkt_parameters(source: str, lang: str, input_path: str, keys: List[str], train_chars: int):
    """(parameters or None for untrained, a one-line description of where they came from)."""
    assert source in PUNKT_SOURCES, source
    if source in ("auto", "nltk"):
        params = installed_punkt(lang)
        if params is not None:
            return params, f"nltk's installed punkt_tab/{lang} model"
        if source == "nltk":
            import nltk.data

            raise UserError(
                f"--punkt nltk: no punkt_tab/{lang} model in the NLTK data folders ({', '.join(nltk.data.path)}); "
                "copy one into $NLTK_DATA/tokenizers/punkt_tab/ (nothing is downloaded), or use --punkt input"
            )
    if source == "untrained":
        return None, "nltk's untrained Punkt (no known abbreviations)"
    params = train_punkt(jsonl_texts(input_path, keys), train_chars)
    return params, (f"Punkt trained on the first {train_chars / 1e6:g}M characters of {input_path} "
                    f"({len(params.abbrev_types)} abbreviations learned)")


class SentenceSplitter:
    """`split(text) -> sentences` with Punkt parameters (None: untrained). Pickles as its parameters."""

    def __init__(self, params: Optional[PunktParameters] = None, keep_newlines: bool = False):
        self.params = params
        self.keep_newlines = keep_newlines
        lang_vars = KeepNewlinesLanguageVars() if keep_newlines else PunktLanguageVars()
        self._punkt = PunktSentenceTokenizer(params, lang_vars=lang_vars) if params is not None else \
            PunktSentenceTokenizer(lang_vars=lang_vars)

    def split(self, text: str) -> List[str]:
        """The sentences of `text`, in order (Punkt sees at most 1M characters at a time, as in Megatron)."""
        return [s for i in range(0, len(text), MAX_CHARS_PER_CALL)
                for s in self._punkt.tokenize(text[i : i + MAX_CHARS_PER_CALL])]

    def __getstate__(self) -> dict:
        return {"params": self.params, "keep_newlines": self.keep_newlines}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["params"], state["keep_newlines"])
