"""Generation: options declared once (options), decoding strategies (decoding), transformers' ``generate``
(generate) and the batched engine every entry point shares (engine)."""
