"""Reports from run files: one column table (:mod:`.tables`) drives Markdown, CSV and HTML
(:mod:`.report`, :mod:`.html`), plots (:mod:`.plots`), and the regression gate
(:mod:`.regression_check`)."""
