"""A byte-preserving XMP editor: set a sidecar's ``dc:description`` (its ``x-default`` entry) and change nothing else.

The packet's text is edited in place, so that every other byte (other fields, other languages of the description,
namespaces, comments, formatting) stays as it was. The result is parsed again and checked to hold the caption and
everything the packet held before; when it can't be read or edited safely, :class:`XmpError` is raised and the
caller leaves the file untouched.
"""

from __future__ import annotations

import io
import re
import xml.etree.ElementTree as ET
from xml.sax.saxutils import escape

NS_RDF = "http://www.w3.org/1999/02/22-rdf-syntax-ns#"
NS_DC = "http://purl.org/dc/elements/1.1/"
_XML_LANG = "{http://www.w3.org/XML/1998/namespace}lang"
_DESCRIPTION = f"{{{NS_DC}}}description"
_LI = f"{{{NS_RDF}}}li"
_XML_INVALID = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\ufffe\uffff]")


def xml_text(text: str) -> str:
    """`text` as XML 1.0 can hold it: control characters dropped, line breaks normalised as a parser would."""
    return _XML_INVALID.sub("", text.replace("\r\n", "\n").replace("\r", "\n"))


class XmpError(ValueError):
    """An existing XMP sidecar that cannot be read or updated safely (it is left untouched)."""


def _parse_xmp(data: bytes) -> tuple[ET.Element, dict[str, set[str]]]:
    """The element tree and, for each namespace URI, the prefixes bound to it anywhere in the document."""
    prefixes: dict[str, set[str]] = {}
    root = None
    try:
        for event, obj in ET.iterparse(io.BytesIO(data), events=("start-ns", "start")):
            if event == "start-ns":
                prefixes.setdefault(obj[1], set()).add(obj[0])
            elif root is None:
                root = obj
    except ET.ParseError as e:
        raise XmpError(f"not well-formed XML ({e})") from None
    if NS_RDF not in prefixes:
        raise XmpError("not an XMP packet (no rdf:RDF)")
    return root, prefixes


def xmp_description(data: bytes, default_only: bool = False) -> str | None:
    """The dc:description an XMP packet holds (its x-default entry, else the first), or None. ``default_only``: the
    x-default (or language-less) one alone - a packet holding only a translation (``de-DE``) has no caption yet."""
    root, _ = _parse_xmp(data)
    return _description(root, default_only)



def _is_default(li: ET.Element) -> bool:
    return (li.get(_XML_LANG) or "").lower() == "x-default"


def _description(root: ET.Element, default_only: bool = False) -> str | None:
    for desc in root.iter(f"{{{NS_RDF}}}Description"):
        value = desc.get(_DESCRIPTION)
        if value is not None and value.strip():
            return value
    for el in root.iter(_DESCRIPTION):
        items = [li for li in el.iter(_LI) if (li.text or "").strip()
                 and (not default_only or _is_default(li) or li.get(_XML_LANG) is None)]
        items.sort(key=lambda li: not _is_default(li))
        if items:
            return items[0].text
        if (el.text or "").strip():
            return el.text
    return None


def _signature(root: ET.Element) -> tuple[list, list]:
    """Everything a packet holds except its description's x-default text, for checking that an edit changed nothing
    else: the elements outside dc:description, and the description's other languages."""
    out, languages = [], []

    def walk(el: ET.Element, depth: int) -> None:
        if el.tag == _DESCRIPTION:
            languages.extend(sorted((sorted(li.attrib.items()), li.text or "") for li in el.iter(_LI)
                                    if not _is_default(li)))
            return
        attrs = sorted((k, v) for k, v in el.attrib.items() if k != _DESCRIPTION)
        children = [c for c in el if c.tag != _DESCRIPTION]
        if el.tag == f"{{{NS_RDF}}}Description" and not children and attrs == [(f"{{{NS_RDF}}}about", "")] \
                and not (el.text or "").strip():
            return  # an empty description block (the one created to hold a new caption)
        out.append((depth, el.tag, attrs, (el.text or "").strip(), (el.tail or "").strip()))
        for child in children:
            walk(child, depth + 1)

    walk(root, 0)
    return out, languages


_ATTRS = r"((?:[^>\"']|\"[^\"]*\"|'[^']*')*?)"
Edit = tuple[int, int, str]  # replace text[start:end] with a string


