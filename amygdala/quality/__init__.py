"""The quality report: which concepts are clean, fragmented, redundant or in the wrong cluster.

- :mod:`amygdala.quality.config`: :class:`QualityConfig`, the thresholds (no torch import, so
  the CLI parser can read its defaults cheaply; hence nothing is re-exported here).
- :mod:`amygdala.quality.metrics`: each metric as a function of tensors.
- :mod:`amygdala.quality.report`: :func:`~amygdala.quality.report.compute` (the quality.json
  document, schema in docs/quality.md) and the printed triage table.
- :mod:`amygdala.quality.run`: inputs from a model run (``amygdala quality``) or from a build
  in the same process (``amygdala build --quality-report``), and writing the two files.
- :mod:`amygdala.quality.html`: report.html (its style and plots: :mod:`amygdala.figures`).

The validity evaluation (``amygdala eval``) is :mod:`amygdala.validity`.
"""
