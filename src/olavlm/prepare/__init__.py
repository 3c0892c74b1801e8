"""`olavlm data prepare`: download, verify and lay out LLaVA-558K, LLaVA-665K and ALLaVA-Caption.

Modules: ``sources`` (the registry, as data), ``download`` (HTTP with resume/retries/verification),
``hub`` (huggingface_hub dataset files), ``archive`` (safe unpacking), ``ocr_vqa`` (per-image
fetching), ``allava`` (assembling ALLaVA-Caption.json), ``state`` (done-markers), ``runner``
(one dataset end to end) and ``cli`` (the command).
"""
