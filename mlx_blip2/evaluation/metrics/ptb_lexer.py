"""The rules of Stanford's PTBLexer (CoreNLP 3.4.1, the jar pycocoevalcap runs) that decide caption tokens.

Each rule is (main pattern, trailing context, output). The lexer picks, at each position, the rule whose main pattern
plus trailing context matches the longest text, the earlier rule on a tie, and consumes only the main part: JFlex's
longest-match semantics. Outputs are a fixed string, a callable on the matched text, ``None`` (keep the text),
``SKIP`` (spaces) or ``NEWLINE``. Characters no rule covers are dropped, as the Java tokenizer drops them (emoji).
The rules follow the lexer's specification (PTBLexer.flex) and were checked against the 3.4.1 jar on tricky and
fuzzed text.
"""

from __future__ import annotations

import regex

SKIP = object()
NEWLINE = object()

L = r"\p{L}"
LETTER_OR_MARK = r"[\p{L}\p{M}\u00AD]"
APOS = r"(?:['\u0092\u2019]|&apos;)"
APOSETC = rf"(?:{APOS}|[\u0091\u2018\u201B])"
REDAUX = rf"{APOS}(?:[msdMSD]|(?i:re|ve|ll))"
SREDAUX = rf"(?i:n){APOSETC}(?i:t)"
SWORD = r"[A-Za-z\u00AD]*[A-MO-Za-mo-z]\u00AD*"
WORD_PART = rf"{LETTER_OR_MARK}(?:{LETTER_OR_MARK}|\p{{Nd}})*"
# letters joined by ".", "!" or "?" without spaces stay one word in 3.4.1 ("d.o.g", "wait!what")
WORD = rf"{WORD_PART}(?:[.!?]{WORD_PART})*"
HYPHEN = r"[-_\u058A\u2010\u2011]"
ALNUM = r"[\p{L}\p{Nd}]"
THING = rf"(?:[dDoOlL]{APOSETC}{ALNUM})?{ALNUM}+(?:{HYPHEN}(?:[dDoOlL]{APOSETC}{ALNUM})?{ALNUM}+)*"
THINGA = r"[A-Z]+(?:(?:[+&]|&amp;)[A-Z]+)+"
THING3 = r"[A-Za-z0-9]+(?:-[A-Za-z]+){0,2}(?:\\?/[A-Za-z0-9]+(?:-[A-Za-z]+){0,2}){1,2}"
ACRO = r"[A-Za-z](?:\.[A-Za-z])+"
HTHING = rf"[A-Za-z0-9][A-Za-z0-9.,\u00AD]*(?:-(?:[A-Za-z0-9\u00AD]+|{ACRO}\.))+"
DIGIT = r"\p{Nd}"
NUM = rf"(?:{DIGIT}+|{DIGIT}*(?:[.:,\u00AD\u066B\u066C]{DIGIT}+)+)"
SPACE = r"[ \t\u00A0\u2000-\u200A\u3000]"
SPACENL = r"[ \t\u00A0\u2000-\u200A\u3000\r\n\u2028\u2029\u000B\u000C\u0085]"
INSENTP = r"[,;:\u3001]"
SGML = r"<\/?[A-Za-z!?][^>\r\n]*>"
URL_CHARS = r"[^ \t\n\f\r\"<>|()]"

ABMONTH = "(?i:jan|feb|mar|apr|jun|jul|aug|sep|sept|oct|nov|dec)"
ABDAYS = "(?i:mon|tue|tues|wed|thu|thurs|fri)"
# capitalized only where the word is common in lower case (ark, del, ill, la, mass, miss, ore, pa, tex, wash)
ABSTATE = ("(?:(?i:ala|ariz)|Ark|(?i:calif|colo|conn|dak)|Del|(?i:fla|ga)|Ill|(?i:ind|kans?|ky)|La|Mass"
           "|(?i:md|mich|minn)|Miss|(?i:mo|mont|neb|nev|okla)|Ore|Pa|(?i:penn|tenn)|Tex|(?i:va|vt)|Wash|(?i:wisc?|wyo))")
