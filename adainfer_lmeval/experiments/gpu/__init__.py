"""The GPU check's parts (its command line: :mod:`adainfer_lmeval.experiments.gpu_check`): tiny models
and parity checks, timing on real shapes, the report. Imports from :mod:`..bench`, never the reverse."""
