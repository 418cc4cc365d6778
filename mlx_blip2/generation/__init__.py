"""Generation on tensors: options declared once (options), the task recipes and resolve_recipe (recipes), decoding
strategies (decoding), inputs prepared and decoded, with transformers' ``model.generate`` (generate), and the public
classes that generate (conditional: a network of :mod:`mlx_blip2.models` plus ``generate``)."""
