"""The teach loop: training data from conversations, the dream loop, distilling a steering vector
into the weights, and undoing any of it; a client of a running ``amygdala serve`` (HTTP only,
never an import of the server).

- :mod:`amygdala.teach.samples`: the versioned sample file (JSONL), read all-or-nothing.
- :mod:`amygdala.teach.convert`: transcripts and scored notes -> samples (``amygdala pairs``).
- :mod:`amygdala.teach.client`: the server's completions (readout, steering) and training routes.
- :mod:`amygdala.teach.tokens`: samples -> token IDs with the served model's tokenizer and template.
- :mod:`amygdala.teach.score`: concept scores of generated and given text.
- :mod:`amygdala.teach.runs`: prompts, snapshots, jobs followed with a progress bar.
- :mod:`amygdala.teach.judge`: distill's judges from outside the readout (competence, VADER) and its shipped texts.
- :mod:`amygdala.teach.teach`, :mod:`.dream`, :mod:`.distill`: the three jobs.

Usage and design: docs/teaching.md.
"""
