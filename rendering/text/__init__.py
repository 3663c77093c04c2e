"""The text stage's worker side: a causal language model that rewrites each row's prompt for
the video model, batched (left padding, one ``generate`` call per batch), seeded per row, cached
by content, and judged (empty, too long for the video model after trimming, not text) before a
later stage renders it. No Ray here, as everywhere under ``rendering``; torch and transformers
are imported only where a model is loaded (``generate``, ``limit``, ``tiny``)."""
