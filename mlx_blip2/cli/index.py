from ..photo_index import _run, add_index_parser as add_parser, cmd_index  # noqa: F401  (replaced by photo_index)
run = _run(cmd_index)
