from ..photo_index import _run, add_search_parser as add_parser, cmd_search  # noqa: F401  (replaced by photo_index)
run = _run(cmd_search)
