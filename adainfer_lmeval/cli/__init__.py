"""The ``adainfer-eval`` command line (argparse only; one error handler in :mod:`.main`)."""
