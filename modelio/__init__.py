"""Reading model and adapter folders, for the training worker and the inference engine alike:
a base model's tokenizer and config (:mod:`modelio.loading`, :mod:`modelio.model_text`) and the
checks an adapter folder passes before it is served (:mod:`modelio.adapter_checks`).

``worker`` and ``engine`` never import each other; what both need lives here.
"""
