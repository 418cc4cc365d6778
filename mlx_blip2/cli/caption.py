from ..library import add_caption_parser as add_parser, cmd_caption as run  # noqa: F401  (replaced by the library package)