ABTITLE = ("(?:(?i:mr|mrs|ms)|Miss|(?i:drs?|profs?|sens?|reps?|attys?|lt|col|gen|messrs|govs?|adm|rev|maj|sgt|cpl"
           "|pvt|mt|capt|ste?|ave|pres|lieut|hon|brig|co?mdr|pfc|spc|supts?|det))")
ABPTIT = r"(?i:jr|sr|bros|(?:ed|ph)\.d|blvd|rd|esq)"
ABCOMP = "(?i:inc|cos?|corp|pp?tys?|ltd|plc|bancorp|dept|bhd|assn|univ|intl|sys)"
ABCOMP2 = "(?i:invt|elec|natl|m[ft]g)"
ABNUM = "(?i:tel|est|ext|sq|bldg)"
# abbreviations that keep their period only before a number ("No. 5", "fig. 3")
ABBREV3 = "(?i:ca|figs?|nos?|prop|art|pp|op)"
ABBREV1 = rf"(?:{ABMONTH}|{ABDAYS}|{ABSTATE}|{ABCOMP}|{ABNUM}|{ABPTIT}|(?i:etc|al|seq))\."
ABBREV4 = rf"(?:[A-Za-z]|{ABTITLE}|(?i:vs|alex|wm|jos|cie|a\.k\.a|cf|treas|ft|ph)|{ACRO}|{ABCOMP2})"

FRACTIONS = {"\u00BC": "1/4", "\u00BD": "1/2", "\u00BE": "3/4", "\u2153": "1/3"}


def _latex_quote(text: str, left: bool) -> str:
    out = regex.sub(r"&apos;|'", "`" if left else "'", text)
    out = regex.sub(r"\"|&quot;", "``" if left else "''", out)
    out = regex.sub(r"[\u0091\u2018\u201B\u2039]", "`", out)
    out = regex.sub(r"[\u0092\u2019\u203A]", "'", out)
    out = regex.sub(r"[\u0093\u201C\u00AB]", "``", out)
    return regex.sub(r"[\u0094\u201D\u00BB]", "''", out)


def _left_quote(text: str) -> str:
    return _latex_quote(text, True)


def _right_quote(text: str) -> str:
    return _latex_quote(text, False)


def _no_soft_hyphens(text: str) -> str:
    return text.replace("\u00AD", "") or "-"


def _hyphens(text: str) -> str:
    return "--" if 3 <= len(text) <= 4 else text


def _nbsp(text: str) -> str:
    # tokens that may hold a space keep it as a no-break space, so the space-joined output stays one token
    return text.replace(" ", "\u00A0")


CURRENCY = {"\u00A2": "cents", "\u00A3": "#", "\u0080": "$", "\u00A4": "$", "\u20A0": "$", "\u20AC": "$"}


def _currency(text: str) -> str:
    return CURRENCY.get(text, text)


def _fraction(text: str) -> str:
    return "".join(FRACTIONS.get(c, c) for c in text)


