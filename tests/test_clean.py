"""Decoding, boilerplate stripping, paragraph rules and the language filter, on hand-written texts."""

from gtransformer.data import clean
from conftest import SPANISH, gutenberg_file, portuguese_text

BODY = "Era uma vez um rei que tinha tres filhas muito bonitas e sabias.\n\nA mais nova chamava-se Maria e vivia no castello."


# --- decoding ---------------------------------------------------------------------------


def test_decode_utf8_with_and_without_bom():
    text = "Coração à tôa — “ção”\r\nfim"
    assert clean.decode(text.encode("utf-8")) == ("Coração à tôa — “ção”\nfim", "utf-8")
    assert clean.decode(b"\xef\xbb\xbf" + text.encode("utf-8"))[0] == "Coração à tôa — “ção”\nfim"


def test_decode_declared_charset_beats_fallback():
    raw = "Character set encoding: ISO-8859-15\n\nPreço: 5 €".encode("iso8859-15")
    text, encoding = clean.decode(raw)
    assert text.endswith("5 €") and encoding == "iso8859-15"


def test_decode_latin1_label_with_cp1252_quotes():
    raw = "Character set encoding: ISO-8859-1\n\n“Não”, disse ella.".encode("cp1252")
    assert clean.decode(raw)[0].endswith("“Não”, disse ella.")


def test_decode_undeclared_latin1_and_undefined_cp1252_bytes():
    assert clean.decode("Sem cabeçalho: ação".encode("latin-1"))[0] == "Sem cabeçalho: ação"
    # 0x81 is undefined in CP1252: only Latin-1 can decode this, and must not crash.
    text, encoding = clean.decode(b"caf\xe9 \x81")
    assert text == "café \x81" and encoding == "latin-1"


def test_decode_normalises_to_nfc_and_lone_cr():
    decomposed = "ac\u0327a\u0303o"  # c + cedilla, a + tilde
    assert clean.decode((decomposed + "\rfim").encode("utf-8"))[0] == "ação\nfim"


# --- boilerplate ------------------------------------------------------------------------


def test_every_marker_generation_is_stripped():
    for style in ("this", "the", "nospace", "wrapped"):
        stripped = clean.strip_boilerplate(gutenberg_file("Titulo", BODY, style))
        assert stripped == BODY, style


def test_small_print_header_of_the_1990s():
    text = (
        "Project Gutenberg Etext Lendas, by Alguem\n\n**Welcome To The World of Free Plain Vanilla Electronic Texts**\n\n"
        "*****This file should be named 2837-8.txt******\n\nlicence text\n\n"
        "*END*THE SMALL PRINT! FOR PUBLIC DOMAIN ETEXTS*Ver.04.29.93*END*\n\n\n"
        "This Project Gutenberg Etext prepared by Fulano\n\n" + BODY + "\n\n\nEnd of Project Gutenberg's Etext Lendas, by Alguem\n"
    )
    assert clean.strip_boilerplate(text) == BODY
    spaced = text.replace("*END*THE SMALL PRINT!", "*END THE SMALL PRINT!")
    assert clean.strip_boilerplate(spaced) == BODY


def test_book_without_header_is_kept_whole():
    assert clean.strip_boilerplate("\n\n" + BODY + "\n") == BODY


def test_end_line_quoted_early_in_a_long_book_does_not_cut_it():
    long_body = "Ella leu: End of the Project Gutenberg EBook, e riu.\n\n" + "\n\n".join([BODY] * 200)
    assert clean.strip_boilerplate(gutenberg_file("T", long_body)) == long_body


# --- paragraphs and punctuation ---------------------------------------------------------


def test_unwrap_prose_keeps_verse_and_compound_hyphens():
    prose = "As velhas lendas rio-\ngrandenses acham-se tramadas no acervo platino de antanho, e outras coisas\nmais."
    assert clean.unwrap(prose) == "As velhas lendas rio-grandenses acham-se tramadas no acervo platino de antanho, e outras coisas mais."
    verse = "As armas e os barões assinalados,\nQue da ocidental praia Lusitana,\nPor mares nunca de antes navegados,"
    assert clean.unwrap(verse) == verse


