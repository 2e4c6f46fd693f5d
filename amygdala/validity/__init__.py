"""The validity evaluation, the ``amygdala eval`` job: do the vectors mean what their names say?

- :mod:`amygdala.validity.run`: the job (``amygdala eval``): a model run, the result JSON and page.
- :mod:`amygdala.validity.report`: the per-layer validity table (held-out accuracy, geometry).
- :mod:`amygdala.validity.heldout`: leave-one-story-out accuracy.
- :mod:`amygdala.validity.geometry`: valence/arousal geometry against the published study.
- :mod:`amygdala.validity.steering`: steering judged by VADER.
"""