RULES = [
    ("(?i:can)", "(?i:not)", None),
    ("(?i:gon|wan)", r"(?i:na)(?:[^\p{L}\p{Nd}]|$)", None),
    ("(?i:got)", r"(?i:ta)(?:[^\p{L}\p{Nd}]|$)", None),
    ("(?i:lem|gim)", r"(?i:me)(?:[^\p{L}\p{Nd}]|$)", None),
    (SGML, "", _nbsp),
    (r"&(?:MD|mdash|ndash);|[\u0096\u0097\u2013\u2014\u2015]", "", "--"),
    ("&amp;", "", "&"),
    (r"&(?:HT|TL|UR|LR|QC|QL|QR|odq|cdq|#[0-9]+);", "", None),
    (WORD, REDAUX, _no_soft_hyphens),
    (SWORD, SREDAUX, _no_soft_hyphens),
    (WORD, "", _no_soft_hyphens),
    (rf"{APOS}[tT]", r"(?i:is|was)", None),
    (rf"{APOS}n{APOS}?|[lLdDjJ]{APOS}|Dunkin{APOS}|somethin{APOS}|ol{APOS}|{APOS}em|[A-HJ-XZn]{APOSETC}{L}{{2}}{L}*"
     rf"|{APOS}[2-9]0s|{APOS}till?|{L}{L}*[aeiouyAEIOUY]{APOSETC}[aeiouA-Z]{L}*|{APOS}cause|cont'd\.?|'twas"
     r"|nor'easter|c'mon|e'er|s'mores|ev'ry|li'l|nat'l", "", None),
    (rf"y{APOS}", L, None),
    (rf"https?://{URL_CHARS}+[^ \t\n\f\r\"<>|.!?(){{}},-]", "", None),
    (r"(?:(?:www\.(?:[^ \t\n\f\r\"<>|.!?(){},]+\.)+[a-zA-Z]{2,4})|(?:(?:[^ \t\n\f\r\"`'<>|.!?(){},\-_$]+\.)+"
     r"(?:com|net|org|edu)))(?:/[^ \t\n\f\r\"<>|()]+[^ \t\n\f\r\"<>|.!?(){},-])?", "", None),
    (r"[a-zA-Z0-9][^ \t\n\f\r\"<>|()\u00A0]*@(?:[^ \t\n\f\r\"<>|().\u00A0]+\.)*[^ \t\n\f\r\"<>|().\u00A0]+", "", None),
    (rf"@[a-zA-Z_][a-zA-Z_0-9]*|#{WORD}", "", None),
    (REDAUX, r"[^A-Za-z]", _right_quote),
    (SREDAUX, "", _right_quote),
    (rf"{DIGIT}{{1,2}}[\-/]{DIGIT}{{1,2}}[\-/]{DIGIT}{{2,4}}", "", None),
    (rf"[\-+]?{NUM}", "", _no_soft_hyphens),
    (r"[\u207A\u207B\u208A\u208B]?(?:[\u2070\u00B9\u00B2\u00B3\u2074-\u2079]+|[\u2080-\u2089]+)", "", None),
    (rf"(?:{DIGIT}{{1,4}}[- \u00A0])?{DIGIT}{{1,4}}(?:\\?/|\u2044){DIGIT}{{1,4}}", "", _nbsp),
    (r"[\u00BC\u00BD\u00BE\u2153-\u215E]", "", _fraction),
    (rf"-(?:RRB|LRB|RCB|LCB|RSB|LSB)-|C\.D\.s|pro-|anti-|S(?:&|&amp;)P-500|S(?:&|&amp;)Ls|Cap{APOS}n|c{APOS}est",
     "", lambda t: t.replace("&amp;", "&")),
    (THING3, "", None),
    (r"[A-Z]*\$|#", "", None),
    (r"[\u00A2\u00A3\u00A4\u00A5\u0080\u20A0\u20AC\u060B\u0E3F\u20A4\uFFE0\uFFE1\uFFE5\uFFE6]", "", _currency),
    # any two characters after the abbreviation: longer than "Jan.d" as a word, so "Jan.d x" splits after "Jan."
    (ABBREV1, r"[\s\S]{2}", None),
    (ABBREV1, "", None),
    (rf"{ABBREV3}\.", rf"{SPACENL}?{DIGIT}", None),
    (rf"{ABBREV4}\.", "", None),
    (ABBREV4, SPACE, None),
    (ACRO, SPACENL, None),
    (rf"{APOS}[0-9][0-9]", SPACENL, None),
    (rf"{WORD}\.", INSENTP, _no_soft_hyphens),
    (r"(?:\([0-9]{2,3}\)[ \u00A0]?|(?:\+\+?)?(?:[0-9]{2,4}[\- \u00A0])?[0-9]{2,4}[\- \u00A0])[0-9]{3,4}[\- \u00A0]?"
     r"[0-9]{3,5}|(?:(?:\+\+?)?[0-9]{2,4}\.)?[0-9]{2,4}\.[0-9]{3,4}\.[0-9]{3,5}", "",
     lambda t: _nbsp(t).replace("(", "-LRB-").replace(")", "-RRB-")),
    (r"\"|&quot;", r"[A-Za-z0-9$]", _left_quote),
    (r"\"|&quot;", "", _right_quote),
    (r"\[", "", "-LSB-"),
    (r"\]", "", "-RSB-"),
    (r"[<>]", "", None),
    (r"\{", "", "-LCB-"),
    (r"\}", "", "-RCB-"),
    (r"\(", "", "-LRB-"),
    (r"\)", "", "-RRB-"),
    (r"-+", "", _hyphens),
    (r"\.{3,5}|(?:\.[ \u00A0]){2,4}\.|[\u0085\u2026]", "", "..."),
    (r"@+|#+|_+", "", None),
    (r"\*+|(?:\\\*){1,3}", "", None),
    (INSENTP, "", None),
    (r"[?!]+", "", None),
    (r"[.\u00A1\u00BF\u037E\u0589\u061F\u06D4\u0700-\u0702\u07FA\u3002]", "", None),
    ("=", "", None),
    ("/", "", None),
    (rf"{HTHING}\.", INSENTP, _no_soft_hyphens),
    (HTHING, "", _no_soft_hyphens),
    (rf"{THING}\.", INSENTP, None),
    (THING, "", None),
    (rf"{THINGA}\.", INSENTP, lambda t: t.replace("&amp;", "&")),
    (THINGA, "", lambda t: t.replace("&amp;", "&")),
    ("'", r"[A-Za-z][^ \t\n\r\u00A0]", _left_quote),
    (REDAUX, "", _right_quote),
    (rf"{APOS}|''|[`\u2018\u2019\u201A\u201B\u201C\u201D\u0091\u0092\u0093\u0094\u201E\u201F\u2039\u203A\u00AB\u00BB]"
     r"{1,2}", "", _right_quote),
    ("<<|>>", "", None),
    (r"[+%&~\^|\\\u00A6\u00A7\u00A8\u00A9\u00AC\u00AE\u00AF\u00B0-\u00B3\u00B4-\u00BA\u00D7\u00F7\u0387\u05BE\u05C0"
     r"\u05C3\u05C6\u05F3\u05F4\u0600-\u0603\u0606-\u060A\u060C\u0614\u061B\u061E\u066A\u066D\u0703-\u070D\u07F6"
     r"\u07F7\u07F8\u0964\u0965\u0E4F\u1FBD\u2016\u2017\u2020-\u2023\u2030-\u2038\u203B\u203E-\u2042\u2044"
     r"\u207A-\u207F\u208A-\u208E\u2100-\u214F\u2190-\u21FF\u2200-\u2BFF\u3012\u30FB\uFF01-\uFF0F\uFF1A-\uFF20"
     r"\uFF3B-\uFF40\uFF5B-\uFF65]", "", None),
    (r"\x00|[ \t\u00A0\u2000-\u200A\u3000]+|[\u200B\u200E\u200F\uFEFF]|&nbsp;", "", SKIP),
    (r"\r|\r?\n|\u2028|\u2029|\u000B|\u000C|\u0085", "", NEWLINE),
]


def _compile(main: str, context: str):
    source = f"({main})({context})"
    # POSIX (leftmost-longest) matching is what JFlex does but is slow; the plain pattern first rules out a miss
    return regex.compile(source), regex.compile(source, regex.POSIX)


COMPILED = [(*_compile(main, context), out) for main, context, out in RULES]
