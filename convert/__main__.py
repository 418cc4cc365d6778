"""``python -m mlx_blip2.convert``: the same as the ``mlx-blip2-convert`` command."""

import sys

from mlx_blip2.convert.convert import main

sys.exit(main())
