"""Developer kit: tiny random checkpoints and smoke-run helpers for tests, benchmarks and CPU trials.

``tiny`` (``olavlm make-tiny``: tokenizer, LLMs, vision towers, ``tiny_model_config``), ``teachers``
(tiny teachers of the real classes), ``reference`` (tiny checkpoints in the released OLA-VLM layout),
``smoke`` (overrides that shrink a real recipe onto the tiny models). Nothing in a training, inference
or evaluation path imports this package.
"""