def _mask(text: str) -> str:
    """`text` with comments, CDATA sections, processing instructions and doctypes blanked (same length), so that
    tag searches only see markup."""
    pattern = re.compile(r"<!--.*?-->|<!\[CDATA\[.*?\]\]>|<\?.*?\?>|<!DOCTYPE(?:[^\[>]|\[.*?\])*>", re.DOTALL)
    return pattern.sub(lambda m: " " * len(m.group(0)), text)


def _apply(text: str, edits: list[Edit]) -> str:
    for start, end, replacement in sorted(edits, reverse=True):
        text = text[:start] + replacement + text[end:]
    return text


def _line_indent(text: str, pos: int) -> str:
    start = text.rfind("\n", 0, pos) + 1
    return re.match(r"[ \t]*", text[start:pos]).group(0)


def _li(rdf: str, caption: str) -> str:
    return f'<{rdf}:li xml:lang="x-default">{escape(caption)}</{rdf}:li>'


def _alt(rdf: str, caption: str, indent: str | None) -> str:
    if indent is None:
        return f"<{rdf}:Alt>{_li(rdf, caption)}</{rdf}:Alt>"
    return f"\n{indent} <{rdf}:Alt>\n{indent}  {_li(rdf, caption)}\n{indent} </{rdf}:Alt>\n{indent}"


NEW_XMP = """<?xml version="1.0" encoding="UTF-8"?>
<x:xmpmeta xmlns:x="adobe:ns:meta/" x:xmptk="mlx-blip2">
 <rdf:RDF xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#">
  <rdf:Description rdf:about=""
    xmlns:dc="http://purl.org/dc/elements/1.1/">
   <dc:description>{alt}</dc:description>
  </rdf:Description>
 </rdf:RDF>
</x:xmpmeta>
"""


def _drop_attribute_form(text: str, any_rdf: str, dc_prefixes: list[str]) -> str:
    """Drop the attribute form (dc:description="...") some writers use; the element form replaces it."""
    masked, edits = _mask(text), []
    for m in re.finditer(rf"<(?:{any_rdf}):Description(?=[\s/>]){_ATTRS}/?>", masked):
        for dc in dc_prefixes:
            for a in re.finditer(rf"\s+{re.escape(dc)}:description\s*=\s*(\"[^\"]*\"|'[^']*')", m.group(1)):
                edits.append((m.start(1) + a.start(), m.start(1) + a.end(), ""))
    return _apply(text, edits)


def _x_default_edits(text: str, masked: str, start: int, end: int, any_rdf: str, caption: str) -> list[Edit] | None:
    """Edits setting the x-default entry of the rdf:Alt in text[start:end] (a dc:description's content), keeping the
    other languages as they are; None when the description holds no rdf:Alt."""
    alt = re.compile(rf"<({any_rdf}):Alt(?=[\s/>]){_ATTRS}(/?)>").search(masked, start, end)
    if alt is None:
        return None
    r = alt.group(1)
    if alt.group(3):  # <rdf:Alt/>
        return [(alt.start(), alt.end(), f"<{r}:Alt{alt.group(2)}>{_li(r, caption)}</{r}:Alt>")]
    close = re.compile(rf"</{re.escape(r)}:Alt\s*>").search(masked, alt.end(), end)
    if close is None:
        raise XmpError("unterminated rdf:Alt")
    edits, first = [], None
    for li in re.compile(rf"<({any_rdf}):li(?=[\s/>]){_ATTRS}(/?)>").finditer(masked, alt.end(), close.start()):
        first = first or li
        lang = re.search(r"\sxml:lang\s*=\s*([\"'])(.*?)\1", li.group(2))
        if lang is None or lang.group(2).lower() != "x-default":
            continue
        p, attrs, closed = li.groups()
        li_end = None if closed else re.compile(rf"</{re.escape(p)}:li\s*>").search(masked, li.end(), close.start())
        if not closed and li_end is None:
            raise XmpError("unterminated rdf:li")
        if edits:  # a second x-default entry: dropped
            edits.append((li.start(), li.end() if closed else li_end.end(), ""))
        elif closed:
            edits.append((li.start(), li.end(), f"<{p}:li{attrs}>{escape(caption)}</{p}:li>"))
        else:
            edits.append((li.end(), li_end.start(), escape(caption)))
    if edits:
        return edits
    # No x-default entry yet: it goes first, laid out as the entry after it.
    at = alt.end() if first is None else first.start()
    gap = text[alt.end():at]
    return [(at, at, _li(r, caption) + (gap if gap.strip() == "" else ""))]


