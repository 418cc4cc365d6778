from ..server import add_serve_parser as add_parser, cmd_serve as run  # noqa: F401  (replaced by the server package)
