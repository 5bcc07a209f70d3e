"""The inference engine (``lorafleet serve``): base models, LoRA adapters, batched generation.

It runs as its own process so that the API never imports torch and generation never blocks
the API's event loop; the API authenticates, resolves the model and forwards to it.
"""
