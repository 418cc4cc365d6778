"""What a new user meets running the README's commands on a messy library (tiny checkpoints): a translation-only XMP
sidecar, a missing file among good ones, and the tool's own sidecars in a folder being indexed."""

from conftest import FIXTURES
from PIL import Image

from mlx_blip2.cli import main
from mlx_blip2.library.xmp import xmp_description

TINY = FIXTURES / "tiny-blip2-opt"
TINY_ITM = FIXTURES / "tiny-blip2-itm"
FAST = ["--model", str(TINY), "--max-new-tokens", "3", "--num-beams", "1"]
GERMAN_ONLY = ('<x:xmpmeta xmlns:x="adobe:ns:meta/"><rdf:RDF xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#">'
               '<rdf:Description xmlns:dc="http://purl.org/dc/elements/1.1/"><dc:description><rdf:Alt>'
               '<rdf:li xml:lang="de-DE">Ein Hund am Strand</rdf:li></rdf:Alt></dc:description></rdf:Description>'
               '</rdf:RDF></x:xmpmeta>')


def photo(path, colour=(200, 40, 40)):
    Image.new("RGB", (48, 40), colour).save(path)
    return path


def test_a_translation_only_xmp_sidecar_is_not_a_caption(tmp_path, capsys):
    image = photo(tmp_path / "beach.jpg")
    sidecar = tmp_path / "beach.jpg.xmp"
    sidecar.write_text(GERMAN_ONLY)
    assert xmp_description(sidecar.read_bytes()) == "Ein Hund am Strand"  # still read as a caption
    assert xmp_description(sidecar.read_bytes(), default_only=True) is None
    assert main(["caption", str(image), "--format", "xmp", *FAST]) == 0
    data = sidecar.read_bytes()
    assert b'xml:lang="x-default"' in data and b"Ein Hund am Strand" in data
    caption = xmp_description(data, default_only=True)
    assert caption and caption != "Ein Hund am Strand"
    # Now it has one: the next run skips it.
    assert main(["caption", str(image), "--format", "xmp", *FAST]) == 0
    assert sidecar.read_bytes() == data