def _set_elements(text: str, rdf: str, any_rdf: str, dc_prefixes: list[str], caption: str) -> tuple[str, bool]:
    """Set the caption in an existing dc:description element (dropping duplicates); whether there was one."""
    masked, edits, found = _mask(text), [], False
    for dc in dc_prefixes:
        q = re.escape(dc)
        for m in re.finditer(rf"<{q}:description(?=[\s/>]){_ATTRS}(/?)>", masked):
            if m.group(2):  # <dc:description/>
                edits.append((m.start(), m.end(),
                              "" if found else f"<{dc}:description{m.group(1)}>{_alt(rdf, caption, None)}"
                                               f"</{dc}:description>"))
            else:
                end = re.compile(rf"</{q}:description\s*>").search(masked, m.end())
                if end is None:
                    raise XmpError("unterminated dc:description")
                if found:
                    edits.append((m.start(), end.end(), ""))
                else:
                    alt = _x_default_edits(text, masked, m.end(), end.start(), any_rdf, caption)
                    edits += alt if alt is not None else \
                        [(m.end(), end.start(), _alt(rdf, caption, _line_indent(text, m.start())))]
            found = True
    return _apply(text, edits), found


def _add_element(text: str, any_rdf: str, caption: str) -> str:
    """Add a dc:description element: to the rdf:Description that declares dc (else the first), or in a new block."""
    masked = _mask(text)
    starts = list(re.finditer(rf"<({any_rdf}):Description(?=[\s/>]){_ATTRS}(/?)>", masked))
    if starts:
        # Prefer a block that already declares the dc namespace (darktable and digiKam keep one block).
        m = next((s for s in starts if re.search(r"\sxmlns:dc\s*=", s.group(2))), starts[0])
        r, attrs, closed = m.group(1), m.group(2), m.group(3)
        indent = _line_indent(text, m.start())
        declare = "" if re.search(r"\sxmlns:dc\s*=", attrs) else f' xmlns:dc="{NS_DC}"'
        element = f"\n{indent} <dc:description>{_alt(r, caption, indent + ' ')}</dc:description>"
        tag = f"<{r}:Description{attrs}{declare}>"
        return _apply(text, [(m.start(), m.end(), tag + element + (f"\n{indent}</{r}:Description>" if closed else ""))])
    m = re.search(rf"<({any_rdf}):RDF(?=[\s/>]){_ATTRS}(/?)>", masked)
    if m is None:
        raise XmpError("no rdf:RDF element")
    r, indent = m.group(1), _line_indent(text, m.start())
    block = (f'\n{indent} <{r}:Description {r}:about="" xmlns:dc="{NS_DC}">\n{indent}  <dc:description>'
             f"{_alt(r, caption, indent + '  ')}</dc:description>\n{indent} </{r}:Description>")
    return _apply(text, [(m.start(), m.end(), f"<{r}:RDF{m.group(2)}>{block}" +
                          (f"\n{indent}</{r}:RDF>" if m.group(3) else ""))])


def update_xmp(data: bytes | None, caption: str) -> bytes:
    """Set dc:description's x-default entry in an XMP packet, or make a new packet when `data` is None or empty.

    Only that text changes: the description's other languages and every other byte stay as they were. XmpError
    (and nothing should be written) when the packet can't be read or safely edited.
    """
    caption = xml_text(caption)
    if not data or not data.strip():
        return NEW_XMP.format(alt=_alt("rdf", caption, "   ")).encode("utf-8")
    old_root, prefixes = _parse_xmp(data)
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise XmpError("not UTF-8") from None
    rdf_prefixes = sorted(p for p in prefixes[NS_RDF] if p)
    if not rdf_prefixes:
        raise XmpError("RDF is the default namespace; cannot edit safely")
    rdf, any_rdf = rdf_prefixes[0], "|".join(map(re.escape, rdf_prefixes))
    dc_prefixes = sorted(p for p in prefixes.get(NS_DC, ()) if p)
    text = _drop_attribute_form(text, any_rdf, dc_prefixes)
    text, found = _set_elements(text, rdf, any_rdf, dc_prefixes, caption)
    if not found:
        text = _add_element(text, any_rdf, caption)
    out = text.encode("utf-8")
    new_root, _ = _parse_xmp(out)
    if (_description(new_root) or "") != caption or _signature(new_root) != _signature(old_root):
        raise XmpError("could not update dc:description without changing other fields")
    return out
