"""amygdala: find, read out and steer concept directions in language models.

The public API is small; the CLI (`amygdala <job>`) is a thin layer over it:

- :func:`amygdala.corpus.load_corpus` reads and validates a corpus folder.
- :func:`amygdala.models.load_model` resolves a model (``"default"`` is SmolLM2-135M-Instruct).
- :func:`amygdala.activations.collect` runs one forward per unique text and pools activations.
- :func:`amygdala.methods.compute_vectors` turns activations into unit concept vectors.
- :func:`amygdala.pipeline.build` is the whole pipeline behind ``amygdala build``.
- :class:`amygdala.readout.Readout` is the readout file (``readout.safetensors`` + ``readout.json``).
- :func:`amygdala.readout.attach` reads out and steers a transformers model, ``generate()`` included.
- :mod:`amygdala.finetune` fine-tunes the served model online (``/train`` on ``amygdala serve``).

Words: concept vectors are *built* (``amygdala build``); the model is *fine-tuned* (``/train``).
"""

__version__ = "0.1.0"


class AmygdalaError(Exception):
    """A problem the user can fix: printed as one line by the CLI, never with a traceback.

    The message names the file or field at fault and what to do about it. An error about one
    argument of a library function starts with that parameter's name and sets ``param`` to it
    (``layers``, ``method``): a Python caller reads the name it passed, and the CLI, which knows
    which flag fills which parameter, says the flag instead (``--layers``).
    """

    def __init__(self, *args: object, param: str | tuple[str, ...] | None = None):
        super().__init__(*args)
        self.param = param
