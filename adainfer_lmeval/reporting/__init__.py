"""Reports from run files, in layers that each import only the ones listed before them:
:mod:`.comparison` (run files; each early-exit run beside its baseline), :mod:`.leaderboard`
(ranked rows per model), :mod:`.tables` (one column table for Markdown, CSV and HTML),
:mod:`.html` and :mod:`.plots`, :mod:`.report` (the files, ``adainfer-eval report``);
:mod:`.regression_check` holds runs to a baseline."""