def test_punctuation_is_normalised():
    text = "«Sim» “não” „talvez” ‘ok’ ... … . . . a--b ―c – d _italico_ [Illustration: x] nota[12]"
    assert clean.normalise_punctuation(text) == "\"Sim\" \"não\" \"talvez\" 'ok' ... ... ... a—b —c — d italico nota"


def test_paragraph_rules_keep_dialogue_and_sentences_drop_headings():
    text = (
        "CAPITULO II\n\n"
        "-- Não sei.\n\n"
        "--Sim!\n\n"
        "Ficou calado.\n\n"
        "*       *       *\n\n"
        "Era uma vez um rei que tinha tres filhas\nmuito bonitas e sabias, como se conta.\n\n\n\n\n"
        "Quatro palavras sem ponto"
    )
    assert clean.normalise(text, min_words=5) == (
        "— Não sei.\n\n— Sim!\n\nFicou calado.\n\n"
        "Era uma vez um rei que tinha tres filhas muito bonitas e sabias, como se conta."
    )
    assert "Quatro palavras sem ponto" in clean.normalise(text, min_words=4)
    assert "CAPITULO II" in clean.normalise(text, min_words=0)


# --- language ---------------------------------------------------------------------------


def test_language_detection_portuguese_versus_others():
    assert clean.detect_language(portuguese_text(3)) == "pt"
    assert clean.detect_language(SPANISH.format(n=1) * 3) == "es"
    assert clean.detect_language("The man did not know where he was going, and the night was falling on the fields.") == "en"
    assert clean.detect_language("L'homme ne savait pas où il allait, et la nuit tombait sur les champs avec le vent.") == "fr"
    assert clean.detect_language("Gallia est omnis divisa in partes tres, quarum unam incolunt Belgae, aliam Aquitani, tertiam qui ipsorum lingua Celtae.") == "la"
    assert clean.detect_language("12 34 56 78") is None


def test_portuguese_share_weighs_passages():
    mixed = portuguese_text(20) + "\n\n" + "\n\n".join(SPANISH.format(n=i) for i in range(60))
    share = clean.portuguese_share(mixed.replace("\n", "\n\n"))
    assert 0.1 < share < 0.5
    assert clean.portuguese_share(portuguese_text(20).replace("\n", "\n\n")) == 1.0


def test_clean_book_end_to_end():
    raw = gutenberg_file("Livro", portuguese_text(10)).encode("latin-1")
    book = clean.clean_book(raw)
    assert book.encoding == "cp1252" and book.language == "pt" and book.portuguese_share == 1.0
    assert "Project Gutenberg" not in book.text and "Produced by" not in book.text
    assert book.text.startswith("O homem não sabia") and book.text.count("\n\n") == 9


def test_clean_book_measures_agree_with_the_public_functions():
    # clean_book shares word lists and counts between its checks; they must equal the plain functions'.
    body = portuguese_text(6) + "\n\n" + "\n\n".join(SPANISH.format(n=i) for i in range(4)) + "\n\n— Não sei.\n\nÜBER İstanbul d'elle n'um rio-grandense."
    book = clean.clean_book(gutenberg_file("Livro", body).encode("utf-8"))
    assert book.words == clean.word_count(book.text) > 50
    assert book.portuguese_share == clean.portuguese_share(book.text)
    assert book.language == clean.detect_language(book.text)
    scores = clean.language_scores(book.text)
    assert book.language_scores == {k: round(v, 4) for k, v in scores.items()} and scores["pt"] > scores["es"] > 0
    naive = clean._WORD.findall(book.text.lower())
    assert scores == {lang: sum(w in stop for w in naive) / len(naive) for lang, stop in clean.STOPWORDS.items()}
